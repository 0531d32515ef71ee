"""What the local broker (Tansu) spends its CPU on: the bytes it carries, or the requests it answers.

    .venv/bin/python bench/broker_cost.py                 # about 6 minutes
    .venv/bin/python bench/broker_cost.py --only idle     # part 3 alone, about a minute
    .venv/bin/python bench/broker_cost.py --only stale    # part 4 alone, about 2 minutes

On a broker of its own (devstack's LocalBroker), with the mesh's own client settings (mesh/kafka.py):

1. **Per message, by size**: one producer writes 300 messages at 10 a second (a 1080p frame's pace) into a
   topic of 4 partitions while 1 or 3 consumer groups read all of them (3: detect, pose and annotate reading
   every frame's JPEG). Printed: the broker's CPU ms per message, for 180 kB (a 1080p JPEG), 18 kB and 1 kB.
2. **Per empty fetch**: one consumer on an idle topic of 1 or 8 partitions, at several fetch.wait.max.ms
   (the local broker holds an empty fetch for its whole wait, so the wait sets the request rate). Printed:
   the broker's CPU, % of one core.
3. **Per idle producer**: producers that each wrote one record to a task topic, since deleted, and were
   then left open: what a producer leaked by its own delivery callbacks cost (mesh/kafka.py's Sender,
   until December 2026). Each refreshes its metadata every topic.metadata.refresh.interval.ms (the mesh's
   500 ms). Printed: the broker's CPU, % of one core, for 0, 25 and 100 of them.
4. **Per deleted topic a producer once wrote to** (`--only stale`): one producer with a stage worker's settings
   (a 10 s metadata refresh) that wrote a record to each of 0, 1000 or 5000 topics, deleted since. librdkafka
   asks about every topic a producer ever wrote to for as long as it lives, and a worker writes one or two a
   task: what a worker's producer would cost after that many tasks, had it not been replaced
   (POSEMESH_PRODUCER_TOPICS_MAX, stages/worker.py). Printed: the broker's CPU and this process's (the
   producer's threads, and the idle admin client's), % of one core, over 30 s.

Process CPU of the broker from /proc (utime + stime). One run each: compare within a table.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from posemesh.devstack.broker import LocalBroker
from posemesh.mesh import kafka
from posemesh.mesh.settings import Settings

SIZES = (180_000, 18_000, 1_000)
READERS = (3, 1)
MESSAGES, RATE = 300, 10.0
WAITS_MS = (10, 50, 200)


def broker_cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Readers:
    """Consumers, each in a group of its own, reading a topic from the start on threads of this process."""

    def __init__(self, settings: Settings, topic: str, count: int, **overrides):
        self.read = [0] * count
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._consume, args=(settings, topic, i, overrides))
                        for i in range(count)]
        for thread in self.threads:
            thread.start()

    def _consume(self, settings: Settings, topic: str, i: int, overrides: dict) -> None:
        consumer = Consumer({**kafka.consumer_config(settings, f"{topic}-reader-{i}", f"reader-{i}"),
                             "auto.offset.reset": "earliest", **overrides})
        consumer.subscribe([topic])
        while not self.stop.is_set():
            for message in consumer.consume(64, 0.05):
                if not message.error():
                    self.read[i] += 1
        consumer.close()

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()


def per_message(broker: LocalBroker, settings: Settings, admin: AdminClient, size: int, readers: int) -> float:
    topic = f"bytes-{size}-{readers}-{time.time_ns()}"
    admin.create_topics([NewTopic(topic, 4, 1)])[topic].result()
    group = Readers(settings, topic, readers)
    time.sleep(3)  # the groups joined
    producer = Producer(kafka.producer_config(settings, "broker-cost"))
    payload = os.urandom(size)
    before, start = broker_cpu_s(broker.proc.pid), time.monotonic()
    for i in range(MESSAGES):
        producer.produce(topic, payload, partition=i % 4)
        producer.poll(0)
        time.sleep(1 / RATE)
    producer.flush()
    while min(group.read) < MESSAGES and time.monotonic() - start < 120:
        time.sleep(0.05)
    used = broker_cpu_s(broker.proc.pid) - before
    group.close()
    return 1000 * used / MESSAGES


def settled_cpu_percents(pids: list[int], settle_s: float = 5.0, measure_s: float = 10.0) -> list[float]:
    """Each process's CPU, % of one core, over the same `measure_s` after `settle_s` for the clients to settle."""
    time.sleep(settle_s)
    before, started = [broker_cpu_s(pid) for pid in pids], time.monotonic()
    time.sleep(measure_s)
    took = time.monotonic() - started
    return [100 * (broker_cpu_s(pid) - b) / took for pid, b in zip(pids, before)]


def settled_cpu_percent(broker: LocalBroker, settle_s: float = 5.0, measure_s: float = 10.0) -> float:
    """The broker's CPU, % of one core, over `measure_s` after `settle_s` for the clients to settle."""
    return settled_cpu_percents([broker.proc.pid], settle_s, measure_s)[0]


def empty_fetches(broker: LocalBroker, settings: Settings, admin: AdminClient, partitions: int, wait_ms: int) -> float:
    topic = f"idle-{partitions}-{wait_ms}-{time.time_ns()}"
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result()
    group = Readers(settings, topic, 1, **{"fetch.wait.max.ms": wait_ms})
    used = settled_cpu_percent(broker)
    group.close()
    return used


def left_open(settings: Settings, admin: AdminClient, count: int) -> list[Producer]:
    """`count` producers, each having written a record to a topic deleted since, as the leaked ones were."""
    producers = []
    for i in range(count):
        topic = f"gone-{count}-{i}-{time.time_ns()}"
        admin.create_topics([NewTopic(topic, 1, 1)])[topic].result()
        producer = Producer(kafka.producer_config(settings, f"left-open-{i}"))
        producer.produce(topic, b"x")
        producer.flush(10)
        admin.delete_topics([topic])[topic].result()
        producers.append(producer)
    return producers


def idle_producers(broker: LocalBroker, settings: Settings, admin: AdminClient, count: int) -> float:
    producers = left_open(settings, admin, count)
    used = settled_cpu_percent(broker)
    producers.clear()
    return used


def main() -> None:
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    with LocalBroker() as broker:
        settings = Settings()
        settings.kafka_bootstrap = broker.bootstrap
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        if only == "idle":
            return print_idle_producers(broker, settings, admin)
        if only == "stale":
            return print_stale_producer(broker, settings, admin)
        print(f"## Broker CPU ms per message: {MESSAGES} messages at {RATE:g}/s, 4 partitions\n")
        print("| message | " + " | ".join(f"{r} reader{'s' if r > 1 else ''}" for r in READERS) + " |")
        print("|---|" + "---|" * len(READERS))
        for size in SIZES:
            cells = [f"{per_message(broker, settings, admin, size, r):.2f}" for r in READERS]
            print(f"| {size / 1000:g} kB | " + " | ".join(cells) + " |", flush=True)
        print("\n## Broker CPU with one consumer on an idle topic, % of one core\n")
        print("| partitions | " + " | ".join(f"fetch.wait.max.ms {w}" for w in WAITS_MS) + " |")
        print("|---|" + "---|" * len(WAITS_MS))
        for partitions in (1, 8):
            cells = [f"{empty_fetches(broker, settings, admin, partitions, w):.1f}" for w in WAITS_MS]
            print(f"| {partitions} | " + " | ".join(cells) + " |", flush=True)
        print_idle_producers(broker, settings, admin)
        print_stale_producer(broker, settings, admin)


def print_idle_producers(broker: LocalBroker, settings: Settings, admin: AdminClient) -> None:
    counts = (0, 25, 100)
    print("\n## Broker CPU with producers left open after their topics were deleted, % of one core\n")
    print("| " + " | ".join(f"{n} producers" for n in counts) + " |")
    print("|" + "---|" * len(counts))
    print("| " + " | ".join(f"{idle_producers(broker, settings, admin, n):.1f}" for n in counts) + " |", flush=True)


def stale_producer(broker: LocalBroker, settings: Settings, admin: AdminClient, topics: int) -> tuple[float, float]:
    """The broker's CPU and this process's (nothing else of it runs meanwhile), % of one core, over 30 s after 5 s
    to settle, with one producer that wrote to `topics` topics, deleted since."""
    names = [f"stale-{topics}-{i}-{time.time_ns()}" for i in range(topics)]
    hundreds = [names[i:i + 100] for i in range(0, topics, 100)]  # an admin request each
    for batch in hundreds:
        for future in admin.create_topics([NewTopic(t, 1, 1) for t in batch]).values():
            future.result()
    producer = Producer({**kafka.producer_config(settings, f"stale-{topics}"), **kafka.QUIET_METADATA})
    for topic in names:
        producer.produce(topic, b"x")
        producer.poll(0)
    producer.flush(60)
    for batch in hundreds:
        for future in admin.delete_topics(batch).values():
            future.result()
    used, own = settled_cpu_percents([broker.proc.pid, os.getpid()], measure_s=30.0)
    del producer
    return used, own


def print_stale_producer(broker: LocalBroker, settings: Settings, admin: AdminClient) -> None:
    print("\n## One producer that wrote to topics deleted since, % of one core\n")
    print("| deleted topics | broker | the producer's process |")
    print("|---|---|---|")
    for count in (0, 1000, 5000):
        used, own = stale_producer(broker, settings, admin, count)
        print(f"| {count} | {used:.2f} | {own:.2f} |", flush=True)


if __name__ == "__main__":
    main()
