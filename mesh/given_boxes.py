"""Boxes a client gives instead of running the detector (TaskOptions.given_boxes), from the upload request to
the frames. The gateway checks them (gateway/validation.py) and keeps them with the upload, as a blob next to
it (`names.given_boxes_key`): records and control events carry the options on every message, and up to 100,000
boxes copied onto every frame's record would multiply what the broker carries. The task's options keep only
their summary (`BoxesGiven`). Whoever decodes the
upload (the gateway, or a replica of the ingest stage) puts each frame's boxes on its raw_frames record, and
detect keeps them instead of running YOLOX."""

from __future__ import annotations

import hashlib

from posemesh.mesh import names
from posemesh.v1 import task_service_pb2 as tpb


def beyond(given: dict[int, list[tpb.Box]], frame_count: int) -> str:
    """The task's warning when boxes were given for frames the upload does not have ("" when none were)."""
    past = sum(1 for index in given if index >= frame_count)
    if not past:
        return ""
    return (f"boxes were given for {past} frame{'s' if past > 1 else ''} past the last of the {frame_count} "
            "analysed (frame_index counts "
            "the analysed frames from 0, after sample_fps): they were not used")


def encode(given: list[tpb.FrameBoxes]) -> bytes:
    """The blob kept with the upload, serialized deterministically: its hash is the summary's."""
    return tpb.TaskOptions(given_boxes=given).SerializeToString(deterministic=True)


def summary(given: list[tpb.FrameBoxes], blob: bytes) -> tpb.BoxesGiven:
    """What the task records of the boxes (the boxes themselves stay with the upload, as `blob`)."""
    return tpb.BoxesGiven(boxes=sum(len(f.boxes) for f in given), frames=len(given),
                          sha256=hashlib.sha256(blob).hexdigest())


def decode(data: bytes) -> dict[int, list[tpb.Box]]:
    """The kept blob -> each listed frame's boxes, by frame index."""
    return {f.frame_index: list(f.boxes) for f in tpb.TaskOptions.FromString(data).given_boxes}


GONE = "the boxes given with the upload are not in the blob store any more; please upload again"


def load(blobs, task: tpb.Task) -> dict[int, list[tpb.Box]] | None:
    """The boxes given with a task's upload, by frame index, from the blob store (mesh/blobs.py); None when none
    were given (the detector runs). Raises LookupError(GONE) when they were and are not stored any more."""
    if not task.options.HasField("boxes_given"):
        return None
    key = names.given_boxes_key(task.task_id)
    if blobs.size(key) is None:
        raise LookupError(GONE)
    try:
        return decode(b"".join(blobs.read_chunks(key)))
    except FileNotFoundError:  # deleted since: the task ended meanwhile
        raise LookupError(GONE) from None
