"""The detect stage's least person score as a setting (POSEMESH_DETECT_MIN_SCORE), on the real Triton server
and a real crowd frame, and the track stage agreeing with it (every detection it passes on gets an id)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import supervision as sv

from posemesh.mesh import jpeg
from posemesh.mesh.settings import Settings
from posemesh.stages.base import FrameItem, TaskInfo
from posemesh.stages.detect import DetectStage
from posemesh.stages.track import TrackStage
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb
from tests.conftest import media


def detect_and_track(image, options: tpb.TaskOptions) -> list[tpb.Person]:
    height, width = image.shape[:2]
    frame = pb.Frame(index=0, timestamp_s=0.0, width=width, height=height, jpeg=jpeg.encode(image, 90))
    item = FrameItem(TaskInfo("t", options=options, video=tpb.VideoInfo(fps=25.0)), frame)
    detect, track = DetectStage(), TrackStage()
    detect.setup(Settings())
    track.setup(Settings())
    try:
        detect.process([item])
    finally:
        detect.close()
    track.process([item])
    return list(item.frame.persons)


@pytest.fixture(scope="module")
def crowd():
    return cv2.imread(str(media("posetrack18_012834_000000.jpg")))  # small, occluded people: many near 0.5


def test_the_setting_lowers_the_score_the_detector_keeps_and_the_tracker_follows(triton, crowd, monkeypatch):
    monkeypatch.setenv("POSEMESH_TRITON_URL", triton.url)
    default = detect_and_track(crowd, tpb.TaskOptions())
    assert min(p.score for p in default) > 0.5
    monkeypatch.setenv("POSEMESH_DETECT_MIN_SCORE", "0.3")
    lower = detect_and_track(crowd, tpb.TaskOptions())
    assert len(lower) > len(default) and min(p.score for p in lower) > 0.3
    assert min(p.score for p in lower) <= 0.5
    # The tracker starts a track for every detection it gets, the low-scored ones too.
    assert all(p.track_id > 0 for p in lower) and len({p.track_id for p in lower}) == len(lower)
    # A task's own min_person_score still wins over the setting.
    own = detect_and_track(crowd, tpb.TaskOptions(min_person_score=0.6))
    assert min(p.score for p in own) > 0.6 and len(own) <= len(default)


def test_a_region_of_interest_and_max_persons_choose_who_is_kept(triton, crowd, monkeypatch):
    """TaskOptions.region_of_interest keeps persons whose box centre is inside the polygon;
    max_persons keeps the highest-scoring ones after it."""
    monkeypatch.setenv("POSEMESH_TRITON_URL", triton.url)
    everyone = detect_and_track(crowd, tpb.TaskOptions())
    height = crowd.shape[0]
    centre_x = [(p.box.x1 + p.box.x2) / 2 for p in everyone]
    assert len(everyone) >= 3
    split = sum(sorted(centre_x)[1:3]) / 2  # two persons' centres left of it, the others right
    left = [tpb.Point(x=0, y=0), tpb.Point(x=split, y=0), tpb.Point(x=split, y=height), tpb.Point(x=0, y=height)]
    inside = detect_and_track(crowd, tpb.TaskOptions(region_of_interest=left))
    assert len(inside) == 2
    assert sorted(p.score for p in inside) == sorted(p.score for p, x in zip(everyone, centre_x) if x <= split)
    top = detect_and_track(crowd, tpb.TaskOptions(max_persons=2))
    assert [p.score for p in top] == sorted((p.score for p in everyone), reverse=True)[:2]
    both = detect_and_track(crowd, tpb.TaskOptions(region_of_interest=left, max_persons=1))
    assert [p.score for p in both] == [max(p.score for p in inside)]


def test_tiles_find_the_small_people_the_whole_frame_loses(triton, monkeypatch):
    """POSEMESH_DETECT_TILES: a 1080p towncentre frame looked at whole and in 2x2 tiles finds more people, and
    every person found in the whole frame is found again (a box overlapping it by IoU >= 0.5); each person is
    found once (the tiles' duplicates merged), and the tracker gives each an id."""
    import av

    with av.open(str(media("towncentre_1080p_302f.mp4"))) as c:
        frame = next(c.decode(video=0)).to_ndarray(format="bgr24")
    monkeypatch.setenv("POSEMESH_TRITON_URL", triton.url)
    whole = detect_and_track(frame, tpb.TaskOptions())
    monkeypatch.setenv("POSEMESH_DETECT_TILES", "1")
    tiled = detect_and_track(frame, tpb.TaskOptions())
    assert len(tiled) > len(whole) >= 5
    whole_boxes, tiled_boxes = _boxes(whole), _boxes(tiled)
    assert (sv.box_iou_batch(whole_boxes, tiled_boxes).max(axis=1) >= 0.5).all(), "a person of the whole frame was lost"
    among_tiled = sv.box_iou_batch(tiled_boxes, tiled_boxes)
    np.fill_diagonal(among_tiled, 0)
    assert among_tiled.max() < 0.5, "a person found twice"
    assert all(p.track_id > 0 for p in tiled) and len({p.track_id for p in tiled}) == len(tiled)


def _boxes(persons):
    return np.array([[p.box.x1, p.box.y1, p.box.x2, p.box.y2] for p in persons])

