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
