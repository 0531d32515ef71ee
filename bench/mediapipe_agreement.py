"""Our BlazePose against MediaPipe's own BlazePose pipeline on the same people (issue 22, item 1).

    make bench-mediapipe      # once: the bench-only environment with mediapipe (.venv-mediapipe)
    .venv/bin/python bench/mediapipe_agreement.py

The people: every annotated person of the COCO sample in ../shared/media (its ground-truth boxes), and the
persons our detector finds in every 30th frame of towncentre (standing pedestrians). For each, the region
our pose stage crops (stages/pose.py: the box padded 1.25x, square, extended below the frame for a person
cut by its bottom edge) is cut at 512 px and given to MediaPipe Pose as a still picture (its own person
detector, rotated region and landmark model, `bench/mediapipe_pose.py` under .venv-mediapipe); our stage's
code runs the same model, converted to ONNX, on its own 256 px crop of that region. Printed for
blazepose_full (MediaPipe's model_complexity 1; the wheel ships no lite model): how often MediaPipe finds
the person (and the same person: most of its keypoints in the box; in a crowded crop its detector may pick a
neighbour), and over the 17 COCO keypoints (the stage's 33 -> 17 mapping) that both call visible (score and
visibility > 0.5), the mean and median distance between the two as a share of the box height, and the share
of keypoints within 5%. Where the two disagree on the same person, MediaPipe's rotated region is what our
upright crop lacks (POSEMESH_POSE_REFINE adds it): on identical crops our ONNX and Google's .tflite differ by
at most 0.0006 px (measured when issue 22 was filed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import av
import cv2
import numpy as np
from pycocotools.coco import COCO

from bench.accuracy import GROUND_TRUTH, images
from bench.loop import OnnxModel
from posemesh.mesh.models import prepare
from posemesh.mesh.settings import REPO_ROOT, default_media_dir
from posemesh.stages.detect import DEFAULT_MIN_SCORE, Detector
from posemesh.stages.pose import BLAZEPOSE_TO_COCO, PoseEstimator, crop_matrix, crop_region, to_image, whole_body_box

MEDIAPIPE_PYTHON = REPO_ROOT / ".venv-mediapipe" / "bin" / "python"
# Ours -> MediaPipe's model_complexity. The mediapipe wheel ships only the full landmark model
# (pose_landmark_full.tflite); it downloads the lite one on first use, which cannot be done offline.
MODELS = {"blazepose_full": 1}
CROP = 512
VISIBLE = 0.5
TOWNCENTRE = "towncentre_1080p_302f.mp4"


def people(media_dir: Path, onnx_dir: Path) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """(image, box) of each person, by set."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(media_dir / GROUND_TRUTH))
    coco_people = []
    for image_id, image in images(media_dir, coco).items():
        for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
            if a["num_keypoints"] > 0:
                x, y, w, h = a["bbox"]
                coco_people.append((image, np.array([x, y, x + w, y + h], np.float32)))
    detector = Detector(OnnxModel(onnx_dir / "yolox.onnx"))
    town_people = []
    with av.open(str(media_dir / TOWNCENTRE)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i % 30:
                continue
            image = frame.to_ndarray(format="bgr24")
            [(boxes, _scores)] = detector([image], [DEFAULT_MIN_SCORE])
            h, w = image.shape[:2]
            town_people += [(image, box) for box in np.clip(boxes, 0, [w, h, w, h])]
    return {"COCO sample, annotated boxes": coco_people, "towncentre, detected": town_people}


def same_person(points: np.ndarray, box: np.ndarray) -> bool:
    """Whether most of MediaPipe's visible keypoints lie in the person's box (padded by a tenth): in a crowded
    crop its own detector may pick a neighbour, and that is not a disagreement about the same person."""
    if not len(points):
        return False
    x1, y1, x2, y2 = box
    pad_x, pad_y = 0.1 * (x2 - x1), 0.1 * (y2 - y1)
    inside = ((points[:, 0] >= x1 - pad_x) & (points[:, 0] <= x2 + pad_x)
              & (points[:, 1] >= y1 - pad_y) & (points[:, 1] <= y2 + pad_y))
    return inside.mean() > 0.5


def mediapipe(crops: np.ndarray, complexity: int) -> np.ndarray:
    """MediaPipe's 33 landmarks [N, 33, 3] (crop pixels, visibility) on RGB crops, NaN where none."""
    with tempfile.TemporaryDirectory() as tmp:
        source, target = Path(tmp) / "crops.npz", Path(tmp) / "landmarks.npz"
        np.savez(source, crops=crops, complexity=complexity)
        subprocess.run([str(MEDIAPIPE_PYTHON), str(REPO_ROOT / "bench" / "mediapipe_pose.py"), str(source),
                        str(target)], check=True, capture_output=True)
        return np.load(target)["landmarks"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--media", type=Path, default=default_media_dir())
    args = parser.parse_args()
    if not MEDIAPIPE_PYTHON.exists():
        sys.exit(f"{MEDIAPIPE_PYTHON} is missing: run `make bench-mediapipe` first")
    onnx_dir = REPO_ROOT / "run" / "onnx"
    prepare(onnx_dir)
    sets = people(args.media, onnx_dir)
    print("| model | our region | people | persons | MediaPipe found (the same person) | keypoints compared "
          "| mean distance / box height | median | within 5% |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (model, complexity), refine in ((m, r) for m in MODELS.items() for r in (False, True)):
        estimator = PoseEstimator(model, OnnxModel(onnx_dir / f"{model}.onnx"), refine=refine)
        region = "box, then landmarks (POSE_REFINE)" if refine else "box"
        for name, persons in sets.items():
            ours, our_scores = estimator.estimate([image for image, _b in persons], [box for _i, box in persons])
            matrices = [crop_matrix(crop_region(whole_body_box(box, image.shape[0]), CROP, CROP), CROP, CROP)
                        for image, box in persons]
            crops = np.stack([cv2.cvtColor(cv2.warpAffine(image, m, (CROP, CROP), flags=cv2.INTER_LINEAR),
                                           cv2.COLOR_BGR2RGB) for (image, _b), m in zip(persons, matrices)])
            theirs = mediapipe(crops, complexity)
            found = ~np.isnan(theirs[:, 0, 0])
            distances, same = [], 0
            for k in np.nonzero(found)[0]:
                points = to_image(theirs[k, BLAZEPOSE_TO_COCO, :2], matrices[k])
                if not same_person(points[theirs[k, BLAZEPOSE_TO_COCO, 2] > VISIBLE], persons[k][1]):
                    continue  # MediaPipe's detector chose someone else in a crowded crop
                same += 1
                both = (theirs[k, BLAZEPOSE_TO_COCO, 2] > VISIBLE) & (our_scores[k] > VISIBLE)
                height = float(persons[k][1][3] - persons[k][1][1])
                distances += list(np.linalg.norm(points[both] - ours[k][both], axis=1) / height)
            d = np.array(distances)
            print(f"| {model} | {region} | {name} | {len(persons)} | {found.sum()} ({same}) | {len(d)} | "
                  f"{d.mean() if len(d) else float('nan'):.3f} | {np.median(d) if len(d) else float('nan'):.3f} | "
                  f"{(d < 0.05).mean() if len(d) else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
