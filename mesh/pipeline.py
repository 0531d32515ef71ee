"""The pipeline, declared once: the stages in order, the per-task topics between them, their partitions.

    upload -> (ingest) -> raw_frames_<task> -> detect -> yolox_<task> -> pose -> rtmpose_<task> -> track
           -> bytetrack_<task> -> annotate -> results/<task>/

Everything else derives from this table: topic names and partition counts (posemesh.mesh.kafka and the
gateway's topic manager), what each worker reads and writes (posemesh.stages), the workers the local
stack starts, and the checks on deploy/. Adding a stage is one line here and one class in stages/.

Partitions follow from who reads a topic. A stage that treats frames independently (`ordered=False`)
reads topics with FRAME_PARTITIONS partitions, so several replicas share one task. A stage that needs a
task's frames in order and keeps state across them (`ordered=True`) reads one-partition topics: one
replica owns a task at a time, and different tasks spread over the replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

RAW_FRAMES, YOLOX, RTMPOSE, BYTETRACK = "raw_frames", "yolox", "rtmpose", "bytetrack"


@dataclass(frozen=True)
class StageSpec:
    name: str
    reads: str  # topic prefix of its input
    writes: str | None  # topic prefix of its output (None: the stage writes files)
    ordered: bool
    entry: str  # "module:Class" of its Stage
    # How a replica that takes over an ordered task catches up (see posemesh.stages.base.Recovery).
    recovery: str = "redo"
    # Whether the stage needs the frame's pixels. Only raw_frames carries them; a later stage that needs
    # them reads them from there by reference (Frame.source), so the JPEG enters Kafka once.
    pixels: bool = False
    # Whether the stage hands its full decodes of frames to the later stages on the same host that need pixels
    # (stages/shared_pictures.py): they then neither fetch nor decode those frames' JPEGs.
    shares_pictures: bool = False
    # Whether the stage reads the pixels' records and hands each frame's JPEG to the later stages on the same
    # host that need pixels: they then take it there instead of reading the record from the broker again.
    shares_jpegs: bool = False


STAGES: tuple[StageSpec, ...] = (
    StageSpec("detect", RAW_FRAMES, YOLOX, ordered=False, entry="posemesh.stages.detect:DetectStage",
              pixels=True, shares_jpegs=True),
    StageSpec("pose", YOLOX, RTMPOSE, ordered=False, entry="posemesh.stages.pose:PoseStage", pixels=True,
              shares_pictures=True),
    StageSpec("track", RTMPOSE, BYTETRACK, ordered=True, entry="posemesh.stages.track:TrackStage",
              recovery="replay"),
    StageSpec("annotate", BYTETRACK, None, ordered=True, entry="posemesh.stages.annotate:AnnotateStage",
              recovery="resume", pixels=True),
)
SPECS: dict[str, StageSpec] = {s.name: s for s in STAGES}
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
LAST_STAGE = STAGE_NAMES[-1]  # a frame it finished is through the whole pipeline
# Ordered: it finishes a task's frames in index order, so the newest index it reports done, plus one, is how many
# it finished (what decoding is paced by: FrameProducer, the ingest stage's AnnotatedSoFar).
assert SPECS[LAST_STAGE].ordered, LAST_STAGE

# The topic that carries the pixels.
PIXELS_TOPIC = STAGES[0].reads
# Annotated frames (JPEG and persons) for clients watching a task live: written by the last stage only
# while someone watches (see WatchFrames), read by the gateway.
LIVE_FRAMES = "live"
# Every per-task topic: the gateway writes the first, each stage the next; then the live frames.
TASK_TOPIC_PREFIXES: tuple[str, ...] = ((STAGES[0].reads,) + tuple(s.writes for s in STAGES if s.writes)
                                        + (LIVE_FRAMES,))
# Uploads are decoded into raw_frames_<task> before the first stage: by the gateway that took them, or by the
# ingest stage (stages/ingest.py: a source, not a stage of this table; POSEMESH_INGEST says which).
INGEST = "ingest"
# Every kind of worker `python -m posemesh.stages` runs.
WORKER_NAMES: tuple[str, ...] = (INGEST,) + STAGE_NAMES
# Progress is reported per step a frame takes: its decoding (by either), then every stage.
PROGRESS_STEPS: tuple[str, ...] = ("decode",) + STAGE_NAMES


def progress_step(worker: str) -> str:
    """The progress step a worker's reports count towards."""
    return "decode" if worker == INGEST else worker


def takes_shared_pictures(name: str) -> bool:
    """Whether a stage needs pixels after a stage that shares its decoded frames (see StageSpec)."""
    before = STAGES[:STAGE_NAMES.index(name)]
    return SPECS[name].pixels and any(s.shares_pictures for s in before)


def takes_shared_jpegs(name: str) -> bool:
    """Whether a stage needs pixels after a stage that shares the frames' JPEGs (see StageSpec)."""
    before = STAGES[:STAGE_NAMES.index(name)]
    return SPECS[name].pixels and any(s.shares_jpegs for s in before)


def reader_of(prefix: str) -> StageSpec | None:
    return next((s for s in STAGES if s.reads == prefix), None)


def partitions(prefix: str, frame_partitions: int) -> int:
    if prefix == LIVE_FRAMES:
        return 1  # viewers get the frames in index order
    reader = reader_of(prefix)
    return 1 if reader is not None and reader.ordered else frame_partitions
