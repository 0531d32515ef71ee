"""What a worker tells the gateway, on posemesh.events: progress, results, failures and heartbeats.

Progress names the frame indices finished since the last report (as ranges), not a running count: the
gateway counts the union over all workers of a stage, so a frame redone after a crash or a rebalance is
counted once. The worker queues a report with every batch's outputs, so one flush delivers both before
the inputs are committed.

Heartbeats list the tasks whose topics the worker reads: within 0.5 s of a change of what they say, else every
second. They come from their own thread, so a worker busy in a long call (Triton retrying through an outage)
still says which topics it holds: the gateway never deletes a topic under a live reader.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict

from posemesh.mesh import kafka
from posemesh.v1 import pipeline_pb2 as pb

log = logging.getLogger("posemesh.stage")

EVERY_S = 0.5  # the heartbeat thread's tick: progress not yet sent with a batch goes then, as does a heartbeat
# A heartbeat that says what the last one said goes this often: every heartbeat is a request to the broker and an
# event for every gateway (an idle local stack: 2 a second per worker at 0.5 s, bench/broker_requests.py); the
# gateway counts a worker gone after 5 s without one (gateway/stats.py, placement.py).
HEARTBEAT_S = 1.0


def ranges(indices: list[int]) -> list[pb.IndexRange]:
    out: list[pb.IndexRange] = []
    for i in sorted(set(indices)):
        if out and out[-1].last == i - 1:
            out[-1].last = i
        else:
            out.append(pb.IndexRange(first=i, last=i))
    return out


class Reporter:
    def __init__(self, worker_id: str, stage: str):
        self.worker_id, self.stage = worker_id, stage
        self.lock = threading.Lock()
        self.producer = None
        self.new: dict[str, list[int]] = defaultdict(list)  # task -> indices finished since the last report
        self.totals: dict[str, int] = {}
        self.epochs: dict[str, int] = {}
        self.done_count: dict[str, int] = defaultdict(int)
        self.reading: list[str] = []
        self.waiting: list[str] = []  # the ingest stage: tasks queued for a decoding slot
        self.partitions: list[int] = []  # the ingest stage: its partitions of posemesh.ingest
        self.halt = threading.Event()
        self.thread: threading.Thread | None = None

    def attach(self, producer) -> None:
        """The producer to send with (replaced when the worker resets its Kafka clients)."""
        with self.lock:
            self.producer = producer

    def start(self) -> None:
        self.halt.clear()
        self.thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.halt.set()
        if self.thread:
            self.thread.join(2)

    # ------------------------------------------------------------------ from the worker's loop

    def done(self, task_id: str, index: int, epoch: int, total: int | None) -> None:
        with self.lock:
            self.new[task_id].append(index)
            self.done_count[task_id] += 1
            self.epochs[task_id] = epoch
            if total:
                self.totals[task_id] = total

    def set_total(self, task_id: str, total: int) -> None:
        with self.lock:
            self.totals[task_id] = total

    def reading_tasks(self, tasks: list[str]) -> None:
        if tasks != self.reading:
            with self.lock:
                self.reading = list(tasks)

    def waiting_tasks(self, tasks: list[str]) -> None:
        if tasks != self.waiting:
            with self.lock:
                self.waiting = list(tasks)

    def ingest_partitions(self, partitions: list[int]) -> None:
        if partitions != self.partitions:
            with self.lock:
                self.partitions = list(partitions)

    def forget(self, task_id: str) -> None:
        with self.lock:
            for table in (self.new, self.totals, self.epochs, self.done_count):
                table.pop(task_id, None)

    def flush_progress(self) -> None:
        """Queue a progress event for every task with frames finished since the last one."""
        with self.lock:
            events = []
            for task_id in [t for t, indices in self.new.items() if indices]:
                indices = self.new.pop(task_id)
                events.append(pb.WorkerEvent(worker_id=self.worker_id, stage=self.stage, progress=pb.TaskProgress(
                    task_id=task_id, frames_done=self.done_count[task_id], frames_total=self.totals.get(task_id, 0),
                    done=ranges(indices), epoch=self.epochs.get(task_id, 0))))
            self._send(events)

    def result(self, result: pb.TaskResult) -> None:
        with self.lock:
            self._send([pb.WorkerEvent(worker_id=self.worker_id, stage=self.stage, result=result)])

    def failure(self, task_id: str, epoch: int, message: str) -> None:
        with self.lock:
            self._send([pb.WorkerEvent(worker_id=self.worker_id, stage=self.stage, failure=pb.TaskFailure(
                task_id=task_id, error_message=message, epoch=epoch))])

    def heartbeat(self) -> None:
        with self.lock:
            self._send([pb.WorkerEvent(worker_id=self.worker_id, stage=self.stage,
                                       heartbeat=pb.Heartbeat(reading_tasks=self.reading,
                                                              waiting_tasks=self.waiting,
                                                              ingest_partitions=self.partitions))])

    # ------------------------------------------------------------------ sending

    def _send(self, events: list[pb.WorkerEvent]) -> None:
        """Enqueue only. librdkafka sends from its own threads; polling and flushing (which run delivery
        callbacks) belong to the worker's loop alone: callbacks served on two threads at once surfaced as
        SystemError inside flush().

        An event that cannot be queued (no producer while the worker resets, the local queue full, a failed
        producer) is dropped, and nothing sends it again: a progress report's indices left `new` when it was
        made. Its frames stay uncounted at this stage unless their outputs failed too (a failed producer:
        the worker resets, redoes those frames and reports them then). A heartbeat goes again HEARTBEAT_S later."""
        if self.producer is None or not events:
            return
        for event in events:
            try:
                self.producer.produce(kafka.EVENTS_TOPIC, event.SerializeToString())
            except Exception:  # noqa: BLE001 - the event is dropped (see above)
                log.debug("could not send a worker event", exc_info=True)

    def _beat(self) -> None:
        said, sent_at = None, 0.0
        while not self.halt.wait(EVERY_S):
            try:
                self.flush_progress()
                now = time.monotonic()
                saying = self._heartbeat_says()
                if saying != said or now - sent_at >= HEARTBEAT_S - EVERY_S / 2:
                    self.heartbeat()
                    said, sent_at = saying, now
            except Exception:  # noqa: BLE001
                log.debug("heartbeat failed", exc_info=True)

    def _heartbeat_says(self) -> tuple:
        with self.lock:
            return tuple(self.reading), tuple(self.waiting), tuple(self.partitions)
