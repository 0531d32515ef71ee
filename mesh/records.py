"""The records that travel on the per-task topics, built in one place: a frame, and the end of a task's
stream. Every producer of them (the gateway's upload and camera readers, every stage) builds them here, so
a field added to one kind of record reaches every writer."""

from __future__ import annotations

from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb


def frame_record(task_id: str, options: tpb.TaskOptions, epoch: int, frame: pb.Frame) -> pb.StageRecord:
    return pb.StageRecord(task_id=task_id, options=options, epoch=epoch, frame=frame)


def end_of_stream_record(task_id: str, options: tpb.TaskOptions, epoch: int, total_frames: int,
                         fps: float) -> pb.StageRecord:
    """The last record of a task's stream on a topic: how many frames (indices 0..total-1) came before it."""
    return pb.StageRecord(task_id=task_id, options=options, epoch=epoch,
                          end_of_stream=pb.EndOfStream(total_frames=total_frames, fps=fps))


def partition_of(record: pb.StageRecord, partitions: int) -> int:
    """Frames spread over a topic's partitions by index; the end of stream goes to partition 0."""
    return record.frame.index % partitions if record.HasField("frame") else 0
