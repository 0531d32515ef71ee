"""The stage runtime's Kafka handling, with a real consumer on the real broker (no Triton needed)."""

from __future__ import annotations

import time

from confluent_kafka import Consumer, Producer, TopicPartition

from posemesh import kafka
from posemesh.stages.offsets import OffsetBook
from posemesh.stages.runtime import Stage, StageWorker
from tests.conftest import make_settings


class Discard(Stage):
    name = "discard"
    input_prefix = kafka.RAW_FRAMES

    def process(self, items, tasks):
        pass


def consume(consumer, worker, want: int, seconds: float) -> int:
    got, deadline = 0, time.monotonic() + seconds
    while got < want and time.monotonic() < deadline:
        msg = consumer.poll(0.1)
        if msg is not None and not msg.error():
            worker.positions[(msg.topic(), msg.partition())] = msg.offset() + 1
            got += 1
    return got


def test_partitions_paused_by_flow_control_resume_after_a_rebalance(broker, tmp_path):
    """librdkafka keeps a partition's pause through an eager revoke and re-assign. A worker that paused
    a partition (flow control) and then re-subscribed (a task started) must not leave it paused: that
    stalled a task for good under four concurrent uploads."""
    settings = make_settings(broker, tmp_path)
    kafka.create_topics(kafka.admin(settings), [kafka.TopicSpec("pausetest_a", 1, {}),
                                                kafka.TopicSpec("pausetest_b", 1, {})])
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(10):
        producer.produce("pausetest_a", b"%d" % i)
    producer.flush(10)

    worker = StageWorker(Discard(), settings)
    worker.book = OffsetBook()
    consumer = worker.consumer = Consumer(kafka.consumer_config(settings, f"pausetest{time.monotonic_ns()}", "w"))
    consumer.subscribe(["pausetest_a"], on_assign=worker._on_assign, on_revoke=worker._on_revoke)
    assert consume(consumer, worker, 3, 15) == 3
    consumer.pause([TopicPartition("pausetest_a", 0)])
    worker.paused.add(("pausetest_a", 0))
    consumer.subscribe(["pausetest_a", "pausetest_b"], on_assign=worker._on_assign, on_revoke=worker._on_revoke)
    assert consume(consumer, worker, 7, 15) == 7  # the rest, after the rebalance, from where it was
    assert worker.paused == set()
    consumer.close()
