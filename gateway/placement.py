"""Which partition of posemesh.ingest a run's IngestJobs go to: one of the least busy ingest replica's.

Keyed by task, jobs land where their task id hashes: with 8 uploads and two replicas of 4 slots each, one
replica can get 5 and queue one for a whole decoding while the other has a slot free, since a consumer group
hands out partitions, not records. So the gateway places each run's first job itself. Every ingest replica lists in
its heartbeats (every second on posemesh.events, heard by every gateway) the partitions it holds and the tasks it
decodes or has queued; the gateway picks the replica with the fewest, counting the jobs it placed there that
no heartbeat lists yet, and of its partitions the one with the fewest of those (a rebalance later moves
partitions, not replicas). The partition is kept with the task for its run (gateway/store.py's
ingest_partition): every later job of the run goes there too, so a job written again after a gateway restart
reaches the replica already doing the run instead of a second replica decoding it too.

Best effort, and never in the way: with no replica heard from (the gateway just started, the broker lost its
data), the job is keyed by task as before. Several gateways each count only their own placements between
heartbeats.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

LIVENESS_S = 5.0  # a replica not heard from for this long gets no job (nor does a heartbeat this old count)
RECENT_S = 10.0  # a placement counts against its replica until a heartbeat lists its task, or this long


@dataclass
class Replica:
    heard_at: float  # the heartbeat's send time (the replica's clock, as gateway/topics.py keeps it)
    heard_here: float  # time.monotonic() here when it arrived
    tasks: set[str]
    partitions: list[int]
    placed: dict[str, tuple[int, float]] = field(default_factory=dict)  # task -> (partition, monotonic)


class IngestPlacement:
    def __init__(self, partitions: int, clock=time.monotonic, wall=time.time, rng: random.Random | None = None):
        self.partitions = partitions  # posemesh.ingest's: a replica's list is checked against it
        self.clock, self.wall, self.rng = clock, wall, rng or random.Random()
        self.lock = threading.Lock()
        self.replicas: dict[str, Replica] = {}

    def heard(self, worker: str, sent_at: float, tasks: list[str], partitions: list[int]) -> None:
        """An ingest replica's heartbeat: what it holds (nothing, during a rebalance) and what it does. One sent
        LIVENESS_S ago or more is no news: the events reader replays old heartbeats as it starts, dead replicas'
        among them."""
        if self.wall() - sent_at >= LIVENESS_S:
            return
        now = self.clock()
        with self.lock:
            known = self.replicas.get(worker)
            if known is not None and known.heard_at > sent_at:
                return  # an older heartbeat, late
            placed = {t: v for t, v in (known.placed if known else {}).items()
                      if t not in tasks and now - v[1] < RECENT_S}  # not taken yet, and recent
            held = [p for p in partitions if 0 <= p < self.partitions]
            self.replicas[worker] = Replica(sent_at, now, set(tasks), held, placed)

    def choose(self, task_id: str) -> int | None:
        """The partition for a run's first job, counted as placed there; None when no live replica holds any."""
        now = self.clock()
        with self.lock:
            live = [r for r in self.replicas.values() if r.partitions and now - r.heard_here < LIVENESS_S]
            if not live:
                return None
            for replica in live:
                replica.placed = {t: v for t, v in replica.placed.items() if now - v[1] < RECENT_S}
            load = {id(r): len(r.tasks | set(r.placed)) for r in live}
            fewest = min(load.values())
            replica = self.rng.choice([r for r in live if load[id(r)] == fewest])
            placed_on = Counter(p for p, _ in replica.placed.values())
            least = min(placed_on[p] for p in replica.partitions)
            partition = self.rng.choice([p for p in replica.partitions if placed_on[p] == least])
            replica.placed[task_id] = (partition, now)
            return partition

    def forget(self) -> None:
        """The broker lost its data: assignments start again."""
        with self.lock:
            self.replicas.clear()
