"""A finished task's keypoints in the formats analysis tools read, made from its keypoints.jsonl (no model
runs again). Annotate writes them next to the JSON lines when it publishes a task's results.

- COCO keypoint results (`coco.json`): the list pycocotools' `COCO.loadRes` reads. One entry per person
  per frame: `image_id` = frame index + 1 (COCO ids start at 1; `timestamp_s` says when the frame is in the
  video), `category_id` 1 (person), `keypoints` [x, y, v] x 17 in COCO order with v = the keypoint's score
  (results files carry a confidence there; evaluation ignores it), `score` the person's, `bbox` [x, y, w, h],
  and `track_id`.
- MOT Challenge tracks (`tracks.txt`): `frame,id,bb_left,bb_top,bb_width,bb_height,conf,-1,-1,-1`, frames
  and pixel coordinates 1-based as in the MOT Challenge's own files (bb_left = x1 + 1: py-motmetrics'
  reader subtracts the 1 again), one line per tracked person (persons without a track id are left out:
  MOT has no such row), readable by py-motmetrics (`mot15-2D`) and TrackEval.
- CSV (`keypoints.csv`): a header naming every column, then one row per person per frame: index,
  timestamp_s, track_id, box (x1, y1, x2, y2), score, and x, y, score of each of the 17 keypoints.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

# COCO-17 keypoint names, in COCO order.
COCO_KEYPOINTS = ("nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
                  "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip", "left_knee",
                  "right_knee", "left_ankle", "right_ankle")
PERSON_CATEGORY = 1

CSV_HEADER = (["index", "timestamp_s", "track_id", "box_x1", "box_y1", "box_x2", "box_y2", "score"]
              + [f"{name}_{part}" for name in COCO_KEYPOINTS for part in ("x", "y", "score")])


def frames(keypoints_jsonl: Path) -> Iterator[dict]:
    with open(keypoints_jsonl, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def _keypoints(person: dict) -> list[list[float]]:
    kps = person.get("keypoints") or []
    return kps if len(kps) == len(COCO_KEYPOINTS) else [[0.0, 0.0, 0.0]] * len(COCO_KEYPOINTS)


def coco_image_id(index: int) -> int:
    return index + 1


class CocoExport:
    """COCO keypoint results, written as one JSON array without holding the whole task in memory."""

    def __init__(self, f):
        self.f, self.first = f, True
        f.write("[")

    def person(self, frame: dict, person: dict) -> None:
        x1, y1, x2, y2 = person["box"]
        entry = {"image_id": coco_image_id(frame["index"]), "category_id": PERSON_CATEGORY,
                 "keypoints": [v for kp in _keypoints(person) for v in kp], "score": person["score"],
                 "bbox": [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)], "track_id": person["track_id"]}
        self.f.write(("" if self.first else ",\n") + json.dumps(entry))
        self.first = False

    def close(self) -> None:
        self.f.write("]\n")


class MotExport:
    def __init__(self, f):
        self.f = f

    def person(self, frame: dict, person: dict) -> None:
        if person["track_id"] <= 0:
            return
        x1, y1, x2, y2 = person["box"]
        self.f.write(f"{frame['index'] + 1},{person['track_id']},{x1 + 1:.2f},{y1 + 1:.2f},"
                     f"{x2 - x1:.2f},{y2 - y1:.2f},{person['score']:.4f},-1,-1,-1\n")

    def close(self) -> None:
        pass


class CsvExport:
    def __init__(self, f):
        self.writer = csv.writer(f)
        self.writer.writerow(CSV_HEADER)

    def person(self, frame: dict, person: dict) -> None:
        self.writer.writerow([frame["index"], frame["timestamp_s"], person["track_id"], *person["box"],
                              person["score"], *(v for kp in _keypoints(person) for v in kp)])

    def close(self) -> None:
        pass


FORMATS = {"coco": CocoExport, "mot": MotExport, "csv": CsvExport}


def write(keypoints_jsonl: Path, outputs: dict[str, Path]) -> None:
    """Every export in `outputs` ({format: file}) from one pass over the keypoints."""
    with ExitStack() as files:
        exports = [FORMATS[fmt](files.enter_context(open(path, "w", encoding="utf-8", newline="")))
                   for fmt, path in outputs.items()]
        for frame in frames(keypoints_jsonl):
            for person in frame["persons"]:
                for export in exports:
                    export.person(frame, person)
        for export in exports:
            export.close()


def write_coco(keypoints_jsonl: Path, out: Path) -> None:
    write(keypoints_jsonl, {"coco": out})


def write_mot(keypoints_jsonl: Path, out: Path) -> None:
    write(keypoints_jsonl, {"mot": out})


def write_csv(keypoints_jsonl: Path, out: Path) -> None:
    write(keypoints_jsonl, {"csv": out})
