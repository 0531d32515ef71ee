"""Who is found and who is followed (issue 22, items 1, 3 and 4: detector recall, tracking figures).

    .venv/bin/python bench/people.py                  # towncentre and vtest, every frame
    .venv/bin/python bench/people.py --frames 100     # the first 100 frames of each
    .venv/bin/python bench/people.py --no-tiles --relink-crops /tmp/relinks   # and each re-link, to look at

On the clips in ../shared/media, our detector (detect.py's YOLOX-nano code on the served yolox.onnx, ONNX
Runtime, one thread) runs on every frame once, keeping persons scored above 0.3; every figure below is
computed from those detections at each minimum score.

- **Recall against an independent detector**: OpenMMLab's YOLOX-nano trained on COCO + Human-Art (the
  `yolox_nano_humanart_person_416_end2end.onnx` in ../shared/models, NMS inside, not our weights), run on the
  whole frame and on 2x2 overlapping tiles plus the whole frame, merged (boxes cut by an inner tile edge
  dropped, then NMS): the tiled reference sees small people a 416 px input cannot. A reference person is
  found when one of ours overlaps it with IoU >= 0.5 (greedy, best first). Printed by the reference
  person's height, since small people are what a 416 px detector loses; "extra" are ours matching no
  reference person (not necessarily wrong: neither detector is ground truth).
- **Ours on tiles**: the same tiling with our own detector, as the detect stage does with
  POSEMESH_DETECT_TILES=1 (here on the full-resolution frame; the stage decodes the JPEG at half size).
- **Tracking**: the track stage's TaskTracker (ByteTrack from `trackers`, the stage's settings) on our
  detections at two minimum scores, for several memories (POSEMESH_TRACK_MEMORY_S): ids, and the
  ids' lifetimes (first to last frame seen): short-lived ids are fragments of someone's track. Switches
  need identities nobody annotated here, so they are not counted; with re-linking (POSEMESH_TRACK_RELINK_S)
  each re-link can be looked at: `--relink-crops DIR` writes the forgotten track's last box and the new
  track's first side by side, for a person to say whether they are the same one.

Deterministic (ONNX Runtime on the CPU): no ratios to time; the milliseconds are this machine's, noisy.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cv2
import numpy as np
import supervision as sv

from bench.loop import OnnxModel
from posemesh.mesh import media
from posemesh.mesh.models import prepare
from posemesh.mesh.settings import REPO_ROOT, Settings, default_media_dir, default_models_dir
from posemesh.stages.detect import DEFAULT_MIN_SCORE, Detector, letterbox, merge_tiles, tiles
from posemesh.stages.track import TaskTracker

CLIPS = ("towncentre_1080p_302f.mp4", "vtest_opencv_480x360.mp4")
REFERENCE_MODEL = "yolox_nano_humanart_person_416_end2end.onnx"
REFERENCE_MIN_SCORE = 0.5
LEAST_SCORE = 0.3  # ours are kept down to this once, then counted above each threshold
THRESHOLDS = (0.3, 0.4, 0.5)
MEMORIES_S = (1.0, 2.0, 3.0)
RELINKS_S = (3.0, 5.0, 10.0)  # POSEMESH_TRACK_RELINK_S, at the default min score and memory
TRACK_THRESHOLDS = (0.4, 0.5)  # the tracker's threshold is the detector's (stages/track.py)
HEIGHTS = ((0, 60), (60, 100), (100, 200), (200, 10_000))  # reference person's box height, frame pixels
LIFETIMES_S = ((0, 1), (1, 3), (3, 10), (10, 1e9))
MATCH_IOU = 0.5


class ReferenceDetector:
    """OpenMMLab's YOLOX-nano (COCO + Human-Art), NMS inside the graph: `dets` [1, N, 5] in input pixels."""

    def __init__(self, path: Path):
        self.model = OnnxModel(path)

    def __call__(self, image: np.ndarray, min_score: float) -> tuple[np.ndarray, np.ndarray]:
        canvas, ratio = letterbox(image)
        out = self.model(input=canvas[None].astype(np.float32))
        dets, labels = out["dets"][0], out["labels"][0]
        keep = (labels == 0) & (dets[:, 4] > min_score)
        return dets[keep, :4] / ratio, dets[keep, 4]


def tiled(detect, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`detect(picture) -> (boxes, scores)` on the whole frame and on each of its 2x2 tiles, merged as the
    detect stage merges its own with POSEMESH_DETECT_TILES (stages/detect.py)."""
    h, w = image.shape[:2]
    windows = tiles(w, h)
    return merge_tiles([detect(image[y0:y1, x0:x1]) for x0, y0, x1, y1 in windows], windows, w, h)


def matched(reference: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """For each reference box, whether one of ours matches it (greedy by IoU, each of ours used once)."""
    found = np.zeros(len(reference), bool)
    if not len(reference) or not len(ours):
        return found
    overlaps = sv.box_iou_batch(reference, ours)
    used = np.zeros(len(ours), bool)
    for r, o in sorted(zip(*np.nonzero(overlaps >= MATCH_IOU)), key=lambda ro: -overlaps[ro]):
        if not found[r] and not used[o]:
            found[r] = used[o] = True
    return found


def read(clip: Path, frames: int) -> tuple[list[np.ndarray], list[float], float]:
    info = media.probe(clip).video
    images, times = [], []
    for frame in media.FrameReader(clip, info.fps):
        if frames and len(images) >= frames:
            break
        images.append(frame.image)
        times.append(frame.timestamp_s)
    return images, times, info.fps or 30.0


def recall_rows(name: str, reference: list[np.ndarray], ours: list[tuple[np.ndarray, np.ndarray]], what: str,
                ms: float) -> None:
    n = len(reference)
    for threshold in THRESHOLDS:
        kept = [b[s > threshold] for b, s in ours]
        found = [matched(r, k) for r, k in zip(reference, kept)]
        heights = np.concatenate([r[:, 3] - r[:, 1] for r in reference]) if n else np.zeros(0)
        hits = np.concatenate(found) if n else np.zeros(0, bool)
        by_height = []
        for lo, hi in HEIGHTS:
            sel = (heights >= lo) & (heights < hi)
            by_height.append(f"{hits[sel].mean():.2f} ({sel.sum()})" if sel.any() else "-")
        extra = sum(len(k) - f.sum() for k, f in zip(kept, found)) / n
        print(f"| {name} | {what} | {threshold} | {sum(len(k) for k in kept) / n:.2f} | "
              f"{hits.mean() if len(hits) else 0:.2f} | " + " | ".join(by_height) + f" | {extra:.2f} | {ms:.0f} |")


def tracking_rows(name: str, ours: list[tuple[np.ndarray, np.ndarray]], times: list[float], fps: float,
                  images: list[np.ndarray], relink_crops: Path | None) -> None:
    runs = [(t, m, 0.0) for t in TRACK_THRESHOLDS for m in MEMORIES_S]
    runs += [(DEFAULT_MIN_SCORE, Settings().track_memory_s, r) for r in RELINKS_S]
    frame_at = {t: i for i, t in enumerate(times)}
    for threshold, memory_s, relink_s in runs:
        tracker = TaskTracker(fps, threshold, memory_s=memory_s, relink_s=relink_s)
        seen: dict[int, list[float]] = {}
        for (boxes, scores), t in zip(ours, times):
            keep = scores > threshold
            relinks = tracker.relinks
            for track_id in tracker.update(boxes[keep], scores[keep], t):
                if track_id:
                    seen.setdefault(track_id, []).append(t)
            if relink_crops and tracker.relinks > relinks:
                forgotten, box = tracker.last_relink
                save_pair(relink_crops / f"{name.split(' ')[0]}-relink{relink_s:g}s-{tracker.relinks:02d}-"
                          f"id{forgotten.track_id}.png", images[frame_at[forgotten.seen_at]], forgotten.box,
                          images[frame_at[t]], box)
        lives = [max(ts) - min(ts) + 1 / fps for ts in seen.values()]
        bins = [sum(lo <= life < hi for life in lives) for lo, hi in LIFETIMES_S]
        print(f"| {name} | {threshold} | {memory_s:g} | {relink_s:g} | {len(seen)} | {tracker.relinks} | "
              + " | ".join(map(str, bins)) + f" | {np.median(lives) if lives else 0:.1f} |")


def save_pair(path: Path, before: np.ndarray, box_before: np.ndarray, after: np.ndarray, box_after: np.ndarray):
    """The person's last box before the tracker forgot them and the new track's first, side by side (each
    with some context around it, the box outlined), for a person to tell whether they are the same."""
    crops = []
    for image, box in ((before, box_before), (after, box_after)):
        h, w = image.shape[:2]
        pad = 0.5 * (box[3] - box[1])
        x1, y1 = int(max(0, box[0] - pad)), int(max(0, box[1] - pad))
        x2, y2 = int(min(w, box[2] + pad)), int(min(h, box[3] + pad))
        crop = image[y1:y2, x1:x2].copy()
        cv2.rectangle(crop, (int(box[0]) - x1, int(box[1]) - y1), (int(box[2]) - x1, int(box[3]) - y1),
                      (0, 255, 0), 1)
        crops.append(cv2.resize(crop, (int(crop.shape[1] * 240 / crop.shape[0]), 240)))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.hstack([crops[0], np.zeros((240, 8, 3), np.uint8), crops[1]]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--media", type=Path, default=default_media_dir())
    parser.add_argument("--frames", type=int, default=0, help="the first N frames of each clip (0: all)")
    parser.add_argument("--no-tiles", action="store_true", help="skip our detector on tiles (5x the time)")
    parser.add_argument("--relink-crops", type=Path, help="write each re-link's two boxes here, as PNGs to look at")
    args = parser.parse_args()
    onnx_dir = REPO_ROOT / "run" / "onnx"
    prepare(onnx_dir)
    ours_model = Detector(OnnxModel(onnx_dir / "yolox.onnx"))
    reference_model = ReferenceDetector(default_models_dir() / REFERENCE_MODEL)

    def detect(image):
        [(boxes, scores)] = ours_model([image], [LEAST_SCORE])
        h, w = image.shape[:2]
        return np.clip(boxes, 0, [w, h, w, h]), scores

    detections, recall = {}, []
    for clip in CLIPS:
        images, times, fps = read(args.media / clip, args.frames)
        name = f"{clip.split('_')[0]} ({len(images)} frames, {images[0].shape[1]}x{images[0].shape[0]})"
        t0 = time.perf_counter()
        ours = [detect(image) for image in images]
        ms = 1000 * (time.perf_counter() - t0) / len(images)
        t0 = time.perf_counter()
        reference = [tiled(lambda im: reference_model(im, REFERENCE_MIN_SCORE), image)[0] for image in images]
        reference_ms = 1000 * (time.perf_counter() - t0) / len(images)
        whole = [reference_model(image, REFERENCE_MIN_SCORE)[0] for image in images]
        recall.append((name, reference, whole, ours, ms, reference_ms))
        if not args.no_tiles:
            t0 = time.perf_counter()
            recall[-1] += ([tiled(detect, image) for image in images], 1000 * (time.perf_counter() - t0) / len(images))
        detections[name] = (ours, times, fps, images)

    print("## Recall against the independent detector\n")
    print(f"Reference: {REFERENCE_MODEL}, score > {REFERENCE_MIN_SCORE}, on the whole frame and 2x2 tiles "
          f"(persons per frame: " + ", ".join(f"{r[0].split(' ')[0]} {sum(map(len, r[1])) / len(r[1]):.2f} tiled, "
                                               f"{sum(map(len, r[2])) / len(r[2]):.2f} whole frame" for r in recall)
          + f"; tiled reference {', '.join(f'{r[5]:.0f}' for r in recall)} ms/frame). Recall by the reference "
          "person's height in pixels, (n) reference persons.\n")
    print("| clip | ours | min score | persons/frame | recall | <60 px | 60-100 | 100-200 | >=200 | extra/frame "
          "| ms/frame |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, reference, _whole, ours, ms, _rms, *tiles_run in recall:
        recall_rows(name, reference, ours, "whole frame (the stage)", ms)
        if tiles_run:
            recall_rows(name, reference, tiles_run[0], "2x2 tiles + whole", tiles_run[1])
    print(f"\n## Tracking: the track stage's ByteTrack on our detections (default min score {DEFAULT_MIN_SCORE})\n")
    print("| clip | min score | memory s | re-link s | ids | re-links | lived < 1 s | 1-3 s | 3-10 s | >= 10 s "
          "| median life s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (ours, times, fps, images) in detections.items():
        tracking_rows(name, ours, times, fps, images, args.relink_crops)


if __name__ == "__main__":
    main()
