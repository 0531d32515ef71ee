"""Track stage: rtmpose_<task> -> bytetrack_<task>. Roboflow `trackers` ByteTrack, one tracker per task.

The worker hands this stage each task's frames in index order, so the tracker sees the video as shot.
Frame timestamps drive the tracker's motion model, so a variable frame rate is tracked in real time.

Track ids: `trackers` gives a new track the id -1 on the frame that spawns it and allocates its id on the
next frame it is matched in, so every person of a video's first frame (and each newcomer's first frame)
went untracked. Here a track's id is fixed the moment it spawns: its first detection carries it, and so
does every later detection the tracker matches to the same tracklet. Ids count from 1 in spawn order.

Settings (mesh/settings.py): how long a track whose person is not detected is remembered, in seconds of
the video (POSEMESH_TRACK_MEMORY_S; a person unseen for longer comes back with a new id), and the least IoU
between a track's predicted box and a detection for them to match (POSEMESH_TRACK_MIN_IOU). The tracker
gets each frame's timestamp, so it prunes lost tracks by elapsed seconds, whatever the frame rate: the
library's `lost_track_buffer` counts frames at 30 fps (its seconds budget is lost_track_buffer / 30), and
the task's fps scales its Kalman steps and its frame-count budget (fps x memory).

Every detection gets an id: the activation and high-confidence thresholds are both the task's person
threshold, the detect stage's (the task's min_person_score, else POSEMESH_DETECT_MIN_SCORE; detections
below it never reach this stage), so each detection either continues a track or
starts one.

Recovery.REPLAY: a replica that takes over a task reads it again from its first frame. The tracker is
deterministic, so it rebuilds the same state and gives the same ids as an undisturbed run.
"""

from __future__ import annotations

import numpy as np
import supervision as sv
from trackers import ByteTrackTracker

from posemesh.stages.base import FrameItem, Stage, StageError, TaskInfo


class TaskTracker:
    """ByteTrack for one task, with ids assigned at spawn."""

    def __init__(self, fps: float, threshold: float, memory_s: float = 2.0, min_iou: float = 0.1):
        # The library's unit for the lost-track buffer is a frame at 30 fps (1/30 s): see the module doc.
        self.tracker = ByteTrackTracker(frame_rate=fps, lost_track_buffer=max(0, round(memory_s * 30)),
                                        track_activation_threshold=threshold, high_conf_det_threshold=threshold,
                                        minimum_consecutive_frames=1, minimum_iou_threshold=min_iou)
        self.ids: dict[int, int] = {}  # id() of a live tracklet -> our track id
        self.next_id = 1

    def update(self, boxes: np.ndarray, scores: np.ndarray, timestamp: float) -> list[int]:
        """Track ids (>= 1) for the detections of one frame, in their order."""
        held = list(self.tracker.tracks)  # kept alive through the update, so no new tracklet reuses an id()
        before = {id(t) for t in held}
        if len(boxes):
            detections = sv.Detections(xyxy=boxes, confidence=scores, data={"person": np.arange(len(boxes))})
        else:
            detections = sv.Detections.empty()
            detections.data["person"] = np.zeros(0, int)
        result = self.tracker.update(detections, timestamp=timestamp)
        spawned = [t for t in self.tracker.tracks if id(t) not in before]
        for tracklet in spawned:
            self.ids[id(tracklet)] = self.next_id
            self.next_id += 1
        by_library_id = {t.tracker_id: self.ids[id(t)] for t in self.tracker.tracks
                         if t.tracker_id >= 0 and id(t) in self.ids}
        out = [0] * len(boxes)
        unmatched = []
        for person, library_id in zip(result.data.get("person", []), result.tracker_id):
            if library_id >= 0:
                out[int(person)] = by_library_id[int(library_id)]
            else:
                unmatched.append(int(person))
        # Detections the tracker could not give an id yet are the spawned tracklets' first boxes, in spawn
        # order; the box equality check keeps that pairing honest.
        for person, tracklet in zip(unmatched, spawned):
            if not np.allclose(tracklet.get_state_bbox(), boxes[person], atol=1e-3):
                raise StageError("ByteTrack spawned tracks in an unexpected order")
            out[person] = self.ids[id(tracklet)]
        live = {id(t) for t in self.tracker.tracks}
        self.ids = {k: v for k, v in self.ids.items() if k in live}
        del held
        return out


class TrackStage(Stage):
    name = "track"
    max_batch = 32

    def setup(self, settings) -> None:
        self.memory_s = settings.track_memory_s
        self.min_iou = settings.track_min_iou
        self.min_score = settings.detect_min_score  # the detect stage's threshold: see the module doc
        self.trackers: dict[str, TaskTracker] = {}

    def tracker(self, task: TaskInfo) -> TaskTracker:
        if task.task_id not in self.trackers:
            self.trackers[task.task_id] = TaskTracker(task.fps, task.options.min_person_score or self.min_score,
                                                      self.memory_s, self.min_iou)
        return self.trackers[task.task_id]

    def process(self, items: list[FrameItem]) -> None:
        for item in items:  # in index order within each task
            persons = item.frame.persons
            boxes = np.array([[p.box.x1, p.box.y1, p.box.x2, p.box.y2] for p in persons], np.float32).reshape(-1, 4)
            scores = np.array([p.score for p in persons], np.float32)
            for person, track_id in zip(persons, self.tracker(item.task).update(boxes, scores, item.frame.timestamp_s)):
                person.track_id = track_id

    def finish_task(self, task: TaskInfo):
        self.trackers.pop(task.task_id, None)
        return None

    def drop_task(self, task_id: str) -> None:
        self.trackers.pop(task_id, None)
