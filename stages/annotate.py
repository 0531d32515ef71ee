"""Annotate stage: bytetrack_<task> -> results. Draws boxes, track ids and skeletons on each frame and
writes the task's annotated H.264 MP4 and keypoints JSON lines (stages/results.py says how the files
keep the upload's timing, size and audio, and how they appear all at once).

Frames arrive in index order (runtime). Input offsets are committed when the task's files are final
(`commit_at_task_end`): a crash mid-task redoes the task from its first frame.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import cv2
import numpy as np

from posemesh import kafka
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.stages.pose import COCO_SKELETON
from posemesh.stages.results import EncoderSettings, ResultWriter, wanted_outputs
from posemesh.stages.runtime import FrameItem, Stage, TaskContext

KEYPOINT_MIN_SCORE = 0.3
UPLOAD_FILE = "upload"  # the gateway's name for a task's upload, under jobs/<task>/ (shared data volume)


def colour(track_id: int) -> tuple[int, int, int]:
    if track_id <= 0:
        return (160, 160, 160)
    hue = (track_id * 47) % 180  # well-spread hues for consecutive ids
    return tuple(int(c) for c in cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0])


def draw(image: np.ndarray, persons) -> np.ndarray:
    for p in persons:
        c = colour(p.track_id)
        x1, y1, x2, y2 = (int(round(v)) for v in (p.box.x1, p.box.y1, p.box.x2, p.box.y2))
        cv2.rectangle(image, (x1, y1), (x2, y2), c, 2)
        label = f"#{p.track_id}" if p.track_id else f"{p.score:.2f}"
        cv2.putText(image, label, (x1, max(12, y1 - 5)), cv2.FONT_HERSHEY_SIMPLEX, 0.6, c, 2, cv2.LINE_AA)
        kps = p.keypoints
        if len(kps) == 17:
            for a, b in COCO_SKELETON:
                if kps[a].score > KEYPOINT_MIN_SCORE and kps[b].score > KEYPOINT_MIN_SCORE:
                    cv2.line(image, (int(kps[a].x), int(kps[a].y)), (int(kps[b].x), int(kps[b].y)), c, 2, cv2.LINE_AA)
            for k in kps:
                if k.score > KEYPOINT_MIN_SCORE:
                    cv2.circle(image, (int(k.x), int(k.y)), 3, (255, 255, 255), -1, cv2.LINE_AA)
    return image


class AnnotateStage(Stage):
    name = "annotate"
    input_prefix = kafka.BYTETRACK
    output_prefix = None
    ordered = True
    commit_at_task_end = True
    max_batch = 16

    def __init__(self, x264_preset: str | None = None):
        self.encoder = EncoderSettings(preset=x264_preset or os.environ.get("POSEMESH_X264_PRESET", "veryfast"),
                                       segment_frames=int(os.environ.get("POSEMESH_SEGMENT_FRAMES", "120")))

    def setup(self, settings) -> None:
        self.results_dir: Path = settings.results_dir
        self.jobs_dir: Path = settings.jobs_dir
        self.worker = f"{socket.gethostname()}-{os.getpid()}"  # unique on a volume shared by hosts
        self.writers: dict[str, ResultWriter] = {}

    def writer(self, task: TaskContext, first: pb.Frame) -> ResultWriter:
        writer = self.writers.get(task.task_id)
        if writer is None:
            writer = ResultWriter(task.task_id, self.results_dir, wanted_outputs(task.options),
                                  (first.width, first.height), task.fps, self.encoder, self.worker)
            self.writers[task.task_id] = writer
        return writer

    def process(self, items: list[FrameItem], tasks: dict[str, TaskContext]) -> None:
        for item in items:  # in index order within each task
            frame = item.frame
            writer = self.writer(tasks[item.task_id], frame)
            image = None
            if writer.video:
                image = cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR)
                if image is None:
                    raise ValueError(f"frame {frame.index}: undecodable JPEG")
                draw(image, frame.persons)
            writer.write(frame, image)

    def finish_task(self, task: TaskContext) -> pb.TaskResult:
        writer = self.writers.pop(task.task_id, None) or ResultWriter(
            task.task_id, self.results_dir, wanted_outputs(task.options), (task.video.width, task.video.height),
            task.fps, self.encoder, self.worker)
        upload = self.jobs_dir / task.task_id / UPLOAD_FILE
        return writer.publish(task.total or 0, upload if task.video.audio_codec else None, task.video.start_s)

    def drop_task(self, task_id: str) -> None:
        writer = self.writers.pop(task_id, None)
        if writer is not None:
            writer.abandon()

    def close(self) -> None:
        for task_id in list(self.writers):
            self.drop_task(task_id)
