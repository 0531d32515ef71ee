"""Keypoint accuracy against COCO ground truth nobody here wrote (issue 22, item 1: the OKS part).

    .venv/bin/python bench/accuracy.py

On the COCO val2017 images in ../shared/media with their person keypoint annotations
(coco_val2017_keypoints_sample.json, from OpenMMLab's test data; its MANIFEST says how), each pose model
runs the stages' own code (detect.py's YOLOX pre/post-processing, pose.py's crop and decoding) on the
project's prepared ONNX files, with the region from the box alone and with POSE_REFINE's second pass on
the region the first pass's landmarks give (stages/pose.py), each twice:

- **detected**: persons found by our detector at its default minimum score: what a user gets;
- **ground-truth boxes**: the annotated boxes given to the pose model: the pose model and its crop alone.

Printed per model: COCO keypoint AP and AP50 (pycocotools' COCOeval, OKS with COCO's sigmas) over the
images present, the persons found, and each annotated person's OKS against its best match, so the people
a model loses can be named. Deterministic (ONNX Runtime on the CPU, one thread): no ratios to time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bench.loop import OnnxModel
from posemesh.mesh.models import prepare
from posemesh.mesh.settings import REPO_ROOT, default_media_dir
from posemesh.stages.detect import DEFAULT_MIN_SCORE, Detector
from posemesh.stages.pose import PoseEstimator

GROUND_TRUTH = "coco_val2017_keypoints_sample.json"
MODELS = ("blazepose_lite", "blazepose_full")  # rtmpose here is an untrained stand-in (deploy/README.md)
SIGMAS = np.array([.26, .25, .25, .35, .35, .79, .79, .72, .72, .62, .62, 1.07, 1.07, .87, .87, .89, .89]) / 10.0


def images(media_dir: Path, coco: COCO) -> dict[int, np.ndarray]:
    """The annotated images that are present (the set names one that is not shipped)."""
    out = {}
    for image_id, info in coco.imgs.items():
        path = media_dir / f"coco_{info['file_name']}"
        if path.exists():
            out[image_id] = cv2.imread(str(path))
    return out


def predict(estimator: PoseEstimator, image: np.ndarray, boxes: np.ndarray, scores: np.ndarray) -> list[dict]:
    """COCO keypoint results for the persons in `boxes` (x1, y1, x2, y2)."""
    if not len(boxes):
        return []
    points, point_scores = estimator.estimate([image] * len(boxes), list(boxes))
    results = []
    for box, score, pts, kp_scores in zip(boxes, scores, points, point_scores):
        keypoints = [v for (x, y), s in zip(pts.tolist(), kp_scores.tolist()) for v in (x, y, s)]
        x1, y1, x2, y2 = (float(v) for v in box)
        results.append({"category_id": 1, "keypoints": keypoints, "score": float(score) * float(kp_scores.mean()),
                        "bbox": [x1, y1, x2 - x1, y2 - y1]})
    return results


def oks(gt: dict, keypoints: list[float]) -> float:
    """COCO's object keypoint similarity of one prediction against one annotated person."""
    g = np.array(gt["keypoints"], dtype=float).reshape(17, 3)
    d = np.array(keypoints, dtype=float).reshape(17, 3)
    visible = g[:, 2] > 0
    if not visible.any():
        return 0.0
    variance = (2 * SIGMAS) ** 2
    e = ((d[:, 0] - g[:, 0]) ** 2 + (d[:, 1] - g[:, 1]) ** 2) / variance / (gt["area"] + np.spacing(1)) / 2
    return float(np.mean(np.exp(-e[visible])))


def evaluate(coco: COCO, results: list[dict], image_ids: list[int]) -> tuple[float, float]:
    if not results:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its own tables
        found = coco.loadRes(results)
        ev = COCOeval(coco, found, "keypoints")
        ev.params.imgIds = image_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0]), float(ev.stats[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--media", type=Path, default=default_media_dir())
    args = parser.parse_args()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(args.media / GROUND_TRUTH))
    pictures = images(args.media, coco)
    image_ids = sorted(pictures)
    annotated = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=image_ids)) if a["num_keypoints"] > 0]
    onnx_dir = REPO_ROOT / "run" / "onnx"
    prepare(onnx_dir)
    detector = Detector(OnnxModel(onnx_dir / "yolox.onnx"))
    print(f"{len(image_ids)} COCO val2017 images, {len(annotated)} annotated persons with keypoints "
          f"({GROUND_TRUTH})\n")
    print("| pose model | region | boxes | persons | keypoint AP | AP50 | pose ms/person "
          "| OKS of each annotated person (best match) |")
    print("|---|---|---|---|---|---|---|---|")
    for model, refine in ((m, r) for m in MODELS for r in (False, True)):
        estimator = PoseEstimator(model, OnnxModel(onnx_dir / f"{model}.onnx"), refine=refine)
        region = "box, then landmarks (POSE_REFINE)" if refine else "box"
        for mode in ("detected", "ground-truth boxes"):
            spent = 0.0
            results = []
            for image_id, image in pictures.items():
                h, w = image.shape[:2]
                if mode == "detected":
                    [(boxes, scores)] = detector([image], [DEFAULT_MIN_SCORE])
                    boxes = np.clip(boxes, 0, [w, h, w, h])
                else:
                    anns = [a for a in annotated if a["image_id"] == image_id]
                    boxes = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in (a["bbox"] for a in anns)]
                                     ).reshape(-1, 4)
                    scores = np.ones(len(boxes))
                t0 = time.perf_counter()
                found = predict(estimator, image, boxes, scores)
                spent += time.perf_counter() - t0
                results += [{**r, "image_id": image_id} for r in found]
            ap, ap50 = evaluate(coco, results, image_ids)
            best = [max((oks(a, r["keypoints"]) for r in results if r["image_id"] == a["image_id"]), default=0.0)
                    for a in annotated]
            print(f"| {model} | {region} | {mode} | {len(results)} | {ap:.3f} | {ap50:.3f} | "
                  f"{1000 * spent / max(1, len(results)):.1f} | "
                  + " ".join(f"{v:.2f}" for v in best) + " |")
    print("\nOKS per person in the order of the annotations (image id, annotation id): "
          + ", ".join(f"{a['image_id']}/{a['id']}" for a in annotated))
    print(json.dumps({"note": "AP over 3 images and ~10 persons: a coarse check, not a COCO benchmark"}))


if __name__ == "__main__":
    main()
