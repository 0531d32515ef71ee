"""Annotate stage: bytetrack_<task> -> results. Draws boxes, track ids and skeletons on each frame and
writes the task's annotated H.264 MP4 and keypoints JSON lines (stages/results.py says how the files
keep the upload's timing, size and audio, and how they appear all at once).

Frames arrive in index order. Recovery.RESUME: input offsets are committed as segments are finished, and
a replica that takes a task over (crash, rebalance, scale-up) continues after the last finished segment
(`resume_index`), so at most one segment is redone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from posemesh.mesh import jpeg, names, pipeline
from posemesh.stages.base import FrameItem, Stage, StageError, TaskInfo
from posemesh.stages.drawing import draw
from posemesh.stages.live_out import RtspPublisher
from posemesh.stages.results import EncoderSettings, ResultWriter, wanted_outputs
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb

LIVE_JPEG_QUALITY = 80  # annotated frames for live viewers: small enough to stream, good enough to watch


class AnnotateStage(Stage):
    name = "annotate"
    max_batch = 16

    def __init__(self, x264_preset: str | None = None):
        self.x264_preset = x264_preset  # None: the setting's

    def setup(self, settings) -> None:
        self.encoder = EncoderSettings(preset=self.x264_preset or settings.x264_preset,
                                       segment_frames=settings.segment_frames)
        self.store = settings.blob_store()
        self.worker = f"{socket.gethostname()}-{os.getpid()}"  # unique on a volume shared by hosts
        self.scratch = own_scratch(settings.scratch_dir, self.worker)
        self.writers: dict[str, ResultWriter] = {}
        self.buffer = np.empty(0, np.uint8)  # the picture being drawn on, when it came from pose (picture())

    def writer(self, task: TaskInfo, first: pb.Frame | None = None) -> ResultWriter:
        writer = self.writers.get(task.task_id)
        if writer is None:
            # The video's size is its first frame's (from the probe): a replica resuming mid-task agrees.
            size = (task.video.width, task.video.height)
            if not all(size) and first is not None:
                size = (first.width, first.height)
            settings = dataclasses.replace(self.encoder, live=task.live)
            writer = ResultWriter(task.task_id, self.store, self.scratch, wanted_outputs(task.options), size,
                                  task.fps, settings, self.worker, epoch=task.epoch)
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

    def needs_pixels(self, task: TaskInfo) -> bool:
        """Pixels are drawn only for the annotated video and for live viewers: a task that asked for
        keypoints (or exports) only, and that nobody watches, costs no JPEG read or decode here."""
        return task.viewers > 0 or tpb.ARTIFACT_KIND_ANNOTATED_VIDEO in wanted_outputs(task.options)

    def process(self, items: list[FrameItem]) -> None:
        for item in items:  # in index order within each task
            frame = item.frame
            writer = self.writer(item.task, frame)
            if writer.published_elsewhere():  # by another replica (see ResultWriter.published)
                continue
            image = None
            watched = item.task.viewers > 0
            if self.needs_pixels(item.task):  # the annotated video, or live viewers
                image = self.picture(item)
                draw(image, frame.persons)
            if watched:  # someone watches this task live: the annotated frame goes out now
                live = tpb.AnnotatedFrame(index=frame.index, timestamp_s=frame.timestamp_s, width=frame.width,
                                          height=frame.height, jpeg=jpeg.encode(image, LIVE_JPEG_QUALITY),
                                          persons=frame.persons, annotated_at=time.time())
                self.emit(pipeline.LIVE_FRAMES, item.task, live.SerializeToString())
            try:
                writer.write(frame, image if writer.video else None)
            except OSError:
                if not writer.published_elsewhere(every_s=0):
                    raise
                writer.abandon()  # published meanwhile by the other writer: this frame is in it

    def picture(self, item: FrameItem) -> np.ndarray:
        """The frame's pixels: copied out of the ring pose left them in on this host (into one buffer, written
        over by the next frame), else decoded from its JPEG (fetched now when the ring no longer held it)."""
        shared = item.shared_picture
        if shared is not None:
            if self.buffer.size < shared.nbytes:
                self.buffer = np.empty(shared.nbytes, np.uint8)
            image = shared.take(self.buffer)
            if image is not None:
                return image
            self.fetch_pixels([item])
        try:
            return jpeg.decode(item.frame.jpeg)
        except jpeg.BadJpeg as exc:
            raise StageError(str(exc)) from None

    def finish_task(self, task: TaskInfo) -> pb.TaskResult:
        writer = self.writers.pop(task.task_id, None) or self.writer(task)
        self.writers.pop(task.task_id, None)
        try:
            with contextlib.ExitStack() as stack:  # the upload, for its audio: a local copy while joining
                upload = (stack.enter_context(self.store.local_copy(names.upload_key(task.task_id)))
                          if task.video.audio_codec else None)
                return writer.publish(task.total or 0, upload, task.video.start_s)
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
        shutil.rmtree(self.scratch, ignore_errors=True)


def own_scratch(scratch_dir: Path, worker: str) -> Path:
    """This worker's scratch folder, after removing those of this host's workers that are gone (SIGKILL
    leaves a half-written segment behind; on Kubernetes each pod has its own, emptied with the pod)."""
    host = socket.gethostname()
    if scratch_dir.is_dir():
        for folder in scratch_dir.glob(f"{host}-*"):
            pid = folder.name.removeprefix(f"{host}-")
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(folder, ignore_errors=True)
    return scratch_dir / worker


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
