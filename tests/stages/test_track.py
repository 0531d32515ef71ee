"""The track stage's memory for people the detector loses for a while (stages/track.py), in seconds of the
video at any frame rate: the real ByteTrack on synthetic detections."""

from __future__ import annotations

import numpy as np
import pytest

from posemesh.mesh.settings import Settings
from posemesh.stages.track import TaskTracker, TrackStage


def walk(tracker: TaskTracker, fps: float, gap_s: float, seen_s: float = 1.0) -> tuple[list[int], list[int]]:
    """A person walking right at 40 px/s, detected for seen_s, not at all for gap_s (the next detection comes
    gap_s after the last one), then detected for seen_s again; another person stands still far away all
    along. Returns the walker's ids before and after the gap."""
    frames = int(round(seen_s * fps))
    missing = int(round(gap_s * fps)) - 1
    before, after = [], []
    for i in range(2 * frames + missing):
        t = i / fps
        x = 100 + 40 * t
        boxes = [[1000, 100, 1050, 220]]
        visible = i < frames or i >= frames + missing
        if visible:
            boxes.append([x, 300, x + 50, 420])
        ids = tracker.update(np.array(boxes, np.float32), np.full(len(boxes), 0.9, np.float32), t)
        if visible:
            (before if i < frames else after).append(ids[1])
        assert ids[0] == 1  # the standing person keeps the first id throughout
    return before, after


@pytest.mark.parametrize("fps", [25.0, 10.0, 30.0])
def test_a_person_unseen_for_1_5_s_keeps_their_id(fps):
    before, after = walk(TaskTracker(fps, 0.5, memory_s=Settings().track_memory_s), fps, gap_s=1.5)
    assert set(before) == set(after) == {2}


@pytest.mark.parametrize("fps", [25.0, 10.0])
def test_a_person_unseen_longer_than_the_memory_gets_a_new_id(fps):
    before, after = walk(TaskTracker(fps, 0.5, memory_s=2.0), fps, gap_s=2.6)
    assert set(before) == {2} and set(after) == {3}
    # The former one-second memory (30 frames at 30 fps) lost the 1.5 s gap the default bridges.
    before, after = walk(TaskTracker(fps, 0.5, memory_s=1.0), fps, gap_s=1.5)
    assert set(before) == {2} and set(after) == {3}


def test_the_memory_is_a_setting_in_seconds(monkeypatch):
    monkeypatch.setenv("POSEMESH_TRACK_MEMORY_S", "3.0")
    stage = TrackStage()
    stage.setup(Settings())
    assert stage.memory_s == 3.0 and stage.min_iou == 0.1
    before, after = walk(TaskTracker(25.0, 0.5, stage.memory_s, stage.min_iou), 25.0, gap_s=2.6)
    assert set(before) == set(after) == {2}
    monkeypatch.delenv("POSEMESH_TRACK_MEMORY_S")
    assert Settings().track_memory_s == 2.0


def test_relinking_is_off_by_default_and_a_setting(monkeypatch):
    assert Settings().track_relink_s == 0
    monkeypatch.setenv("POSEMESH_TRACK_RELINK_S", "4")
    stage = TrackStage()
    stage.setup(Settings())
    assert stage.relink_s == 4.0


@pytest.mark.parametrize("fps", [25.0, 10.0])
def test_a_walker_forgotten_by_the_tracker_gets_their_id_back_where_they_walked_on_to(fps):
    """Unseen for 2.6 s with a 1 s memory: ByteTrack forgets the walker; re-linking finds the new track
    where the old one's velocity (40 px/s) says it would be by now, and hands it the old id."""
    tracker = TaskTracker(fps, 0.5, memory_s=1.0, relink_s=4.0)
    before, after = walk(tracker, fps, gap_s=2.6)
    assert set(before) == set(after) == {2} and tracker.relinks == 1
    # Not when the gap is longer than relink_s.
    tracker = TaskTracker(fps, 0.5, memory_s=1.0, relink_s=2.0)
    before, after = walk(tracker, fps, gap_s=2.6)
    assert set(before) == {2} and set(after) == {3} and tracker.relinks == 0


def standing(tracker: TaskTracker, fps: float, people: list[list[float]], then: list[list[float]],
             gap_s: float = 3.0) -> list[int]:
    """`people` stand still for a second, nobody is seen for gap_s, then `then` stand there: their ids."""
    for i in range(int(fps)):
        tracker.update(np.array(people, np.float32), np.full(len(people), 0.9, np.float32), i / fps)
    t = (int(fps) - 1) / fps + gap_s
    return tracker.update(np.array(then, np.float32), np.full(len(then), 0.9, np.float32), t)


def test_a_new_track_that_two_forgotten_ones_fit_about_as_well_keeps_its_new_id():
    """A wrong re-link is an id switch: when two forgotten people fit nearly as well, nobody's id is handed on;
    where one clearly fits, it is."""
    two = [[100, 300, 150, 420], [160, 300, 210, 420]]
    assert standing(TaskTracker(10.0, 0.5, memory_s=1.0, relink_s=5.0), 10.0, two, [[130, 300, 180, 420]]) == [3]
    assert standing(TaskTracker(10.0, 0.5, memory_s=1.0, relink_s=5.0), 10.0, two, [[102, 300, 152, 420]]) == [1]
    assert standing(TaskTracker(10.0, 0.5, memory_s=1.0, relink_s=5.0), 10.0, two,
                    [[102, 300, 152, 420], [158, 300, 208, 420]]) == [1, 2]


def test_a_new_track_of_another_size_or_too_far_away_is_someone_else():
    one = [[100, 300, 150, 420]]
    assert standing(TaskTracker(10.0, 0.5, memory_s=1.0, relink_s=5.0), 10.0, one, [[100, 240, 150, 420]]) == [2]
    # Reach after a 3 s gap standing still: (0.3 + 0.15 x 3) x 120 px = 90 px from where it was.
    assert standing(TaskTracker(10.0, 0.5, memory_s=1.0, relink_s=5.0), 10.0, one, [[185, 300, 235, 420]]) == [1]
    assert standing(TaskTracker(10.0, 0.5, memory_s=1.0, relink_s=5.0), 10.0, one, [[195, 300, 245, 420]]) == [2]
