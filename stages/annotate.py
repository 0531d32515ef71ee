"""Annotate stage: bytetrack_<task> -> results. Draws boxes, track ids and skeletons on each frame and
writes the task's annotated H.264 MP4 and keypoints JSON lines (stages/results.py says how the files
keep the upload's timing, size and audio, and how they appear all at once).

Frames arrive in index order. Recovery.RESUME: input offsets are committed as segments are finished, and
a replica that takes a task over (crash, rebalance, scale-up) continues after the last finished segment
(`resume_index`), so at most one segment is redone.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

import cv2
import numpy as np

from posemesh.mesh import jpeg, names, pipeline
from posemesh.stages.base import FrameItem, Stage, StageError, TaskInfo
from posemesh.stages.live_out import RtspPublisher
from posemesh.stages.pose import COCO_SKELETON
from posemesh.stages.results import EncoderSettings, ResultWriter, wanted_outputs
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb

KEYPOINT_MIN_SCORE = 0.3
LIVE_JPEG_QUALITY = 80  # annotated frames for live viewers: small enough to stream, good enough to watch


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
    max_batch = 16

    def __init__(self, x264_preset: str | None = None):
        self.encoder = EncoderSettings(preset=x264_preset or os.environ.get("POSEMESH_X264_PRESET", "veryfast"),
                                       segment_frames=int(os.environ.get("POSEMESH_SEGMENT_FRAMES", "60")))

    def setup(self, settings) -> None:
        self.results_dir: Path = settings.results_dir
        self.jobs_dir: Path = settings.jobs_dir
        self.worker = f"{socket.gethostname()}-{os.getpid()}"  # unique on a volume shared by hosts
        self.writers: dict[str, ResultWriter] = {}

    def writer(self, task: TaskInfo, first: pb.Frame | None = None) -> ResultWriter:
        writer = self.writers.get(task.task_id)
        if writer is None:
            # The video's size is its first frame's (from the probe): a replica resuming mid-task agrees.
            size = (task.video.width, task.video.height)
            if not all(size) and first is not None:
                size = (first.width, first.height)
            settings = dataclasses.replace(self.encoder, live=task.live)
            writer = ResultWriter(task.task_id, self.results_dir, wanted_outputs(task.options), size, task.fps,
                                  settings, self.worker, epoch=task.epoch)
            if task.live and task.publish_url and writer.video:
                writer.publisher = RtspPublisher(task.publish_url, task.task_id)
                writer.publisher.start()
            self.writers[task.task_id] = writer
        return writer

    def resume_index(self, task: TaskInfo) -> int:
        return self.writer(task).durable + 1

    def durable_index(self, task_id: str) -> int:
        writer = self.writers.get(task_id)
        return writer.durable if writer else -1

    def process(self, items: list[FrameItem]) -> None:
        for item in items:  # in index order within each task
            frame = item.frame
            writer = self.writer(item.task, frame)
            if writer.final.is_dir():  # another replica already published this task (see ResultWriter.published)
                continue
            image = None
            watched = item.task.viewers > 0
            if writer.video or watched:
                try:
                    image = jpeg.decode(frame.jpeg)
                except jpeg.BadJpeg as exc:
                    raise StageError(str(exc)) from None
                draw(image, frame.persons)
            if watched:  # someone watches this task live: the annotated frame goes out now
                live = tpb.AnnotatedFrame(index=frame.index, timestamp_s=frame.timestamp_s, width=frame.width,
                                          height=frame.height, jpeg=jpeg.encode(image, LIVE_JPEG_QUALITY),
                                          persons=frame.persons, annotated_at=time.time())
                self.emit(pipeline.LIVE_FRAMES, item.task, live.SerializeToString())
            try:
                writer.write(frame, image if writer.video else None)
            except OSError:
                if not writer.final.is_dir():
                    raise
                writer.abandon()  # published meanwhile by the other writer: this frame is in it

    def finish_task(self, task: TaskInfo) -> pb.TaskResult:
        writer = self.writers.pop(task.task_id, None) or self.writer(task)
        self.writers.pop(task.task_id, None)
        upload = names.upload_path(self.jobs_dir, task.task_id)
        try:
            return writer.publish(task.total or 0, upload if task.video.audio_codec else None, task.video.start_s)
        finally:
            if writer.publisher is not None:
                writer.publisher.close()

    def drop_task(self, task_id: str) -> None:
        writer = self.writers.pop(task_id, None)
        if writer is not None:
            writer.abandon()
            if writer.publisher is not None:
                writer.publisher.close()

    def close(self) -> None:
        for task_id in list(self.writers):
            self.drop_task(task_id)
