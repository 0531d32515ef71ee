"""What a stage is: one subclass of `Stage`. The worker (posemesh.stages.worker, with posemesh.stages.flows
for what differs between ordered and unordered stages) does the rest: Kafka, batching, ordering,
de-duplication, offsets, recovery, failures, progress and the control API.

A stage says which step of the pipeline it is (`name`, looked up in posemesh.mesh.pipeline) and implements
`process(items)`: do its work on a batch of frames (of any tasks, in index order per task when the stage
is ordered), adding its results to each frame in place. Ordered stages also get `finish_task` when a
task's last frame is through, and `drop_task` when a task moves away or ends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum

from posemesh.mesh import pipeline
from posemesh.mesh.settings import Settings
from posemesh.stages.shared_pictures import SharedPicture
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb


class Recovery(Enum):
    """How a replica that takes over a task (after a crash, a rebalance or a scale-up) catches up."""

    # Unordered stages: frames after the last committed offset are delivered again and redone.
    REDO = "redo"
    # Ordered stages with state built from every frame (a tracker): read the task again from its first
    # frame. The same input in the same order gives the same state, so the output is the same as an
    # undisturbed run's; outputs already produced are dropped by index downstream.
    REPLAY = "replay"
    # Ordered stages that keep their own durable checkpoints (annotate's finished segments): continue
    # after the last checkpoint, from the committed offset.
    RESUME = "resume"


@dataclass
class TaskInfo:
    """What a worker knows of one task (from the control topic and the records themselves)."""

    task_id: str
    epoch: int = 0
    options: tpb.TaskOptions = field(default_factory=tpb.TaskOptions)
    video: tpb.VideoInfo = field(default_factory=tpb.VideoInfo)
    total: int | None = None  # the frame count, once the end-of-stream record has been read
    live: bool = False  # frames come from a camera: code for latency
    publish_url: str = ""  # where a live task's annotated video is published (RTSP), if anywhere
    viewers: int = 0  # clients watching the task's annotated frames (WatchFrames)
    trace: object = None  # the run's trace context (posemesh.mesh.tracing), None while tracing is off

    @property
    def fps(self) -> float:
        """The rate frames come at: the video's, or the sampling rate the task asked for when lower."""
        fps = self.video.fps or 30.0
        return min(fps, self.options.sample_fps) if self.options.sample_fps else fps


@dataclass
class FrameItem:
    """One frame inside a worker, with its task."""

    task: TaskInfo
    frame: pb.Frame
    # Where a stage before left the frame decoded on this host (stages/shared_pictures.py): then frame.jpeg was
    # not fetched.
    shared_picture: SharedPicture | None = None

    @property
    def task_id(self) -> str:
        return self.task.task_id


class StageError(Exception):
    """A failure of one task's frame that retrying will not fix (bad data, a model error): the worker
    fails that task and goes on with the others."""


class ServiceUnavailable(StageError):
    """A service the stage depends on (a model server) stayed unavailable for longer than the stage waits.
    No frame is at fault: the tasks it was raised for fail with this message, naming no frame, and the
    worker does not retry the batch task by task and frame by frame to find a culprit (each retry would
    wait out the outage again)."""


class Stage(ABC):
    """Subclass this to add a stage."""

    name: str = ""
    # Frames per batch; POSEMESH_<STAGE>_MAX_BATCH overrides it. Bigger batches feed a model better (GPUs);
    # smaller ones reach the first result sooner (CPUs).
    max_batch: int = 16

    @property
    def spec(self) -> pipeline.StageSpec:
        return pipeline.SPECS[self.name]

    @property
    def ordered(self) -> bool:
        return self.spec.ordered

    @property
    def recovery(self) -> Recovery:
        return Recovery(self.spec.recovery)

    def emit(self, prefix: str, task: TaskInfo, data: bytes) -> None:
        """Write a record to the task's `prefix` topic besides the stage's own output (annotate's live
        frames); delivered in the same flush as the outputs. The worker provides it."""
        raise NotImplementedError("emit() is provided by the worker")

    def share(self, item: FrameItem, picture) -> None:  # noqa: B027 - the worker's, when it shares
        """Stages declared with shares_pictures: hand a frame's full decode (an array) to the later stages on
        this host (stages/shared_pictures.py). The worker provides it; outside one, nothing is shared."""

    def fetch_pixels(self, items: list[FrameItem]) -> None:
        """Get the JPEG (frame.jpeg) of frames whose shared picture was gone by the time it was wanted: from the
        task's ring on this host if detect left it there, else from the broker. The worker provides it."""
        raise NotImplementedError("fetch_pixels() is provided by the worker")

    def setup(self, settings: Settings) -> None:  # noqa: B027 - optional hook
        """Connect to Triton and the like; called once before the first frame."""

    @abstractmethod
    def process(self, items: list[FrameItem]) -> None:
        """Do this stage's work on a batch of frames, adding results to each frame in place. Raise
        StageError (or any exception) for a frame that cannot be done: the worker retries the batch task
        by task to find the culprit, fails that task and keeps the others. Raise ServiceUnavailable when a
        service the stage needs is gone: the batch's tasks fail without that search."""

    def needs_pixels(self, task: TaskInfo) -> bool:
        """Stages declared with pixels in the pipeline table: whether the task's JPEGs must be fetched for
        it, as of now (a stage whose output for some tasks is metadata only says no for those: their pixels
        are neither read ahead nor fetched)."""
        return True

    def finish_task(self, task: TaskInfo) -> pb.TaskResult | None:
        """Ordered stages: every frame of the task went through `process`. Return a result to report."""
        return None

    def drop_task(self, task_id: str) -> None:  # noqa: B027 - optional hook
        """Forget a task (it ended, failed, or moved to another replica): release what it holds."""

    def resume_index(self, task: TaskInfo) -> int:
        """Recovery.RESUME: the first frame index not yet durably done (0: start from the beginning)."""
        return 0

    def durable_index(self, task_id: str) -> int:
        """Recovery.RESUME: the last index whose output is durable; inputs up to it may be committed.
        Other stages' outputs are durable once produced, and this is not asked."""
        return -1

    def problem(self) -> str:
        """Why the stage cannot work right now ("" when it can), e.g. Triton failing its calls; the worker's
        health turns NOT_SERVING while this is set."""
        return ""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources at shutdown."""
