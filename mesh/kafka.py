"""Kafka conventions shared by the gateway and the workers: topic names, client configs, admin calls.

The same code runs against the local Tansu broker and against Apache Kafka; the settings below are the
ones measured to behave on both (see ../shared/RUNTIME-NOTES.md for the local broker's quirks).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass

from confluent_kafka import OFFSET_END, Consumer, KafkaException, Producer, TopicCollection, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from posemesh.mesh import pipeline
from posemesh.mesh.names import TASK_ID_PATTERN
from posemesh.mesh.pipeline import BYTETRACK, LIVE_FRAMES, RAW_FRAMES, RTMPOSE, TASK_TOPIC_PREFIXES, YOLOX  # noqa: F401
from posemesh.mesh.settings import Settings
from posemesh.v1 import pipeline_pb2 as pb

log = logging.getLogger("posemesh.kafka")

# Shared topics, never deleted: task lifecycle for the workers, and worker events for the gateway.
CONTROL_TOPIC = "posemesh.control"
EVENTS_TOPIC = "posemesh.events"
# Uploads to decode (IngestJob), read by the ingest stage's consumer group when POSEMESH_INGEST=stage.
INGEST_TOPIC = "posemesh.ingest"
# Never written to: every worker stays subscribed to it, so a worker with no task left keeps its group
# membership instead of leaving and re-joining. On the local broker, two members of a round-robin group
# that unsubscribed and subscribed again at about the same time were never given partitions again.
IDLE_TOPIC = "posemesh.idle"

TASK_TOPIC_RE = re.compile(rf"^({'|'.join(TASK_TOPIC_PREFIXES)})_({TASK_ID_PATTERN})$")
MAX_MESSAGE_BYTES = 20 * 1024 * 1024


def task_topic(prefix: str, task_id: str) -> str:
    return f"{prefix}_{task_id}"


# The topics a task gets when it starts: the pipeline's. Its live-frames topic is made when the first
# viewer asks for it (WatchFrames): most tasks are never watched, and every topic made costs the broker a
# metadata change that every client's consumer group hears about while tasks are starting.
PIPELINE_TOPIC_PREFIXES: tuple[str, ...] = tuple(p for p in TASK_TOPIC_PREFIXES if p != LIVE_FRAMES)


def task_topics(task_id: str) -> list[str]:
    """Every topic a task may have (what is deleted when it ends)."""
    return [task_topic(p, task_id) for p in TASK_TOPIC_PREFIXES]


def task_of_topic(topic: str) -> str | None:
    m = TASK_TOPIC_RE.match(topic)
    return m.group(2) if m else None


def partitions_for(prefix: str, settings: Settings) -> int:
    """Several partitions where the reading stage treats frames independently (replicas share a task),
    one where it needs them in order (one replica owns the task): posemesh.mesh.pipeline decides."""
    return pipeline.partitions(prefix, settings.frame_partitions)


def base_config(settings: Settings) -> dict:
    return {
        "bootstrap.servers": settings.kafka_bootstrap,
        "topic.metadata.refresh.interval.ms": settings.kafka_metadata_refresh_ms,
        "socket.keepalive.enable": True,
        # librdkafka producers default to true: their periodic metadata refresh of a topic they once
        # wrote to would re-create it right after the gateway deleted it. Topics are created explicitly.
        "allow.auto.create.topics": False,
        # librdkafka (2.5+) asks the broker for a telemetry subscription (KIP-714) every few seconds per client:
        # 5 requests a second of an idle local stack's 83 (bench/README.md), for metrics nobody collects.
        "enable.metrics.push": False,
    }


# How long a producer keeps a record it could not deliver yet (librdkafka's message.timeout.ms, its default
# made explicit): it retries through a broker that is down or silent, and only then reports the record
# failed. A writer waiting for its records waits this long (plus DELIVERY_MARGIN_S): giving up sooner fails a
# task whose frames are merely late (CI: the local broker went silent for 60 s as four uploads started; the
# frame producers gave up after 60 s and failed all four, the broker answering a second later).
MESSAGE_TIMEOUT_S = 300.0
DELIVERY_MARGIN_S = 10.0


def producer_config(settings: Settings, client_id: str) -> dict:
    return {
        **base_config(settings),
        "client.id": client_id,
        "enable.idempotence": True,
        "acks": "all",
        "message.timeout.ms": int(MESSAGE_TIMEOUT_S * 1000),
        "linger.ms": 2,
        "message.max.bytes": MAX_MESSAGE_BYTES,
        # JPEG frames do not compress; the default 100k messages would let a producer run far ahead.
        "queue.buffering.max.kbytes": 256 * 1024,
    }


def consumer_config(settings: Settings, group_id: str, client_id: str) -> dict:
    return {
        **base_config(settings),
        "group.id": group_id,
        "client.id": client_id,
        "enable.auto.commit": False,  # offsets are committed by hand, only after the output exists
        "auto.offset.reset": "earliest",  # 'latest' replays a tail on the local broker
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": settings.kafka_heartbeat_ms,
        # Eager round-robin: spreads one-partition task topics over every member ("range" gives each such
        # topic to the first member, so other replicas idled); cooperative-sticky stalls on the local broker.
        "partition.assignment.strategy": "roundrobin",
        "fetch.wait.max.ms": settings.kafka_fetch_wait_ms,
        # Shallow fetches, a few frames each: librdkafka rotates the partition it starts a fetch with,
        # so consumption interleaves the partitions (and tasks) finely and frames flow roughly in index
        # order. The local broker ignores the per-partition limit and fills a fetch from one partition,
        # so the whole-fetch limit must be small too. A larger single message is still fetched whole.
        "max.partition.fetch.bytes": 512 * 1024,
        "fetch.max.bytes": 1024 * 1024,
        "queued.max.messages.kbytes": 2048,
        # librdkafka waits fetch.queue.backoff.ms (default 1 s) before fetching again once the local queue
        # holds queued.max.messages.kbytes (eight 1080p frames here), and fetch.error.backoff.ms (default
        # 500 ms) after a fetch that came back empty (short fetch.wait.max.ms makes those common). Both
        # stalled a new task's first frames by 0.5-2 s.
        "fetch.queue.backoff.ms": 20,
        "fetch.error.backoff.ms": 20,
        "receive.message.max.bytes": MAX_MESSAGE_BYTES + 4 * 1024 * 1024,
        "max.poll.interval.ms": 300000,
    }


# Clients that assign the partitions they read (the control and events followers, the pixel readers), the ingest
# replicas' group on posemesh.ingest (its partitions never change), admin clients (whose calls ask the broker
# each time) and the stage workers' producers (see StageWorker._open_kafka) learn nothing they need from the periodic
# metadata refresh, which the local stack runs every 500 ms for the clients that do (a memory-only broker that
# lost its topics: the gateway's producers, group members subscribing to topics as they are made). A broker that
# lost its data is found by the incarnation checks (ControlFollower, the gateway's BrokerWatch), which replace
# these clients; a partition that moved shows as a fetch error, which makes librdkafka refresh at once. Each such
# client asks the local broker two requests a second less (bench/broker_requests.py).
QUIET_METADATA = {"topic.metadata.refresh.interval.ms": 10_000}


# Followers of the control and events topics (a worker's TaskStarted/TaskEnded, the gateway's progress reports)
# fetch one partition all the time, also on an idle stack. The local broker answers a held fetch only when its
# wait is over, so at 50 ms each follower cost it ~14 fetches a second; at 250 ms a task start or a progress
# report is heard at most 0.2 s later. Apache Kafka answers a held fetch as soon as a record arrives.
FOLLOWER_FETCH_WAIT_MS = 250
WAKE_WAIT_S = 1.0  # resume(wake=True): the longest the leaders' answers are waited for (all of them)


def resume(consumer: Consumer, partitions: list[tuple[str, int]], at: dict[tuple[str, int], int],
           wake: bool = False) -> None:
    """Fetch from these paused partitions again, each one in `at` sought to that offset (where the resume would fetch
    from anyway). librdkafka acts on a resume only when the partition's broker thread next wakes up, which a consumer
    still fetching other partitions does every fetch.wait.max.ms, but one whose every other partition is paused only
    after up to a second (0.4-0.8 s measured on the local broker). The seek wakes that thread only when it changes
    the partition's fetch state, which a paused partition keeps ("active"). So with `wake` (say so when nothing
    else of this consumer is fetching) the partitions' leaders are also asked for their latest offsets, a round
    trip that wakes each one's thread: the first record then comes in 6 ms instead of 0.6-0.8 s
    (tests/test_runtime.py). One question (offsets_for_times: one request to each leader, all at once; 0.2 ms for
    four partitions on an idle local broker), because once a thread fetches, a question to its broker waits behind
    the fetch the broker holds (50 ms here), which is also why there is none without `wake`.
    A seek that fails (the partition is not fetching yet) leaves that partition to the resume."""
    if not partitions:
        return
    tps = [TopicPartition(t, p) for t, p in partitions]
    consumer.resume(tps)
    for (topic, partition), offset in at.items():
        try:
            consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as exc:
            log.debug("seek on resume: %s", exc)
    if wake:
        try:  # the offset asked for is a timestamp here, and -1 (OFFSET_END) means "the latest"
            consumer.offsets_for_times([TopicPartition(t, p, OFFSET_END) for t, p in partitions], timeout=WAKE_WAIT_S)
        except KafkaException as exc:  # a leader did not answer in time: the resume still stands
            log.debug("waking the fetchers of %s: %s", partitions, exc)


def follower_config(settings: Settings, group_id: str, client_id: str) -> dict:
    """A consumer that follows one shared topic (control, events) by assignment."""
    return {**consumer_config(settings, group_id, client_id), **QUIET_METADATA,
            "fetch.wait.max.ms": max(settings.kafka_fetch_wait_ms, FOLLOWER_FETCH_WAIT_MS)}


def _collect_errors(errors: list):
    """A delivery callback that holds the error list and nothing else. librdkafka keeps each unacknowledged
    record's callback where Python's garbage collector cannot see it, until a poll serves its report: a bound
    method of the Sender there held the Sender, and so the producer, its threads and broker connections, for
    as long as the process, whenever a producer was dropped with records unsent (a cancelled task, a broker
    that never answered). Dropping the producer now destroys it, unsent records and all."""

    def delivered(err, _msg) -> None:
        if err is not None:
            errors.append(err)

    return delivered


class SpareProducer:
    """Producers made ahead of need, for the next writer that would make a new one with the same configuration.

    A new idempotent producer sends nothing before it has its producer id, and librdkafka gets that id only 0.5 s after
    the producer is made: the cluster's metadata names the broker before a connection to it is up, and the id is then
    asked for again on a fixed 500 ms timer (`debug=eos`: "No brokers available for Idempotent producer", "Starting PID
    FSM timer: Coordinator not up"). Every task writes its frames through a producer of its own (mesh/frames.py,
    mesh/live.py), so each task's first frame reached the broker 0.5 s after it was encoded. take(config, ready=n)
    hands out the oldest spare made with that configuration (ready if it was made 0.5 s ago or more) and makes more,
    up to n waiting: a burst of up to n tasks finds its producers ready (4 concurrent uploads: detect's first
    records 0.30-0.51 s after the uploads' ends with 4, 0.16-1.19 s with 1, bench/README.md). stock(config, n) makes
    them before any is taken, so that a process's first upload or camera finds one too (FrameProducer.make_ready,
    LiveSource.make_ready). Spares of at most MAX_CONFIGS configurations are kept (the least recently taken or stocked
    one's go: another broker, in tests). An idle spare costs a connection and librdkafka's threads, and asks the broker
    for its broker list every 10 s (it knows no topic)."""

    MAX_CONFIGS = 4

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # By configuration, least recently taken or stocked first; each one's producers oldest first.
        self._spares: dict[tuple, list[Producer]] = {}

    def take(self, config: dict, ready: int = 1) -> Producer:
        """The oldest spare with this configuration (a new producer if there is none), with `ready` left waiting."""
        return self._restock(config, ready, take=True)

    def stock(self, config: dict, ready: int) -> None:
        """Make spares with this configuration until `ready` wait."""
        self._restock(config, ready, take=False)

    def _restock(self, config: dict, ready: int, take: bool) -> Producer | None:
        ready = max(1, ready)  # one at least: a process with no reserved ids still starts tasks
        key = tuple(sorted((name, str(value)) for name, value in config.items()))
        with self._lock:
            spares = self._spares.pop(key, [])
            taken = spares.pop(0) if take and spares else None
            spares += [Producer(config) for _ in range(ready - len(spares))]
            self._spares[key] = spares
            dropped = [self._spares.pop(k) for k in list(self._spares)[:-self.MAX_CONFIGS]]
        del dropped  # destroyed here: nothing was ever given to them
        if not take:
            return None
        return taken if taken is not None else Producer(config)

    def clear(self) -> None:
        """Drop every spare (a broker that lost its data: the next ones are made against the broker as it is now)."""
        with self._lock:
            dropped, self._spares = list(self._spares.values()), {}
        del dropped  # destroyed here


SPARE_PRODUCERS = SpareProducer()


class Sender:
    """How every posemesh process writes records: produce() that waits for room when the producer's local
    queue is full (BufferError), delivery errors collected for the writer to act on, and a flush with a
    deadline that a caller can cut short. One per Producer: its delivery callbacks run on the thread that
    polls or flushes it."""

    def __init__(self, producer: Producer):
        self.producer = producer
        self.errors: list = []
        self._delivered = _collect_errors(self.errors)
        self.topics: set[str] = set()  # every topic written to: the producer asks the broker about each for good

    def send(self, topic: str, data: bytes | None, partition: int = 0, key: bytes | str | None = None) -> None:
        self.topics.add(topic)
        while True:
            try:
                self.producer.produce(topic, data, partition=partition, key=key, on_delivery=self._delivered)
                return
            except BufferError:  # the local queue is full: let the broker take some
                self.producer.poll(0.05)

    def keep_error(self, exc: Exception) -> None:
        """A record the producer refused outright (a fatal producer error), kept with the delivery errors for the
        writer to act on at its flush, as for a record that failed in delivery."""
        self.errors.append(exc)

    def flush(self, timeout_s: float, give_up=lambda: False) -> int:
        """Wait until everything sent is acknowledged, in short slices so `give_up()` (a cancelled task, a
        lost broker) is acted on at once. Returns how many records are still undelivered."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = self.producer.flush(min(0.5, max(0.0, deadline - time.monotonic())))
            if not remaining or give_up() or time.monotonic() >= deadline:
                return remaining

    def delivered(self, timeout_s: float, give_up=lambda: False) -> bool:
        """flush() and no delivery error so far."""
        return self.flush(timeout_s, give_up) == 0 and not self.errors


def admin(settings: Settings) -> AdminClient:
    return AdminClient({**base_config(settings), **QUIET_METADATA})


@dataclass
class TopicSpec:
    name: str
    partitions: int
    config: dict


def task_topic_specs(task_id: str, settings: Settings,
                     prefixes: tuple[str, ...] = PIPELINE_TOPIC_PREFIXES) -> list[TopicSpec]:
    cfg = {"retention.ms": str(settings.topic_retention_ms), "max.message.bytes": str(MAX_MESSAGE_BYTES)}
    return [TopicSpec(task_topic(p, task_id), partitions_for(p, settings), cfg) for p in prefixes]


def create_topics(client: AdminClient, specs: list[TopicSpec], timeout: float = 15.0) -> None:
    """Create topics explicitly (producing to a missing topic would auto-create it with the wrong
    partition count). Topics that already exist are fine."""
    if not specs:
        return
    futures = client.create_topics(
        [NewTopic(s.name, num_partitions=s.partitions, replication_factor=-1, config=s.config) for s in specs],
        operation_timeout=timeout, request_timeout=timeout,
    )
    for _name, fut in futures.items():
        try:
            fut.result(timeout)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise
    wait_for_topics(client, [s.name for s in specs], timeout)


def wait_for_topics(client: AdminClient, names: list[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        present = set(client.list_topics(timeout=timeout).topics)
        if all(n in present for n in names):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics not visible after {timeout}s: {sorted(set(names) - present)}")
        time.sleep(0.05)


def delete_topics(client: AdminClient, names: list[str], timeout: float = 15.0) -> list[str]:
    """Delete topics; returns those that were deleted (missing ones are skipped silently)."""
    existing = set(client.list_topics(timeout=timeout).topics)
    names = [n for n in names if n in existing]
    if not names:
        return []
    futures = client.delete_topics(names, operation_timeout=timeout, request_timeout=timeout)
    deleted = []
    for name, fut in futures.items():
        try:
            fut.result(timeout)
            deleted.append(name)
        except KafkaException as exc:
            if exc.args[0].name() != "UNKNOWN_TOPIC_OR_PART":
                raise
    return deleted


def list_task_topics(client: AdminClient, timeout: float = 15.0) -> dict[str, list[str]]:
    """Every per-task topic on the broker, grouped by task id."""
    out: dict[str, list[str]] = {}
    for name in client.list_topics(timeout=timeout).topics:
        task = task_of_topic(name)
        if task:
            out.setdefault(task, []).append(name)
    return out


# What a task's control events say, one record key each (see control_key).
CONTROL_KINDS: tuple[str, ...] = ("reserved", "started", "viewers", "source_stopped", "ended")


def control_key(task_id: str, kind: str) -> bytes:
    """The key of a control event. posemesh.control is compacted on Apache Kafka, which keeps only the latest
    record of each key, so a key names one fact about one task: the task's latest TaskStarted (a re-run's
    epoch replaces the first), its latest viewer count, its end. Keyed by task alone, a ViewersChanged after
    TaskStarted would let compaction erase the TaskStarted of a running task, and a worker replaying the
    topic could no longer rebuild it (the local broker never compacts, so nothing there shows it)."""
    if kind not in CONTROL_KINDS:
        raise ValueError(f"unknown control event kind {kind!r}")
    return f"{task_id}/{kind}".encode()


def control_records(event: pb.ControlEvent) -> list[tuple[bytes, bytes | None]]:
    """The (key, value) records that publish one control event. A task's end also clears its other keys
    (tombstones: compaction then keeps one small TaskEnded per finished task, not its whole history)."""
    kind = event.WhichOneof("event")
    records: list[tuple[bytes, bytes | None]] = [(control_key(event.task_id, kind), event.SerializeToString())]
    if kind == "ended":
        records += [(control_key(event.task_id, k), None) for k in CONTROL_KINDS if k != "ended"]
    return records


def ensure_shared_topics(settings: Settings, client: AdminClient | None = None) -> None:
    cfg = {"max.message.bytes": str(MAX_MESSAGE_BYTES)}
    # Compaction keeps one record per key (task and kind of event, see control_key) on Apache Kafka.
    control = {**cfg, "cleanup.policy": "compact"}
    create_topics(client or admin(settings), [TopicSpec(CONTROL_TOPIC, 1, control), TopicSpec(EVENTS_TOPIC, 1, cfg),
                                              TopicSpec(IDLE_TOPIC, 1, cfg),
                                              TopicSpec(INGEST_TOPIC, settings.ingest_partitions, cfg)])


def incarnation(client: AdminClient, timeout: float = 5.0) -> str | None:
    """Which life of the broker's data this is: the topic id of posemesh.control (None while it does not
    exist). A broker that lost its data (the memory-only local broker after a restart; a wiped cluster)
    gives a re-created topic a new id, and every client must then start over: an idempotent producer
    never delivers again, and a consumer's old position silently skips the new topic's first records.
    Raises KafkaException when the broker cannot be reached."""
    future = client.describe_topics(TopicCollection([CONTROL_TOPIC]), request_timeout=timeout)[CONTROL_TOPIC]
    try:
        return str(future.result(timeout).topic_id)
    except KafkaException as exc:
        if exc.args[0].name() in ("UNKNOWN_TOPIC_OR_PART", "UNKNOWN_TOPIC_ID"):
            return None
        raise
