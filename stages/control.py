"""Which tasks exist: a worker's view of posemesh.control, and of the broker's life.

The follower replays posemesh.control from its start, then follows it: `live` holds every task that has
started (with its options, video and epoch) and not ended, `ended` the ones that have. Every second it also
checks the broker's incarnation (posemesh.mesh.kafka.incarnation): when posemesh.control has become a new
topic, the broker lost its data, so the follower starts over on the new topic and bumps `generation`; the
worker then throws away every task's state and its Kafka clients (they cannot recover by themselves).
"""

from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from posemesh.mesh import kafka, tracing
from posemesh.mesh.settings import Settings
from posemesh.v1 import pipeline_pb2 as pb

log = logging.getLogger("posemesh.stage")

CHECK_EVERY_S = 1.0
CAUGHT_UP_QUIET_S = 3.0


class ControlFollower(threading.Thread):
    def __init__(self, settings: Settings, client_id: str):
        super().__init__(name="control", daemon=True)
        self.settings, self.client_id = settings, client_id
        self.lock = threading.Lock()
        self.live: dict[str, pb.TaskStarted] = {}
        self.ended: dict[str, int] = {}
        self.viewers: dict[str, int] = {}  # task -> clients watching its annotated frames
        self.reserved: set[str] = set()  # task ids whose topics exist before their task (TaskReserved)
        self.stopped: dict[str, pb.SourceStopped] = {}  # live task -> why its camera is to stop, and how it ends
        self.traces: dict[str, object] = {}  # task id -> its run's trace context (None while tracing is off)
        self.events = 0  # control events applied so far (the worker sees bursts settle by it)
        self.last_start = 0.0  # monotonic time of the latest TaskStarted or TaskReserved
        self.generation = 0
        self.incarnation: str | None = None  # of the broker's data (posemesh.mesh.kafka.incarnation)
        self.broker_problem = ""  # non-empty while the broker cannot be reached
        self.changed = threading.Event()
        # Set once the replay of posemesh.control has reached its end: until then `live` may still hold
        # tasks whose TaskEnded is yet to be read, whose topics may be deleted any moment; reading them
        # (a fetch in flight when the topic goes) crashes librdkafka on the local broker.
        self.caught_up = threading.Event()
        self.running = threading.Event()
        self.running.set()

    def trace(self, task_id: str):
        """The trace context of the task's current run (posemesh.mesh.tracing), or None."""
        with self.lock:
            return self.traces.get(task_id)

    def started(self, task_id: str) -> pb.TaskStarted | None:
        with self.lock:
            return self.live.get(task_id)

    def snapshot(self) -> tuple[dict[str, pb.TaskStarted], set[str]]:
        with self.lock:
            return dict(self.live), set(self.ended)

    def reserved_tasks(self) -> set[str]:
        with self.lock:
            return set(self.reserved)

    def is_reserved(self, task_id: str) -> bool:
        with self.lock:
            return task_id in self.reserved

    def stop_of(self, task_id: str) -> pb.SourceStopped | None:
        """Why a live task's camera is to stop, and how the task then ends (SourceStopped), or None."""
        with self.lock:
            return self.stopped.get(task_id)

    def has_ended(self, task_id: str) -> bool:
        with self.lock:
            return task_id in self.ended

    def group_name(self, stage: str) -> str:
        """A stage's consumer group: one per stage and per life of the broker's data. After the local broker
        lost its data, the old members' re-joins and departures could leave a group of the old name without
        partitions for good; a fresh name sidesteps that. On Apache Kafka the name never changes unless
        posemesh.control itself is re-created. Consumers are made only once the incarnation is known."""
        return f"{self.settings.group_prefix}-{stage}-{(self.incarnation or '')[:8]}"

    def lookup(self, task_id: str) -> tuple[pb.TaskStarted | None, bool]:
        """The task's TaskStarted (None if not started) and whether its id is reserved, read together."""
        with self.lock:
            return self.live.get(task_id), task_id in self.reserved

    def stop(self) -> None:
        self.running.clear()

    def run(self) -> None:
        incarnation = None
        while self.running.is_set():
            # New clients for every incarnation of the broker's data. A librdkafka client that had a topic
            # in its metadata cache and then sees it again under the same name with a new topic id (the
            # memory-only broker restarted, the topic made again) can crash the process in its metadata
            # cache (confluentinc/librdkafka#4964); a fresh client has nothing cached.
            admin = kafka.admin(self.settings)
            if incarnation is None:
                incarnation = self.incarnation = self._wait_for_incarnation(admin)
            consumer = Consumer(kafka.follower_config(self.settings, f"{self.client_id}-control", self.client_id))
            consumer.assign([TopicPartition(kafka.CONTROL_TOPIC, 0, OFFSET_BEGINNING)])
            try:
                incarnation = self._follow(consumer, admin, incarnation)
            finally:
                consumer.close()

    def _wait_for_incarnation(self, admin) -> str | None:
        while self.running.is_set():
            current = self._incarnation(admin)
            if current:
                return current
            time.sleep(0.2)
        return None

    def _incarnation(self, admin) -> str | None:
        try:
            current = kafka.incarnation(admin, timeout=3)
            self.broker_problem = ""
            return current
        except (KafkaException, TimeoutError) as exc:
            self.broker_problem = f"the message broker cannot be reached ({exc.__class__.__name__})"
            return None

    def _follow(self, consumer, admin, incarnation: str | None) -> str | None:
        """Read until the broker's incarnation changes; returns the new one."""
        checked = time.monotonic()
        end = None  # the topic's end when this replay began: caught up once read past it
        read_to = 0
        quiet_since = time.monotonic()
        while self.running.is_set():
            # A record ends the poll at once, so the timeout is only how often the loop looks at the rest: the
            # end of the replay while catching up, then the next incarnation check (an idle worker polled ten
            # times a second, finding nothing).
            # (A few ms past the check's time: the client rounds a timeout down to whole milliseconds, and a poll
            # ending just short of it made a second, 50 ms poll before every check.)
            next_check = checked + CHECK_EVERY_S - time.monotonic() + 0.005
            msg = consumer.poll(0.1 if not self.caught_up.is_set() else min(CHECK_EVERY_S, max(0.05, next_check)))
            if msg is None and not self.caught_up.is_set():
                end = end if end is not None else self._end_offset(consumer)
                # The local broker's high watermark is the start of the last batch, which one fetch
                # delivers whole: read up to it and then nothing more came. An end that is never reached
                # (records a consumer never sees, such as transaction markers) is given up on after a
                # quiet spell.
                if (end is not None and read_to >= end) or time.monotonic() - quiet_since > CAUGHT_UP_QUIET_S:
                    self.caught_up.set()
                    self.changed.set()
            if msg is not None:
                quiet_since = time.monotonic()
            if msg is not None and not msg.error():
                read_to = msg.offset() + 1
            # A record without a value is a tombstone: an ended task's older facts, cleared for compaction
            # (kafka.control_records).
            if msg is not None and not msg.error() and msg.value() is not None:
                event = pb.ControlEvent.FromString(msg.value())
                self._apply(event, msg.headers())
                if event.HasField("started"):
                    _kind, at_ms = msg.timestamp()
                    log.info("task %s started (heard %.0f ms after it was published)", event.task_id,
                             time.time() * 1000 - at_ms)
            if time.monotonic() - checked >= CHECK_EVERY_S:
                checked = time.monotonic()
                current = self._incarnation(admin)
                if current is None and not self.broker_problem:
                    # posemesh.control is gone: the broker lost its data. Make it again (the gateway may
                    # too), with an admin client that never saw the old one. The consumer stays until the
                    # new incarnation is seen: closing it while its topic is missing hung the whole
                    # follower (both detect replicas, in CI).
                    try:
                        kafka.ensure_shared_topics(self.settings, kafka.admin(self.settings))
                    except Exception:  # noqa: BLE001 - next check tries again
                        log.warning("could not re-create the shared topics yet")
                    continue
                if current and current != incarnation:
                    log.warning("the broker lost its data (posemesh.control is a new topic): starting over")
                    with self.lock:
                        self.live.clear()
                        self.traces.clear()
                        self.ended.clear()
                        self.viewers.clear()
                        self.reserved.clear()
                        self.stopped.clear()
                        self.incarnation = current
                        self.generation += 1
                    self.caught_up.clear()
                    self.changed.set()
                    return current
        return incarnation

    @staticmethod
    def _end_offset(consumer) -> int | None:
        try:
            _low, high = consumer.get_watermark_offsets(TopicPartition(kafka.CONTROL_TOPIC, 0), timeout=2)
            return high
        except KafkaException:
            return None  # asked again at the next quiet poll

    def _apply(self, event: pb.ControlEvent, headers=None) -> None:
        """`headers`: the record's Kafka headers (a TaskStarted's carry its run's trace context)."""
        with self.lock:
            self.events += 1
            if event.HasField("started") or event.HasField("reserved"):
                self.last_start = time.monotonic()
            if event.HasField("started") and event.task_id not in self.ended:
                self.reserved.discard(event.task_id)
                known = self.live.get(event.task_id)
                if known is None or event.started.epoch >= known.epoch:
                    self.live[event.task_id] = event.started
                    self.traces[event.task_id] = tracing.context_of(headers)
            elif event.HasField("reserved"):
                if event.task_id not in self.ended and event.task_id not in self.live:
                    self.reserved.add(event.task_id)
            elif event.HasField("ended"):
                self.live.pop(event.task_id, None)
                self.traces.pop(event.task_id, None)
                self.viewers.pop(event.task_id, None)
                self.reserved.discard(event.task_id)
                self.stopped.pop(event.task_id, None)
                self.ended[event.task_id] = event.ended.state
            elif event.HasField("source_stopped"):
                if event.task_id not in self.ended:
                    self.stopped[event.task_id] = event.source_stopped
            elif event.HasField("viewers"):
                if event.viewers.count > 0 and event.task_id not in self.ended:
                    self.viewers[event.task_id] = event.viewers.count
                else:
                    self.viewers.pop(event.task_id, None)
        self.changed.set()
