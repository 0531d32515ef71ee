"""The Sender every posemesh process writes records with (mesh/kafka.py), against the real local broker."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from posemesh.mesh import kafka
from tests.conftest import make_settings


def test_a_record_the_producer_refused_outright_fails_the_writers_flush_like_a_failed_delivery(broker, tmp_path):
    settings = make_settings(broker, tmp_path)
    topic = f"sender-{uuid.uuid4().hex[:8]}"
    kafka.create_topics(kafka.admin(settings), [kafka.TopicSpec(topic, 1, {})])
    sender = kafka.Sender(Producer(kafka.producer_config(settings, "test-sender")))
    sender.send(topic, b"one")
    assert sender.delivered(30)  # acknowledged, no error so far
    # A record the producer refuses before it is queued: produce() raises, as it does once the producer has
    # failed for good (what a stage worker's _produce keeps as a delivery error).
    with pytest.raises(KafkaException) as raised:
        sender.send(topic, b"\0" * (kafka.MAX_MESSAGE_BYTES + 1))
    refused = raised.value
    assert refused.args[0].code() == KafkaError.MSG_SIZE_TOO_LARGE
    sender.keep_error(refused)
    sender.send(topic, b"two")
    assert sender.flush(30) == 0  # "two" itself was acknowledged...
    assert not sender.delivered(30)  # ...but the writer's check says what was refused
    assert sender.errors == [refused]
    assert kafka.delete_topics(kafka.admin(settings), [topic]) == [topic]


def test_a_task_producers_first_record_is_written_at_once(broker, tmp_path):
    """Every task's frames go out through a producer of its own (mesh/frames.py), so that producer's first record is
    the task's first frame. A new idempotent producer gets its producer id, and sends anything, only 0.5 s after it
    is made (librdkafka's id timer); those taken from kafka.SPARE_PRODUCERS were made ahead (the process's first
    ones when it started), as many as asked to wait ready, so a burst of tasks starting together finds them ready
    too."""
    import time

    settings = make_settings(broker, tmp_path)
    topic = f"sparetest_{uuid.uuid4().hex[:8]}"
    kafka.create_topics(kafka.admin(settings), [kafka.TopicSpec(topic, 1, {})])
    config = {**kafka.producer_config(settings, "sparetest"), "client.id": "sparetest-frames"}

    def first_record_s(producer: Producer) -> float:
        t0 = time.monotonic()
        producer.produce(topic, b"frame 0")
        assert producer.flush(10) == 0
        return time.monotonic() - t0

    def bursts(*sizes: int) -> list[float]:
        waits = []
        for burst in sizes:
            time.sleep(0.7)  # bursts start further apart than a spare takes to get its id
            producers = [kafka.SPARE_PRODUCERS.take(config, ready=3) for _ in range(burst)]  # tasks starting together
            waits += [first_record_s(producer) for producer in producers]
        return waits

    new = first_record_s(Producer(config))
    kafka.SPARE_PRODUCERS.stock(config, 3)  # as the process starts, for its first tasks
    waits = bursts(1, 3, 1, 2)
    # None stocked (the spares dropped: a broker that lost its data): the first task's is new, and three are made
    # then for the next ones.
    kafka.SPARE_PRODUCERS.clear()
    kafka.SPARE_PRODUCERS.take(config, ready=3)
    waits += bursts(3)
    assert max(waits) < 0.25, f"seconds to a task producer's first record: {waits} (a new producer: {new:.2f})"
