"""Track stage: rtmpose_<task> -> bytetrack_<task>. Roboflow `trackers` ByteTrack, one tracker per task.

The runtime hands this stage each task's frames in index order (the topic has one partition and the
runtime re-orders what the parallel pose workers wrote), so the tracker sees the video as it was shot.
"""

from __future__ import annotations

import numpy as np
import supervision as sv
from trackers import ByteTrackTracker

from posemesh import kafka
from posemesh.stages.runtime import FrameItem, Stage, TaskContext


class TrackStage(Stage):
    name = "track"
    input_prefix = kafka.RTMPOSE
    output_prefix = kafka.BYTETRACK
    ordered = True
    max_batch = 32

    def setup(self, settings) -> None:
        self.trackers: dict[str, ByteTrackTracker] = {}

    def tracker(self, task: TaskContext) -> ByteTrackTracker:
        if task.task_id not in self.trackers:
            # Detections below the task's person threshold never reach us, so new tracks start from it.
            threshold = task.options.min_person_score or 0.5
            self.trackers[task.task_id] = ByteTrackTracker(
                frame_rate=task.fps or 30.0, lost_track_buffer=30, track_activation_threshold=threshold,
                high_conf_det_threshold=max(threshold, 0.6), minimum_consecutive_frames=1)
        return self.trackers[task.task_id]

    def process(self, items: list[FrameItem], tasks: dict[str, TaskContext]) -> None:
        for item in items:  # in index order within each task
            persons = item.frame.persons
            tracker = self.tracker(tasks[item.task_id])
            if persons:
                xyxy = np.array([[p.box.x1, p.box.y1, p.box.x2, p.box.y2] for p in persons], np.float32)
                detections = sv.Detections(xyxy=xyxy, confidence=np.array([p.score for p in persons], np.float32),
                                           data={"person": np.arange(len(persons))})
            else:
                detections = sv.Detections.empty()
                detections.data["person"] = np.zeros(0, int)
            tracked = tracker.update(detections)
            for person_index, track_id in zip(tracked.data.get("person", []), tracked.tracker_id):
                if track_id >= 0:  # -1: not confirmed yet. The tracker counts from 0; our ids from 1.
                    persons[int(person_index)].track_id = int(track_id) + 1

    def finish_task(self, task: TaskContext):
        self.trackers.pop(task.task_id, None)
        return None

    def drop_task(self, task_id: str) -> None:
        self.trackers.pop(task_id, None)
