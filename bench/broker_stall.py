"""Does the local broker (Tansu) stall when its consumer groups rebalance as several uploads start writing?

    .venv/bin/python bench/broker_stall.py [--rounds 3] [--seconds 30] [--burst] [--left-open 150]
                                                                                  # about 2 minutes a round

What the mesh does when four uploads start right after the gateway topped its reserve of task ids up (CI, the
four-concurrent-tasks test, issue 21), with nothing else of the mesh: a broker of its own; four consumer groups
(the stages) of two members each, on the mesh's consumer settings, reading four tasks' topics (4 partitions)
and committing synchronously as the stages do; four idempotent producers on the mesh's producer settings
writing 180 kB records (1080p JPEGs) at 15 a second each. A round runs two trials:

- **rebalance**: at the moment the producers start, a fifth task's topic is created and every member
  subscribes to it too (the reserve's top-up), so every group rebalances while the frames start to flow;
- **steady**: the same, with the subscriptions left alone.

Printed for each trial: records written and read, the longest time no member read anything while records
were outstanding, and the slowest acknowledgement of a record a separate plain producer writes every 0.5 s.
`--left-open N`: N producers left open on the broker first, each having written to a topic since deleted
(what the tests' process had accumulated by the late full-suite runs that stalled; bench/broker_cost.py).
A trial whose longest gap passes 10 s is a stall; the broker's threads (state, kernel wait channel) are
printed then, to compare with `broker-silence.txt` from the mesh's tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from broker_cost import left_open  # bench/ is on sys.path: the script's own folder
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from posemesh.devstack.broker import LocalBroker
from posemesh.mesh import kafka
from posemesh.mesh.settings import Settings

GROUPS, MEMBERS, TASKS, PARTITIONS = 4, 2, 4, 4
RECORD_BYTES, RATE = 180_000, 15.0  # RATE: records a second per producer, unless --burst
STALL_S = 10.0


class Member(threading.Thread):
    """One consumer of a group: reads, commits what it read every 0.2 s, takes a new subscription when told."""

    def __init__(self, settings: Settings, group: str, name: str, topics: list[str], read: list[float]):
        super().__init__(daemon=True)
        self.consumer = Consumer(kafka.consumer_config(settings, group, name))
        self.topics, self.wanted, self.read = topics, topics, read
        self.count = 0
        self.stop = threading.Event()

    def run(self) -> None:
        self.consumer.subscribe(self.topics)
        offsets: dict[tuple[str, int], int] = {}
        committed = time.monotonic()
        while not self.stop.is_set():
            if self.wanted is not self.topics:
                self.topics = self.wanted
                self.consumer.subscribe(self.topics)
            for message in self.consumer.consume(64, 0.05):
                if message.error():
                    continue
                self.count += 1
                self.read[0] = time.monotonic()
                offsets[(message.topic(), message.partition())] = message.offset() + 1
            if offsets and time.monotonic() - committed > 0.2:
                try:
                    self.consumer.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                                         asynchronous=False)
                except Exception:  # noqa: BLE001 - a commit refused during a rebalance; the next one carries it
                    pass
                offsets, committed = {}, time.monotonic()
        self.consumer.close()


def write(settings: Settings, topic: str, records: int, paced: bool, acked: list[int]) -> None:
    producer = Producer(kafka.producer_config(settings, f"frames-{topic}"))
    payload = os.urandom(RECORD_BYTES)

    def delivered(err, _msg):
        if err is None:
            acked[0] += 1
    for i in range(records):
        producer.produce(topic, payload, partition=i % PARTITIONS, on_delivery=delivered)
        producer.poll(0)
        if paced:
            time.sleep(1 / RATE)
    producer.flush(60)


def probe(settings: Settings, topic: str, stop: threading.Event, worst: list[float]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "acks": "all", "linger.ms": 0})
    while not stop.is_set():
        began = time.monotonic()
        producer.produce(topic, b"probe")
        producer.flush(120)
        worst[0] = max(worst[0], time.monotonic() - began)
        stop.wait(0.5)


def threads_of(pid: int) -> str:
    states = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        states.append(f"{state}:{(task / 'wchan').read_text() or '0'}")
    return ", ".join(f"{s} x{states.count(s)}" for s in sorted(set(states)))


def trial(broker: LocalBroker, settings: Settings, admin: AdminClient, rebalance: bool, seconds: float,
          paced: bool) -> dict:
    records = int(seconds * RATE)  # each producer's
    stamp = time.time_ns()
    tasks = [f"raw_frames_{stamp}_{i}" for i in range(TASKS + 1)]
    admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in tasks[:TASKS]] + [NewTopic(f"probe_{stamp}", 1, 1)])
    time.sleep(2)
    read = [time.monotonic()]
    members = [Member(settings, f"stage{g}-{stamp}", f"stage{g}-{m}", tasks[:TASKS], read)
               for g in range(GROUPS) for m in range(MEMBERS)]
    for member in members:
        member.start()
    time.sleep(10)  # the groups joined and settled
    stop, worst = threading.Event(), [0.0]
    prober = threading.Thread(target=probe, args=(settings, f"probe_{stamp}", stop, worst), daemon=True)
    prober.start()
    if rebalance:
        admin.create_topics([NewTopic(tasks[TASKS], PARTITIONS, 1)])
        for member in members:
            member.wanted = tasks
    acked = [0]
    writers = [threading.Thread(target=write, args=(settings, t, records, paced, acked), daemon=True)
               for t in tasks[:TASKS]]
    began, read[0], gap, seen = time.monotonic(), time.monotonic(), 0.0, ""
    for writer in writers:
        writer.start()
    expected = GROUPS * TASKS * records
    while time.monotonic() - began < seconds + 90 and sum(m.count for m in members) < expected:
        time.sleep(0.2)
        quiet = time.monotonic() - read[0]
        if quiet > gap:
            gap = quiet
            if gap > STALL_S and not seen:
                seen = threads_of(broker.proc.pid)
    stop.set()
    for member in members:
        member.stop.set()
    for writer in writers:
        writer.join(70)
    prober.join(130)
    for member in members:
        member.join(30)
    admin.delete_topics(tasks[:TASKS + (1 if rebalance else 0)] + [f"probe_{stamp}"])
    return {"written": TASKS * records, "acked": acked[0], "read": sum(m.count for m in members),
            "expected": expected, "gap": gap, "probe": worst[0], "threads": seen,
            "took": time.monotonic() - began}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="how long each producer writes")
    parser.add_argument("--burst", action="store_true",
                        help="each producer writes its records as fast as it can, as the gateway's decoders do")
    parser.add_argument("--left-open", type=int, default=0, metavar="N",
                        help="producers left open on the broker first (leaked ones, as in the tests' process)")
    args = parser.parse_args()
    with LocalBroker() as broker:
        settings = Settings()
        settings.kafka_bootstrap = broker.bootstrap
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        leaked = left_open(settings, admin, args.left_open)
        if leaked:
            print(f"{len(leaked)} producers left open on the broker")
        pace = "as fast as they can" if args.burst else f"at {RATE:g}/s"
        print(f"{GROUPS} groups x {MEMBERS} members, {TASKS} producers x {int(args.seconds * RATE)} records of "
              f"{RECORD_BYTES // 1000} kB {pace}\n")
        print("| round | trial | written | acked | read / expected | longest read gap s | slowest probe s | took s |")
        print("|---|---|---|---|---|---|---|---|")
        stalls = {"rebalance": 0, "steady": 0}
        for r in range(args.rounds):
            for mode in ("rebalance", "steady"):
                res = trial(broker, settings, admin, mode == "rebalance", args.seconds, not args.burst)
                stalls[mode] += res["gap"] > STALL_S
                print(f"| {r + 1} | {mode} | {res['written']} | {res['acked']} | {res['read']} / {res['expected']} "
                      f"| {res['gap']:.1f} | {res['probe']:.1f} | {res['took']:.0f} |", flush=True)
                if res["threads"]:
                    print(f"\nstalled: the broker's threads {res['threads']}\n", flush=True)
        print(f"\nstalls (a read gap over {STALL_S:g} s): rebalance {stalls['rebalance']}/{args.rounds}, "
              f"steady {stalls['steady']}/{args.rounds}")


if __name__ == "__main__":
    main()
