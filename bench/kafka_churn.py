"""Does the installed Kafka client survive task topics being deleted under its consumer group?

    .venv/bin/python bench/kafka_churn.py [--tasks 150] [--runs 3]
    PYTHONPATH=/tmp/ck-2.4.0 .venv/bin/python bench/kafka_churn.py     # another confluent-kafka, installed
                                                                        # with pip install --target /tmp/ck-2.4.0

Starts the local broker and three members of one consumer group, each its own process (a native crash must
not take the bench with it), each reading the live task topics through the worker's InputReader and
producing one output record per input, as a stage does. Short tasks start (topics made, ten records) and end
(members drop the topics) while others run; each ended task's topics are deleted 0.3-1 s later. Prints, per
run, how many tasks it took until a member died (and how), or that none did.

Measured 2026-12-02 (issue 21): librdkafka 2.5.3, 2.6.1, 2.8.0, 2.12.1, 2.14.2 and 2.16.0 lost a member to
SIGSEGV (rd_kafka_metadata_update_op -> rd_kafka_metadata_cache_find: their metadata cache) within 6-36
tasks; 2.3.0 and 2.4.0 ran 141-211 tasks without. The mesh on 2.16 lost a track worker the same way after
about 550 tasks (the gateway's hand-off deletes a topic only once no worker reads it, which makes it rare,
not impossible). 2.4.0 is not the way out: after the memory-only broker restarts empty (topics made again
under the same names), destroying a 2.4.0 client crashes (stack overflow in rd_avl_remove_elm0 from
rd_kafka_metadata_cache_purge) or hangs. So 2.16.1 stays pinned; run this against a new release before
moving the pin.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def member(bootstrap: str, group: str, name: str, live_file: Path) -> None:
    from confluent_kafka import Producer

    from posemesh.mesh import kafka
    from posemesh.mesh.settings import Settings
    from posemesh.stages.base import Recovery
    from posemesh.stages.reading import InputReader

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
            if msg.error() is None:
                producer.produce(f"out_{msg.topic()[3:]}", msg.value())
                reader.done((msg.topic(), msg.partition()), msg.offset())
        producer.poll(0)
        reader.commit()


def churn(bootstrap: str, root: Path, tasks: int, seed: int) -> str:
    from confluent_kafka import Producer

    from posemesh.mesh import kafka
    from posemesh.mesh.settings import Settings

    settings = Settings()
    settings.kafka_bootstrap = bootstrap
    kafka.ensure_shared_topics(settings)
    admin = kafka.admin(settings)
    live_file = root / f"live-{seed}.json"
    live_file.write_text("[]")
    group = f"churn{time.monotonic_ns()}"
    members = [subprocess.Popen([sys.executable, __file__, "--member", bootstrap, group, f"m{i}", str(live_file)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(3)]
    producer = Producer(kafka.producer_config(settings, "churn-driver"))
    rng = random.Random(seed)
    live: dict[str, float] = {}  # task -> when it ends
    ended: dict[str, float] = {}  # task -> when its topics are deleted
    started = 0
    try:
        while started < tasks or live or ended:
            now = time.monotonic()
            if started < tasks and len(live) < 4 and rng.random() < 0.7:
                task = f"{seed:02d}{started:04d}{rng.getrandbits(40):010x}"
                kafka.create_topics(admin, [kafka.TopicSpec(f"{io}_{task}", 1, {}) for io in ("in", "out")])
                for _ in range(10):
                    producer.produce(f"in_{task}", os.urandom(300))
                producer.flush(5)
                live[task] = now + rng.uniform(0.5, 1.5)
                started += 1
            for task in [t for t, end in live.items() if now > end]:
                del live[task]
                ended[task] = now + rng.uniform(0.3, 1.0)
            live_file.with_suffix(".tmp").write_text(json.dumps(sorted(live)))
            os.replace(live_file.with_suffix(".tmp"), live_file)
            for task in [t for t, when in ended.items() if now > when]:
                kafka.delete_topics(admin, [f"in_{task}", f"out_{task}"])
                del ended[task]
            dead = [m.returncode for m in members if m.poll() is not None]
            if dead:
                how = ", ".join(signal.Signals(-c).name if c < 0 else f"exit {c}" for c in dead)
                return f"a member died ({how}) after {started} tasks"
            time.sleep(0.2)
        return f"no member died in {started} tasks"
    finally:
        for m in members:
            m.kill()
            m.wait()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--member":
        member(sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=150)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    import confluent_kafka

    from posemesh.devstack.broker import LocalBroker

    print(f"confluent-kafka {confluent_kafka.__version__}, librdkafka {confluent_kafka.libversion()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            with LocalBroker() as broker:  # a fresh broker per run: a crash leaves nothing for the next
                print(f"run {run + 1}: {churn(broker.bootstrap, Path(tmp), args.tasks, run)}", flush=True)


if __name__ == "__main__":
    main()
