"""Where a live stream stopped, read back from a real broker (mesh/frames.py's `stream_so_far`): what a
gateway that takes a live task over goes on after."""

from __future__ import annotations

import secrets
import time

import pytest
from confluent_kafka import Producer

from posemesh.mesh import kafka, records
from posemesh.mesh.frames import stream_so_far
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb
from tests.conftest import make_settings

PARTITIONS = 4


@pytest.fixture
def stream(broker, tmp_path):
    """A fresh raw_frames topic, a producer writing frames to it as a live source does, and the read-back."""
    settings = make_settings(broker, tmp_path / "data")
    task_id = secrets.token_hex(8)
    topic = kafka.task_topic(kafka.RAW_FRAMES, task_id)
    kafka.create_topics(kafka.admin(settings), [kafka.TopicSpec(topic, PARTITIONS, {})])
    producer = Producer(kafka.producer_config(settings, "test-live-source"))

    def write(*indices: int, end: int | None = None) -> None:
        for i in indices:
            record = records.frame_record(task_id, tpb.TaskOptions(), 1, pb.Frame(index=i, timestamp_s=0.2 * i))
            producer.produce(topic, record.SerializeToString(), partition=records.partition_of(record, PARTITIONS))
        if end is not None:
            producer.produce(topic, records.end_of_stream_record(task_id, tpb.TaskOptions(), 1, end, 5.0)
                             .SerializeToString(), partition=0)
        assert producer.flush(10) == 0

    def read():
        return stream_so_far(kafka.consumer_config(settings, "test-resume", "test-resume"), task_id, 1, PARTITIONS)

    yield write, read
    kafka.delete_topics(kafka.admin(settings), [topic])


def test_an_empty_stream_starts_at_frame_zero(stream):
    _write, read = stream
    so_far = read()
    assert (so_far.frames, so_far.newest, so_far.closed) == (0, 0, False)
    assert so_far.start_time_s(time.time()) == 0.0


def test_a_dense_stream_goes_on_after_its_last_frame_later_by_the_gap(stream):
    write, read = stream
    write(*range(10))
    written = time.time()
    so_far = read()
    assert (so_far.frames, so_far.newest, so_far.hole, so_far.closed) == (10, 10, False, False)
    assert so_far.last_timestamp_s == pytest.approx(1.8)
    assert abs(so_far.last_written_s - written) < 5
    assert so_far.start_time_s(so_far.last_written_s + 12.5) == pytest.approx(1.8 + 12.5)


def test_a_lost_frame_with_later_ones_on_the_topic_is_a_hole(stream):
    """Frame 6 never landed (its partition's broker was gone) while 7 and 9 did: the stream is dense up to 6,
    which a new reader going on from 6 would contradict."""
    write, read = stream
    write(0, 1, 2, 3, 4, 5, 7, 8, 9)
    so_far = read()
    assert (so_far.frames, so_far.newest, so_far.hole) == (6, 10, True)


def test_a_closed_stream_says_so_with_its_count(stream):
    """The end of stream sits last in partition 0, after frame 4: the count is the one it gives."""
    write, read = stream
    write(*range(7), end=7)
    so_far = read()
    assert (so_far.closed, so_far.frames, so_far.hole) == (True, 7, False)
