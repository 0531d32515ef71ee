"""A decoded video frame to JPEG, the two ways the mesh has (mesh/media.py's frame_jpeg): through a BGR picture, or
from the decoder's own YUV planes (what an untagged or BT.601 4:2:0 video now takes).

    .venv/bin/python bench/frame_jpeg.py [--frames 100] [--rounds 3]

On the first frames of towncentre (1080p, untagged, limited range), at the mesh's JPEG quality, alternated in
rounds in one process: CPU ms a frame for decoding alone and for decoding plus each way to JPEG, kB a frame; how far
each JPEG's decoded picture is from the frame's colours computed exactly (floats, BT.601), mean absolute and mean
signed, in levels of 0-255; and what the stages make of the two JPEGs: persons detect finds in the planes' JPEG
against those it finds in the BGR one (IoU 0.5, one to one), and how far pose's keypoints move for the same boxes
(a share of the box height, over keypoints scored above 0.5). The stages' own code on the prepared ONNX files. And
the stages' full decode of a frame's JPEG with libjpeg-turbo's chroma smoothing and with its fast upsampling
(repeating each chroma sample: what mesh/jpeg.py's decode does).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np
import simplejpeg

from bench.jpeg_quality import _detect_scaled, keypoints
from bench.loop import OnnxModel
from bench.people import matched
from posemesh.mesh import jpeg, media
from posemesh.mesh.models import prepare
from posemesh.mesh.settings import JPEG_QUALITY, REPO_ROOT, default_media_dir
from posemesh.stages.detect import Detector, decode_for_detection
from posemesh.stages.pose import PoseEstimator

CLIP = "towncentre_1080p_302f.mp4"
WAYS = {
    "decode only": lambda f, q: b"",
    "through BGR": lambda f, q: jpeg.encode(f.image, q),
    "from planes": lambda f, q: f.jpeg(q)[0],
}


def exact_bgr(frame) -> np.ndarray:
    """A limited-range BT.601 4:2:0 frame's colours in floats (chroma upsampled bilinearly), rounded."""
    w, h = frame.width, frame.height
    y, cb, cr = (np.frombuffer(p, np.uint8).reshape(-1, p.line_size)[:, :pw]
                 for p, pw in zip(frame.planes, (w, w // 2, w // 2)))
    luma = (y.astype(np.float32) - 16) * 255 / 219
    cb, cr = ((cv2.resize(c, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32) - 128) * 255 / 224
              for c in (cb, cr))
    bgr = np.stack([luma + 1.772 * cb, luma - 0.344136 * cb - 0.714136 * cr, luma + 1.402 * cr], -1)
    return np.clip(np.round(bgr), 0, 255)


def timed(path: Path, fps: float, frames: int, way: str, quality: int) -> tuple[float, float]:
    """CPU ms and kB a frame of decoding `frames` frames and taking each to JPEG one way."""
    start, size, n = time.process_time(), 0, 0
    for frame in media.FrameReader(path, fps):
        size += len(WAYS[way](frame, quality))
        n += 1
        if n == frames:
            break
    return 1000 * (time.process_time() - start) / n, size / n / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compared", type=int, default=20, help="frames whose colours and results are compared")
    parser.add_argument("--pose-model", default="blazepose_lite")
    args = parser.parse_args()
    path = default_media_dir() / CLIP
    fps = media.probe(path).video.fps
    quality = JPEG_QUALITY
    print(f"{CLIP}, quality {quality}, {args.frames} frames a pass")
    cpu: dict[str, list[float]] = {way: [] for way in WAYS}
    kb: dict[str, float] = {}
    for _ in range(args.rounds):
        for way in WAYS:
            ms, kb[way] = timed(path, fps, args.frames, way, quality)
            cpu[way].append(ms)
    print("| way | CPU ms a frame (each round) | kB a frame |")
    print("|---|---|---|")
    for way in WAYS:
        print(f"| {way} | {' / '.join(f'{ms:.2f}' for ms in cpu[way])} | {kb[way]:.1f} |")

    onnx_dir = REPO_ROOT / "run" / "onnx"
    prepare(onnx_dir)
    detector = Detector(OnnxModel(onnx_dir / "yolox.onnx"))
    estimator = PoseEstimator(args.pose_model, OnnxModel(onnx_dir / f"{args.pose_model}.onnx"))
    error = {way: [] for way in ("through BGR", "from planes")}
    bias = {way: [] for way in error}
    found = total = 0
    distances: list[float] = []
    for n, frame in enumerate(media.FrameReader(path, fps)):
        if n == args.compared:
            break
        exact = exact_bgr(frame.frame)
        data = {way: WAYS[way](frame, quality) for way in error}
        for way, jpg in data.items():
            diff = jpeg.decode(jpg).astype(np.float32) - exact
            error[way].append(np.abs(diff).mean())
            bias[way].append(diff.mean())
        w, h = frame.frame.width, frame.frame.height
        (bgr_boxes, _), (plane_boxes, _) = (_detect_scaled(detector, *decode_for_detection(data[way], w, h))
                                            for way in ("through BGR", "from planes"))
        total += len(bgr_boxes)
        found += int(matched(bgr_boxes, plane_boxes).sum())
        ref_points, ref_scores = keypoints(estimator, jpeg.decode(data["through BGR"]), bgr_boxes)
        points, _ = keypoints(estimator, jpeg.decode(data["from planes"]), bgr_boxes)
        heights = (bgr_boxes[:, 3] - bgr_boxes[:, 1])[:, None] if len(bgr_boxes) else np.zeros((0, 1))
        distances += (np.linalg.norm(points - ref_points, axis=-1) / np.maximum(heights, 1))[ref_scores > 0.5].tolist()
    decode_ms: dict[str, list[float]] = {"smoothing": [], "repeating": []}
    data = media.frame_jpeg(next(iter(media.FrameReader(path, fps))).frame, quality)[0]
    for _ in range(args.rounds):
        for way, fast in (("smoothing", False), ("repeating", True)):
            start = time.process_time()
            for _ in range(50):
                simplejpeg.decode_jpeg(data, "BGR", fastupsample=fast)
            decode_ms[way].append(1000 * (time.process_time() - start) / 50)
    smooth = simplejpeg.decode_jpeg(data, "BGR").astype(np.int16)
    apart = np.abs(smooth - simplejpeg.decode_jpeg(data, "BGR", fastupsample=True))
    print("\nthe stages' full decode of a frame's JPEG (mesh/jpeg.py's decode), chroma upsampled by smoothing "
          "(libjpeg-turbo's default) or by repeating: CPU ms (each round)")
    for way, ms in decode_ms.items():
        print(f"  {way}: {' / '.join(f'{m:.2f}' for m in ms)}")
    print(f"  pixels apart: mean {apart.mean():.2f} levels, 99th percentile {np.percentile(apart, 99):.0f}")
    print(f"\ncolours against the exact conversion, {args.compared} frames (levels of 0-255):")
    for way in error:
        print(f"  {way}: mean absolute {np.mean(error[way]):.2f}, mean signed {np.mean(bias[way]):+.2f}")
    print(f"persons found in the planes' JPEG among those found in the BGR one: {found} of {total}; keypoints "
          f"moved (share of box height) median {np.median(distances):.4f}, 95th percentile "
          f"{np.percentile(distances, 95):.4f}")


if __name__ == "__main__":
    main()
