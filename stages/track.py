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

Re-linking (POSEMESH_TRACK_RELINK_S, off by default): a track the tracker forgot (unseen for longer than
its memory) may give its id to a new track that starts within that many seconds where the forgotten one
would be by now: its last box moved on at its last velocity, within a distance that grows with the gap,
with a similar height, and only when no other forgotten track fits almost as well (an ambiguous case keeps
the new id: a wrong re-link is an id switch, worse than a fragment). bench/people.py measures it.

Every detection gets an id: the activation and high-confidence thresholds are both the task's person
threshold, the detect stage's (the task's min_person_score, else POSEMESH_DETECT_MIN_SCORE; detections
below it never reach this stage), so each detection either continues a track or
starts one.

Recovery.REPLAY: a replica that takes over a task reads it again from its first frame. The tracker is
deterministic, so it rebuilds the same state and gives the same ids as an undisturbed run.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import supervision as sv
from trackers import ByteTrackTracker

from posemesh.stages.base import FrameItem, Stage, StageError, TaskInfo

# Re-linking (see the module doc). The distance allowed between where a forgotten track would be and a new
# track's box, in the forgotten box's heights: RELINK_REACH at once, plus RELINK_REACH_PER_S for every second
# of the gap (a walker's speed is about 0.6 heights a second; its last velocity predicts most of that).
RELINK_REACH, RELINK_REACH_PER_S = 0.3, 0.15
RELINK_HEIGHT_RATIO = 1.3  # the most the two boxes' heights may differ by, as a ratio
RELINK_AMBIGUOUS = 1.5  # a second candidate within this factor of the best one's distance: no re-link
VELOCITY_WINDOW_S = 1.0  # a track's velocity: from its boxes over the last second it was seen


@dataclass
class Forgotten:
    """A track the tracker dropped: where and when it was last seen, and how it moved."""

    track_id: int
    box: np.ndarray  # x1, y1, x2, y2 of its last detection
    seen_at: float
    velocity: np.ndarray  # its centre's pixels per second

    def distance(self, box: np.ndarray, at: float) -> float | None:
        """How far `box` is, in this track's heights, from where it would be at `at`; None if it cannot be it."""
        gap = at - self.seen_at
        height, new_height = self.box[3] - self.box[1], box[3] - box[1]
        if gap <= 0 or height <= 0 or new_height <= 0:
            return None
        if max(height, new_height) / min(height, new_height) > RELINK_HEIGHT_RATIO:
            return None
        expected = (self.box[:2] + self.box[2:]) / 2 + self.velocity * gap
        distance = float(np.linalg.norm((box[:2] + box[2:]) / 2 - expected)) / height
        return distance if distance <= RELINK_REACH + RELINK_REACH_PER_S * gap else None


class TaskTracker:
    """ByteTrack for one task, with ids assigned at spawn (and, with relink_s, handed on: see the module doc)."""

    def __init__(self, fps: float, threshold: float, memory_s: float = 2.0, min_iou: float = 0.1,
                 relink_s: float = 0.0):
        # The library's unit for the lost-track buffer is a frame at 30 fps (1/30 s): see the module doc.
        self.tracker = ByteTrackTracker(frame_rate=fps, lost_track_buffer=max(0, round(memory_s * 30)),
                                        track_activation_threshold=threshold, high_conf_det_threshold=threshold,
                                        minimum_consecutive_frames=1, minimum_iou_threshold=min_iou)
        self.ids: dict[int, int] = {}  # id() of a live tracklet -> our track id
        self.next_id = 1
        self.relink_s = relink_s
        self.recent: dict[int, deque[tuple[float, np.ndarray]]] = {}  # track id -> (time, box) seen lately
        self.forgotten: dict[int, Forgotten] = {}  # track id -> the dropped track, for relink_s
        self.relinks = 0  # ids handed on, and the last one (the forgotten track, the new box): bench/people.py
        self.last_relink: tuple[Forgotten, np.ndarray] | None = None

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
        if self.relink_s > 0:
            self._forget(timestamp)
        for tracklet in spawned:
            self.ids[id(tracklet)] = self._relinked(tracklet.get_state_bbox(), timestamp) or self._new_id()
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
        if self.relink_s > 0:
            for track_id, box in zip(out, boxes):
                history = self.recent.setdefault(track_id, deque())
                history.append((timestamp, np.asarray(box, np.float64)))
                while history[0][0] < timestamp - VELOCITY_WINDOW_S:
                    history.popleft()
        return out

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _forget(self, now: float) -> None:
        """Move the tracks the tracker dropped to `forgotten`, and let go of those forgotten too long ago."""
        live_tracklets = {id(t) for t in self.tracker.tracks}
        alive = {track_id for key, track_id in self.ids.items() if key in live_tracklets}
        for track_id in [t for t in self.recent if t not in alive]:
            history = self.recent.pop(track_id)
            (first_at, first), (last_at, last) = history[0], history[-1]
            velocity = (((last[:2] + last[2:]) - (first[:2] + first[2:])) / 2 / (last_at - first_at)
                        if last_at > first_at else np.zeros(2))
            self.forgotten[track_id] = Forgotten(track_id, last, last_at, velocity)
        for track_id in [t for t, f in self.forgotten.items() if now - f.seen_at > self.relink_s]:
            del self.forgotten[track_id]

    def _relinked(self, box: np.ndarray, now: float) -> int | None:
        """The forgotten track a new track's first box continues, if exactly one fits (see the module doc)."""
        fits = sorted((d, f.track_id) for f in self.forgotten.values()
                      if (d := f.distance(np.asarray(box, np.float64), now)) is not None)
        if not fits or (len(fits) > 1 and fits[1][0] <= fits[0][0] * RELINK_AMBIGUOUS):
            return None
        track_id = fits[0][1]
        self.last_relink = (self.forgotten.pop(track_id), np.asarray(box, np.float64))
        self.relinks += 1
        return track_id


class TrackStage(Stage):
    name = "track"
    max_batch = 32

    def setup(self, settings) -> None:
        self.memory_s = settings.track_memory_s
        self.min_iou = settings.track_min_iou
        self.relink_s = settings.track_relink_s
        self.min_score = settings.detect_min_score  # the detect stage's threshold: see the module doc
        self.trackers: dict[str, TaskTracker] = {}

    def tracker(self, task: TaskInfo) -> TaskTracker:
        if task.task_id not in self.trackers:
            self.trackers[task.task_id] = TaskTracker(task.fps, task.options.min_person_score or self.min_score,
                                                      self.memory_s, self.min_iou, self.relink_s)
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
