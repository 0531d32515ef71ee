"""What the frames' JPEG quality (POSEMESH_JPEG_QUALITY) costs and what it changes in the results.

    .venv/bin/python bench/jpeg_quality.py [--frames 60]

Every frame crosses the broker as a JPEG: the frame producer encodes it once, detect decodes it at a reduced
scale, pose and annotate decode it in full, and the broker writes it once and serves it three times (the
broker's CPU per frame follows those bytes: bench/README.md). For each quality, on the first frames of
towncentre (1080p, small people) and vtest (480x360): bytes per frame, CPU ms to encode and to decode in full
and at detect's scale, and what the models make of the decoded pictures against the decoder's own picture
(never compressed): the persons detect finds (recall and extras at IoU 0.5) and the keypoints pose gives for
the same boxes (distance as a share of the box height: median and 95th percentile, over keypoints scored
above 0.5). The stages' own code (detect.py, pose.py) on the prepared ONNX files, one ONNX Runtime thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from bench.loop import OnnxModel
from bench.people import matched
from posemesh.mesh import jpeg, media
from posemesh.mesh.models import prepare
from posemesh.mesh.settings import REPO_ROOT, default_media_dir
from posemesh.stages.detect import DEFAULT_MIN_SCORE, Detector, decode_for_detection
from posemesh.stages.pose import PoseEstimator

QUALITIES = (95, 90, 85, 80, 75)
CLIPS = ("towncentre_1080p_302f.mp4", "vtest_opencv_480x360.mp4")


def cpu_ms(fn, items) -> tuple[float, list]:
    """CPU ms per item of fn, timed on a pass that keeps nothing (keeping 60 decoded 1080p pictures costs more in
    fresh memory than the decoding), and the results of a second pass."""
    start = time.process_time()
    for x in items:
        fn(x)
    return 1000 * (time.process_time() - start) / len(items), [fn(x) for x in items]


def keypoints(estimator: PoseEstimator, image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not len(boxes):
        return np.zeros((0, 17, 2)), np.zeros((0, 17))
    return estimator.estimate([image] * len(boxes), [tuple(b) for b in boxes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--pose-model", default="blazepose_lite")
    args = parser.parse_args()
    onnx_dir = REPO_ROOT / "run" / "onnx"
    prepare(onnx_dir)
    detector = Detector(OnnxModel(onnx_dir / "yolox.onnx"))
    estimator = PoseEstimator(args.pose_model, OnnxModel(onnx_dir / f"{args.pose_model}.onnx"))
    print("| clip | quality | kB/frame | encode ms | decode ms (full) | decode ms (detect's scale) | person recall "
          "| extra persons/frame | keypoint distance / box height: median | 95th percentile |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in CLIPS:
        path = default_media_dir() / name
        reader = media.FrameReader(path, media.probe(path).video.fps)
        pictures = [f.image for f, _ in zip(reader, range(args.frames))]
        h, w = pictures[0].shape[:2]
        truth = [detector([p], [DEFAULT_MIN_SCORE])[0] for p in pictures]
        truth_points = [keypoints(estimator, p, boxes) for p, (boxes, _s) in zip(pictures, truth)]
        for quality in QUALITIES:
            enc_ms, data = cpu_ms(lambda p, q=quality: jpeg.encode(p, q), pictures)
            full_ms, decoded = cpu_ms(jpeg.decode, data)
            small_ms, small = cpu_ms(lambda d, w=w, h=h: decode_for_detection(d, w, h), data)
            found = extra = total = 0
            distances = []
            for i, (image, factor) in enumerate(small):
                boxes, _scores = _detect_scaled(detector, image, factor)
                true_boxes = truth[i][0]
                total += len(true_boxes)
                hits = int(matched(true_boxes, boxes).sum())  # one to one, as bench/people.py counts
                found, extra = found + hits, extra + len(boxes) - hits
                points, _ = keypoints(estimator, decoded[i], true_boxes)
                ref_points, ref_scores = truth_points[i]
                heights = (true_boxes[:, 3] - true_boxes[:, 1])[:, None] if len(true_boxes) else np.zeros((0, 1))
                d = np.linalg.norm(points - ref_points, axis=-1) / np.maximum(heights, 1)
                distances += d[ref_scores > 0.5].tolist()
            n = len(pictures)
            kb = np.mean([len(d) for d in data]) / 1000
            print(f"| {name.split('_')[0]} ({n} frames, {w}x{h}) | {quality} | {kb:.0f} "
                  f"| {enc_ms:.2f} | {full_ms:.2f} | {small_ms:.2f} | {found / max(total, 1):.3f} | {extra / n:.2f} "
                  f"| {np.median(distances):.4f} | {np.percentile(distances, 95):.4f} |", flush=True)


def _detect_scaled(detector: Detector, image: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """The detect stage's persons on a picture decoded at a reduced scale, in frame pixels."""
    [(boxes, scores)] = detector([image], [DEFAULT_MIN_SCORE])
    return boxes * factor, scores


if __name__ == "__main__":
    main()
