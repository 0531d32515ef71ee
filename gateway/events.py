"""Reads posemesh.events: worker progress, results and failures update the task store; heartbeats
tell the topic manager who still reads what.

Every gateway reads the topic (worker heartbeats and progress feed its GetStats), but only the one
holding the mesh duties (gateway/duties.py) applies the events to the store, so each is applied once
per mesh. No consumer group: the reader assigns the partition, and the applying one keeps its position
in the task store, next to the task states the events change. The next gateway to apply them, or the
same one after a restart, resumes exactly there (a result that arrived meanwhile is not missed), and no
group rebalance can stall it.

Progress events are merged before they reach the store: within one batch read from the topic, the frame
ranges one stage reported for one task (and run) become one write, made before the next result or failure
of the batch is applied and at the batch's end. Under load a write per event fell behind the events
(bench/gateways.py, on PostgreSQL: seconds more to a task's first annotated frame).
"""

from __future__ import annotations

import logging
import threading

from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

from posemesh.mesh import kafka
from posemesh.mesh.pipeline import INGEST, progress_step
from posemesh.mesh.settings import Settings
from posemesh.v1 import pipeline_pb2 as pb

log = logging.getLogger("posemesh.gateway")

OFFSET_KEY = "events_offset"
INCARNATION_KEY = "events_incarnation"
# What the ingest stage tells about sources (POSEMESH_INGEST=stage), by WorkerEvent kind: each goes to the
# lifecycle's method of the same name.
INGEST_EVENTS = ("source_read", "live_read", "source_ended")


class EventReader(threading.Thread):
    def __init__(self, settings: Settings, store, topics, on_result, on_failure, incarnation: str | None = None,
                 activity=None, applying: bool = True, ingest=None):
        super().__init__(name="events", daemon=True)
        self.settings, self.store, self.topics = settings, store, topics
        self.activity = activity  # gateway/stats.py's MeshActivity, or None
        self.on_result, self.on_failure = on_result, on_failure
        self.ingest = ingest  # the lifecycle, which handles INGEST_EVENTS
        self.incarnation = incarnation  # of the broker's data: a saved offset from another one means nothing
        self.applying = applying  # to the store (this gateway holds the mesh duties), or only heard
        # Progress not yet written: (task, stage, epoch) -> (frame ranges, frames total).
        self.progress: dict[tuple[str, str, int], tuple[list[tuple[int, int]], int]] = {}
        self.running = threading.Event()
        self.running.set()

    def run(self) -> None:
        consumer = Consumer(kafka.follower_config(self.settings, "posemesh-gateway", "gateway-events"))
        start = self.start_offset(consumer) if self.applying else OFFSET_END
        consumer.assign([TopicPartition(kafka.EVENTS_TOPIC, 0, start)])
        if self.incarnation and self.applying:
            self.store.set_meta(INCARNATION_KEY, self.incarnation)
        try:
            while self.running.is_set():
                msgs = consumer.consume(num_messages=500, timeout=0.1)
                last = None
                for msg in msgs:
                    if msg.error():
                        continue
                    try:
                        self.handle(pb.WorkerEvent.FromString(msg.value()), msg.timestamp()[1] / 1000.0)
                    except Exception:
                        log.exception("bad worker event at offset %d", msg.offset())
                    last = msg.offset()
                self.apply_progress()
                if last is not None and self.applying:  # handlers are idempotent: at-least-once is enough
                    self.store.set_meta(OFFSET_KEY, str(last + 1))
        finally:
            consumer.close()

    def start_offset(self, consumer: Consumer) -> int:
        """Where the last run stopped, unless that is past the end of the topic: then the topic is not the
        one the offset was saved against (the memory-only local broker restarted, or someone re-created
        it), and the whole of it is read. Replaying is safe: every handler is idempotent."""
        saved = self.store.get_meta(OFFSET_KEY)
        if not saved:
            return OFFSET_BEGINNING
        known = self.store.get_meta(INCARNATION_KEY)
        if self.incarnation and known and known != self.incarnation:
            log.warning("the broker's data is not the one the saved events offset belongs to: reading %s from "
                        "the start", kafka.EVENTS_TOPIC)
            return OFFSET_BEGINNING
        _low, high = consumer.get_watermark_offsets(TopicPartition(kafka.EVENTS_TOPIC, 0), timeout=10)
        if int(saved) > high:
            log.warning("saved events offset %s is past the end of %s (%d): reading it from the start",
                        saved, kafka.EVENTS_TOPIC, high)
            return OFFSET_BEGINNING
        return int(saved)

    def handle(self, event: pb.WorkerEvent, sent_at: float) -> None:
        kind = event.WhichOneof("event")
        step = progress_step(event.stage)  # the ingest stage's frames are the "decode" step's
        if kind == "heartbeat":
            self.topics.heartbeat(event.worker_id, sent_at, list(event.heartbeat.reading_tasks),
                                  list(event.heartbeat.waiting_tasks),
                                  list(event.heartbeat.ingest_partitions) if event.stage == INGEST else None)
            if self.activity is not None:
                self.activity.heartbeat(step, event.worker_id, sent_at)
        elif kind == "progress":
            p = event.progress
            if self.activity is not None:
                self.activity.finished(step, sum(r.last - r.first + 1 for r in p.done), sent_at)
            if self.applying:
                ranges, total = self.progress.get((p.task_id, step, p.epoch), ([], 0))
                ranges += [(r.first, r.last) for r in p.done]
                self.progress[(p.task_id, step, p.epoch)] = ranges, max(total, p.frames_total)
        elif not self.applying:
            return
        elif kind == "result":
            self.apply_progress()  # a task's progress before its end
            if event.result.epoch >= self.store.epoch(event.result.task_id):
                self.on_result(event.result)
        elif kind in INGEST_EVENTS:
            if kind != "live_read":
                self.apply_progress()  # the frames that went in, before what follows from their end
            if self.ingest is not None:
                getattr(self.ingest, kind)(getattr(event, kind))
        elif kind == "failure":
            self.apply_progress()
            f = event.failure
            if f.epoch >= self.store.epoch(f.task_id):
                # The ingest stage's failures say what failed in the upload, as the gateway's decoding does.
                said = f.error_message if event.stage == INGEST else f"{event.stage} failed: {f.error_message}"
                self.on_failure(f.task_id, said)

    def apply_progress(self) -> None:
        """Write the merged progress (one write per task, stage and run)."""
        pending, self.progress = self.progress, {}
        for (task_id, stage, epoch), (ranges, total) in pending.items():
            try:
                self.store.add_done(task_id, stage, ranges, epoch, total)
            except Exception:
                log.exception("progress of %s (%s) not recorded", task_id, stage)

    def stop(self) -> None:
        self.running.clear()
