"""What the pose stage's crops cost: the region resized (stages/pose.py) against the same region warped.

    .venv/bin/python bench/crops.py [--clip PATH] [--frames 30] [--pose-model blazepose_lite]

On the clip's first frames, the persons our detector finds (the project's ONNX YOLOX, default minimum
score) are cropped twice per round, alternating: `cv2.resize` of the region (what PoseEstimator.crop does)
and `cv2.warpAffine` through the same region's matrix (what it did before). Printed: CPU ms per frame of
each and their ratio (process CPU time, best of the rounds), and what the pose model makes of each crop
set: how far each keypoint moves between the two, as a share of its box's height (median and 95th
percentile), so a faster crop that changes the answer shows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np

from bench.loop import OnnxModel
from posemesh.mesh import media
from posemesh.mesh.models import prepare
from posemesh.mesh.settings import REPO_ROOT, default_media_dir
from posemesh.stages.detect import DEFAULT_MIN_SCORE, Detector
from posemesh.stages.pose import PoseEstimator, crop_matrix, crop_region, whole_body_box


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=default_media_dir() / "towncentre_1080p_302f.mp4")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--pose-model", default="blazepose_lite")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    onnx = prepare(REPO_ROOT / "run" / "onnx", names=["yolox", args.pose_model])
    detector = Detector(OnnxModel(onnx["yolox"]))
    estimator = PoseEstimator(args.pose_model, OnnxModel(onnx[args.pose_model]))
    frames = []
    for decoded in media.FrameReader(args.clip, media.probe(args.clip).video.fps):
        image = decoded.image
        [(boxes, _scores)] = detector([image], [DEFAULT_MIN_SCORE])
        h, w = image.shape[:2]
        frames.append((image, np.clip(boxes, 0, [w, h, w, h])))
        if len(frames) == args.frames:
            break
    persons = sum(len(boxes) for _image, boxes in frames)

    def resized():
        return [estimator.crop(image, box) for image, boxes in frames for box in boxes]

    def warped():
        out = []
        for image, boxes in frames:
            for box in boxes:
                region_box = box if estimator.rtmpose else whole_body_box(box, image.shape[0])
                matrix = crop_matrix(crop_region(region_box, *estimator.size), *estimator.size)
                out.append((estimator._warp(image, matrix), matrix))
        return out

    best = {"resize": float("inf"), "warpAffine": float("inf")}
    for _round in range(args.rounds):
        for name, crop in (("resize", resized), ("warpAffine", warped)):
            start = time.process_time()
            crop()
            best[name] = min(best[name], (time.process_time() - start) * 1000 / len(frames))

    moved = []
    for (crop_a, matrix_a), (crop_b, matrix_b), box in zip(resized(), warped(),
                                                           [b for _i, boxes in frames for b in boxes]):
        points_a, _s, _a = estimator._run(crop_a[None], [matrix_a])
        points_b, _s, _a = estimator._run(crop_b[None], [matrix_b])
        moved.extend(np.linalg.norm(points_a[0] - points_b[0], axis=1) / max(box[3] - box[1], 1.0))
    moved = np.array(moved)
    print(f"{args.clip.name}: {len(frames)} frames, {persons} persons ({persons / len(frames):.1f} a frame), "
          f"{args.pose_model} crops {estimator.size[0]}x{estimator.size[1]}, cv2 threads {cv2.getNumThreads()}")
    print(f"| crop | CPU ms per frame (best of {args.rounds}) |")
    print("|---|---|")
    for name, ms in best.items():
        print(f"| {name} | {ms:.2f} |")
    print(f"warpAffine / resize: {best['warpAffine'] / best['resize']:.2f}")
    print(f"keypoint moved between the two, share of box height: median {np.median(moved):.4f}, "
          f"95th percentile {np.percentile(moved, 95):.4f}, max {moved.max():.4f}")


if __name__ == "__main__":
    main()
