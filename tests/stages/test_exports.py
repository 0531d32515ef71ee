"""The exports of a task's keypoints (stages/exports.py) read by the libraries analysts use: pycocotools for
COCO keypoint results, py-motmetrics for MOT Challenge tracks, the csv module for the CSV. The keypoints
here are a synthetic JSONL of the shape annotate writes; tests/test_outputs.py checks a real task's."""

from __future__ import annotations

import csv
import json
import random

import motmetrics
import numpy as np
from pycocotools.coco import COCO
from trackers.eval.evaluate import evaluate_mot_sequence

from posemesh.stages import exports

WIDTH, HEIGHT = 640, 360


def keypoints_jsonl(path, frames: int = 6, seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for index in range(frames):
        persons = []
        for track_id in (3, 0, 11)[: 1 + index % 3]:  # 0: a detection the tracker gave no id
            x1, y1 = rng.uniform(0, 400), rng.uniform(0, 200)
            persons.append({"track_id": track_id, "box": [round(x1, 2), round(y1, 2), round(x1 + 80, 2),
                                                          round(y1 + 150, 2)],
                            "score": round(rng.uniform(0.3, 1), 4),
                            "keypoints": [[round(x1 + rng.uniform(0, 80), 2), round(y1 + rng.uniform(0, 150), 2),
                                           round(rng.uniform(0, 1), 4)] for _ in range(17)]})
        records.append({"index": index, "timestamp_s": round(index / 25, 6), "width": WIDTH, "height": HEIGHT,
                        "persons": persons})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def coco_ground(records: list[dict]) -> COCO:
    """A COCO object holding the frames as images (image_id = index + 1, as exports.py documents)."""
    ground = COCO()
    ground.dataset = {"images": [{"id": exports.coco_image_id(r["index"]), "width": r["width"],
                                  "height": r["height"], "file_name": f"frame-{r['index']:06d}"} for r in records],
                      "categories": [{"id": 1, "name": "person", "keypoints": list(exports.COCO_KEYPOINTS)}],
                      "annotations": []}
    ground.createIndex()
    return ground


def test_coco_results_load_in_pycocotools_and_match_the_keypoints(tmp_path):
    records = keypoints_jsonl(tmp_path / "k.jsonl")
    exports.write_coco(tmp_path / "k.jsonl", tmp_path / "coco.json")
    loaded = coco_ground(records).loadRes(str(tmp_path / "coco.json"))
    anns = loaded.loadAnns(loaded.getAnnIds())
    expected = [(r["index"], p) for r in records for p in r["persons"]]
    assert len(anns) == len(expected)
    for ann, (index, person) in zip(sorted(anns, key=lambda a: a["id"]), expected):
        assert ann["image_id"] == index + 1 and ann["category_id"] == 1
        assert ann["track_id"] == person["track_id"] and ann["score"] == person["score"]
        assert np.allclose(np.array(ann["keypoints"]).reshape(17, 3), person["keypoints"])


def test_mot_tracks_load_in_motmetrics_and_hold_every_tracked_person(tmp_path):
    records = keypoints_jsonl(tmp_path / "k.jsonl")
    exports.write_mot(tmp_path / "k.jsonl", tmp_path / "tracks.txt")
    tracks = motmetrics.io.loadtxt(str(tmp_path / "tracks.txt"), fmt="mot15-2D")
    expected = {(r["index"] + 1, p["track_id"]): p for r in records for p in r["persons"] if p["track_id"] > 0}
    assert set(tracks.index) == set(expected)  # frames 1-based; persons without a track id left out
    for (frame, track_id), row in tracks.iterrows():
        x1, y1, x2, y2 = expected[(frame, track_id)]["box"]
        assert np.allclose([row.X, row.Y, row.Width, row.Height], [x1, y1, x2 - x1, y2 - y1], atol=0.01)
    # Scored as a tracker's output by TrackEval's metrics (Roboflow trackers' port) against ground truth
    # written from the same keypoints in the MOT ground-truth layout: every box found, no identity switch.
    ground = []
    for (frame, track_id), person in sorted(expected.items()):
        x1, y1, x2, y2 = person["box"]
        ground.append(f"{frame},{track_id},{x1 + 1},{y1 + 1},{x2 - x1},{y2 - y1},1,1,1\n")
    (tmp_path / "gt.txt").write_text("".join(ground))
    scores = evaluate_mot_sequence(tmp_path / "gt.txt", tmp_path / "tracks.txt", metrics=["CLEAR", "Identity"])
    assert scores.CLEAR.CLR_TP == len(expected) and scores.CLEAR.CLR_FP == scores.CLEAR.CLR_FN == 0
    assert scores.CLEAR.IDSW == 0 and scores.CLEAR.MOTA == 1.0 and scores.Identity.IDF1 == 1.0


def test_csv_has_a_header_naming_every_column_and_a_row_per_person_per_frame(tmp_path):
    records = keypoints_jsonl(tmp_path / "k.jsonl")
    exports.write_csv(tmp_path / "k.jsonl", tmp_path / "k.csv")
    with open(tmp_path / "k.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == exports.CSV_HEADER and len(exports.CSV_HEADER) == 8 + 17 * 3
    expected = [(r, p) for r in records for p in r["persons"]]
    assert len(rows) == len(expected)
    for row, (record, person) in zip(rows, expected):
        assert int(row["index"]) == record["index"] and float(row["timestamp_s"]) == record["timestamp_s"]
        assert int(row["track_id"]) == person["track_id"] and float(row["score"]) == person["score"]
        assert [float(row[c]) for c in ("box_x1", "box_y1", "box_x2", "box_y2")] == person["box"]
        assert float(row["left_ankle_y"]) == person["keypoints"][15][1]
        assert float(row["right_ankle_score"]) == person["keypoints"][16][2]


def test_a_task_without_persons_exports_empty_but_valid_files(tmp_path):
    (tmp_path / "k.jsonl").write_text(json.dumps({"index": 0, "timestamp_s": 0.0, "width": 8, "height": 8,
                                                  "persons": []}) + "\n")
    exports.write_coco(tmp_path / "k.jsonl", tmp_path / "coco.json")
    exports.write_mot(tmp_path / "k.jsonl", tmp_path / "tracks.txt")
    exports.write_csv(tmp_path / "k.jsonl", tmp_path / "k.csv")
    assert json.loads((tmp_path / "coco.json").read_text()) == []
    assert (tmp_path / "tracks.txt").read_text() == ""
    assert (tmp_path / "k.csv").read_text().splitlines() == [",".join(exports.CSV_HEADER)]
