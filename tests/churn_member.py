"""One member of a consumer group whose task topics come and go, run as its own process by
tests/test_runtime.py (a native crash must take down this process, not the test run).

    python -m tests.churn_member BOOTSTRAP GROUP NAME LIVE_FILE

It reads the live task topics from LIVE_FILE (a JSON list, rewritten by the test), subscribes to exactly
those through the worker's InputReader, and produces one output record per input record to the task's
output topic, as a stage does. It runs until killed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from confluent_kafka import Producer

from posemesh.mesh import kafka
from posemesh.mesh.settings import Settings
from posemesh.stages.base import Recovery
from posemesh.stages.reading import InputReader


def main(bootstrap: str, group: str, name: str, live_file: Path) -> None:
    settings = Settings()
    settings.kafka_bootstrap = bootstrap
    reader = InputReader(settings, group, name, Recovery.REPLAY, lambda tps: None, lambda tps: None)
    producer = Producer(kafka.producer_config(settings, name))
    while True:
        try:
            live = json.loads(live_file.read_text())
        except (OSError, ValueError):  # being rewritten
            continue
        reader.subscribe([f"in_{t}" for t in live])
        for msg in reader.poll(16, 0.1):
            if msg.error() is not None:
                continue
            producer.produce(f"out_{msg.topic()[3:]}", msg.value())
            reader.done((msg.topic(), msg.partition()), msg.offset())
        producer.poll(0)
        reader.commit()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]))
