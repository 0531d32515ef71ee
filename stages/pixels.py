"""Frames' pixels by reference: the JPEG of a frame, read from the raw_frames_<task> record that holds it.

Only raw_frames_<task> carries pixels (see mesh/pipeline.py); later topics carry metadata and a
FrameRef (partition, offset). A stage that needs pixels after the first (pose, annotate) fetches them
here, with a consumer of its own that joins no group: it assigns the partitions it needs, reads them
forward, and keeps what it read ahead in a small cache, because the next batch usually wants the next
offsets of the same partitions. A reference behind the read position is reached by a seek (a replica
that took a task over, a replay from frame 0).

Trade-offs, and what a multi-machine deployment sees: every pixel stage reads each frame's JPEG from
the broker once (network reads; Kafka serves them from its page cache), while the broker stores and
replicates it only once, and a redelivered or replayed metadata record costs a few hundred bytes, not
a quarter of a megabyte. The raw_frames topic must stay readable until the task's last stage is done:
the gateway's topic hand-off guarantees it (this reader's tasks are in the worker's heartbeats).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter, OrderedDict, defaultdict

from confluent_kafka import Consumer, KafkaError, TopicPartition

from posemesh.mesh import kafka, pipeline
from posemesh.mesh.settings import Settings
from posemesh.stages.base import FrameItem, StageError

log = logging.getLogger("posemesh.stage")

TP = tuple[str, int]
CACHE_BYTES = 64 * 1024 * 1024  # read-ahead kept for the next batches
FETCH_TIMEOUT_S = 30.0
SEEK_AHEAD = 256  # a reference further ahead than this is sought, not read up to
# A stage taking frames handed over on its host reads a task's JPEGs ahead from the broker only after this many
# batches in a row found most of their frames missing from the task's ring (the stage before is on another host).
MISSING_BATCHES_TO_READ_AHEAD = 2


class RingMisses:
    """Whether a task whose frames an earlier stage on this host hands over (stages/shared_pictures.py) has its
    JPEGs read ahead from the broker. Not while its ring gives the frames: each read costs the local broker about
    as much as a reader of every frame (bench/README.md's broker_cost). Again once its ring stays empty (the stage
    before is on another host) or went away. One batch of misses is not enough to say so: a task's first frames
    may come before its ring was made."""

    def __init__(self) -> None:
        self.streaks: Counter[str] = Counter()  # task -> batches in a row its ring mostly missed

    def expects_ring(self, task_id: str) -> bool:
        return self.streaks[task_id] < MISSING_BATCHES_TO_READ_AHEAD

    def batch(self, task_id: str, found: int, missed: int) -> bool | None:
        """A batch's count of the task's frames its ring gave and did not: whether the task's JPEGs are now read
        on demand (True), read ahead (False), or as before (None)."""
        if found and not missed:
            self.streaks[task_id] = 0
            return True
        if missed > found:
            self.streaks[task_id] += 1
            if not self.expects_ring(task_id):
                return False
        return None

    def forget(self, task_id: str) -> None:
        self.streaks.pop(task_id, None)


class RawFrames:
    def __init__(self, settings: Settings, client_id: str):
        self.consumer = Consumer({**kafka.consumer_config(settings, f"{client_id}-pixels-{uuid.uuid4().hex[:6]}",
                                                          f"{client_id}-pixels"),
                                  **kafka.QUIET_METADATA,  # it assigns its partitions itself
                                  "enable.auto.commit": False, "auto.offset.reset": "earliest",
                                  # Reading ahead is the point here: a deeper local queue and bigger fetches.
                                  "queued.max.messages.kbytes": 32 * 1024, "fetch.max.bytes": 8 * 1024 * 1024,
                                  "max.partition.fetch.bytes": 4 * 1024 * 1024})
        self.assigned: set[TP] = set()
        self.paused: set[TP] = set()
        # Topics read only for the frames asked for, paused again after each fetch: their frames mostly come
        # from a stage before on this host, decoded or as JPEGs (stages/shared_pictures.py), so reading ahead
        # would fetch JPEGs nobody uses.
        self.on_demand: set[str] = set()
        self.ring_misses = RingMisses()
        self.position: dict[TP, int] = {}  # next offset this reader will get from the partition
        self.cache: OrderedDict[tuple[TP, int], bytes] = OrderedDict()
        self.cached_bytes = 0
        self.fetches = 0
        self.reads = 0  # records read from raw_frames (read ahead included)
        self.bytes_read = 0

    # ------------------------------------------------------------------ the public side

    def fill(self, items: list[FrameItem]) -> None:
        """Put each frame's JPEG into it (frame.jpeg), from its source reference."""
        wanted: dict[tuple[TP, int], list[FrameItem]] = defaultdict(list)
        for item in items:
            if item.frame.jpeg:
                continue
            if not item.frame.HasField("source"):
                raise StageError(f"frame {item.frame.index} has no pixels and no reference to them")
            topic = kafka.task_topic(pipeline.PIXELS_TOPIC, item.task_id)
            wanted[((topic, item.frame.source.partition), item.frame.source.offset)].append(item)
        if not wanted:
            return
        found = self._fetch(set(wanted))
        for key, users in wanted.items():
            for item in users:
                item.frame.jpeg = found[key]

    def prepare(self, task_id: str, partitions: int) -> None:
        """A task started: assign its raw_frames partitions now, paused, so the first frame's pixels do not
        wait for the topic's metadata and the assignment (a few hundred milliseconds measured)."""
        topic = kafka.task_topic(pipeline.PIXELS_TOPIC, task_id)
        new = [TopicPartition(topic, p, 0) for p in range(partitions) if (topic, p) not in self.assigned]
        if not new:
            return
        self.consumer.incremental_assign(new)
        self.consumer.pause(new)
        for tp in new:
            key = (tp.topic, tp.partition)
            self.assigned.add(key)
            self.paused.add(key)
            self.position[key] = 0

    def warm(self, task_id: str, partitions: list[int], on: bool = True) -> None:
        """Start (or stop) reading ahead the task's raw_frames partitions that this replica will need: the
        replica was just given (or lost) the matching input partitions. Frames then arrive before their
        metadata asks for them (a task's first frame waited 0.2-0.5 s for its pixels without this)."""
        topic = kafka.task_topic(pipeline.PIXELS_TOPIC, task_id)
        tps = [(topic, p) for p in partitions if (topic, p) in self.assigned]
        if on and topic in self.on_demand:
            return  # read when asked for only (read_on_demand)
        if on:
            self._resume([tp for tp in tps if tp in self.paused])
        else:
            pause = [tp for tp in tps if tp not in self.paused]
            if pause:
                self.consumer.pause([TopicPartition(t, p) for t, p in pause])
                self.paused.update(pause)

    def read_on_demand(self, task_id: str, on: bool = True) -> None:
        """Read the task's frames only when asked for them (its partitions paused, no read-ahead), or read
        ahead again."""
        topic = kafka.task_topic(pipeline.PIXELS_TOPIC, task_id)
        if on == (topic in self.on_demand):
            return
        tps = [tp for tp in self.assigned if tp[0] == topic]
        if on:
            self.on_demand.add(topic)
            pause = [tp for tp in tps if tp not in self.paused]
            if pause:
                self.consumer.pause([TopicPartition(t, p) for t, p in pause])
                self.paused.update(pause)
        else:
            self.on_demand.discard(topic)
            self._resume([tp for tp in tps if tp in self.paused])

    def expect_handover(self, task_id: str) -> None:
        """The task's frames should come handed over on this host: read its JPEGs on demand, unless its ring has
        been found mostly empty."""
        if self.ring_misses.expects_ring(task_id):
            self.read_on_demand(task_id, True)

    def handed_over(self, task_id: str, found: int, missed: int) -> None:
        """How many of a batch's frames of the task came handed over and how many did not (RingMisses)."""
        on_demand = self.ring_misses.batch(task_id, found, missed)
        if on_demand is not None:
            self.read_on_demand(task_id, on_demand)

    def drop_task(self, task_id: str) -> None:
        """Stop reading the task's raw frames (it ended, or left this worker): its topic may then go."""
        topic = kafka.task_topic(pipeline.PIXELS_TOPIC, task_id)
        self.on_demand.discard(topic)
        self.ring_misses.forget(task_id)
        gone = [tp for tp in self.assigned if tp[0] == topic]
        if gone:
            self.consumer.incremental_unassign([TopicPartition(t, p) for t, p in gone])
        for tp in gone:
            self.assigned.discard(tp)
            self.paused.discard(tp)
            self.position.pop(tp, None)
        for key in [k for k in self.cache if k[0][0] == topic]:
            self.cached_bytes -= len(self.cache.pop(key))

    def reading_tasks(self) -> set[str]:
        return {kafka.task_of_topic(t) for t, _p in self.assigned} - {None}

    def close(self) -> None:
        """Destroy the client without Consumer.close(), which can wait forever inside librdkafka (seen at a
        worker's shutdown when trying librdkafka 2.4.0). This reader commits nothing and is in no group's
        assignment (it assigns its partitions itself), so there is nothing to hand over."""
        consumer, self.consumer = self.consumer, None
        self.assigned, self.paused = set(), set()
        del consumer  # the last reference: confluent-kafka destroys it with NO_CONSUMER_CLOSE

    # ------------------------------------------------------------------ reading

    def _fetch(self, keys: set[tuple[TP, int]]) -> dict[tuple[TP, int], bytes]:
        self.fetches += 1
        found = {k: self.cache.pop(k) for k in keys if k in self.cache}
        for k in found:
            self.cached_bytes -= len(found[k])
        missing = keys - set(found)
        if not missing:
            return found
        lowest: dict[TP, int] = {}
        for tp, offset in missing:
            lowest[tp] = min(offset, lowest.get(tp, offset))
        self._position_for(lowest)
        deadline = time.monotonic() + FETCH_TIMEOUT_S
        while missing:
            if time.monotonic() > deadline:
                raise StageError(f"could not read {len(missing)} frames' pixels from {pipeline.PIXELS_TOPIC} "
                                 f"within {FETCH_TIMEOUT_S:.0f} s")
            # consume() waits for a full batch or its whole timeout: short rounds keep a fetch of a
            # few frames from costing 100 ms each (measured: 205-409 ms for a task's first frame).
            for msg in self.consumer.consume(num_messages=64, timeout=0.005):
                error = msg.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        log.debug("pixel read: %s", error)
                    continue
                self.reads += 1
                self.bytes_read += len(msg.value())
                tp, offset = (msg.topic(), msg.partition()), msg.offset()
                self.position[tp] = offset + 1
                key = (tp, offset)
                if key in missing:
                    found[key] = self._jpeg_of(msg.value())
                    missing.discard(key)
                elif key not in self.cache:
                    jpeg = self._jpeg_of(msg.value())
                    self.cache[key] = jpeg
                    self.cached_bytes += len(jpeg)
            self._bound_cache(set(tp for tp, _o in missing))
        rest = [tp for tp in self.assigned if tp[0] in self.on_demand and tp not in self.paused]
        if rest:
            self.consumer.pause([TopicPartition(t, p) for t, p in rest])
            self.paused.update(rest)
        return found

    @staticmethod
    def _jpeg_of(value: bytes) -> bytes:
        from posemesh.v1 import pipeline_pb2 as pb

        return pb.StageRecord.FromString(value).frame.jpeg

    def _position_for(self, lowest: dict[TP, int]) -> None:
        """Make every partition with a missing frame read from (at most) that frame's offset."""
        new = [TopicPartition(t, p, o) for (t, p), o in lowest.items() if (t, p) not in self.assigned]
        if new:
            self.consumer.incremental_assign(new)
            for tp in new:
                key = (tp.topic, tp.partition)
                self.assigned.add(key)
                self.position[key] = tp.offset
        for tp, offset in lowest.items():
            at = self.position.get(tp, offset)
            if at > offset or offset - at > (0 if tp[0] in self.on_demand else SEEK_AHEAD):
                self.consumer.seek(TopicPartition(tp[0], tp[1], offset))
                self.position[tp] = offset
        self._resume([tp for tp in self.paused if tp in lowest])

    def _resume(self, tps: list[TP]) -> None:
        """Fetch from these paused partitions again, from where this reader is in each (kafka.resume: sought there, and
        librdkafka woken when nothing else of this reader fetches; an on-demand read of one frame took 700 ms with a
        resume alone)."""
        others_fetching = self.assigned - self.paused - set(tps)
        kafka.resume(self.consumer, tps, {tp: self.position[tp] for tp in tps if tp in self.position},
                     wake=not others_fetching)
        self.paused.difference_update(tps)

    def _bound_cache(self, busy: set[TP]) -> None:
        """Keep the read-ahead bounded: pause partitions nobody waits on now, drop the oldest entries."""
        if self.cached_bytes <= CACHE_BYTES:
            return
        idle = [tp for tp in self.assigned if tp not in busy and tp not in self.paused]
        if idle:
            self.consumer.pause([TopicPartition(t, p) for t, p in idle])
            self.paused.update(idle)
        while self.cached_bytes > CACHE_BYTES and self.cache:
            _key, jpeg = self.cache.popitem(last=False)
            self.cached_bytes -= len(jpeg)
