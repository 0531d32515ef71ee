"""The gateway's view of the broker: can it be reached, and is its data the data we started with.

Every second the watch describes posemesh.control:
- unreachable: `available` turns False. Uploads are answered UNAVAILABLE at once (nothing is received or
  kept) and the gateway's health turns NOT_SERVING until the broker answers again. The watch keeps the
  recent spans of silence (`answering_since`): no task counts as stalled for time the broker took from it.
- the topic is gone, or has a new topic id: the broker lost its data (the memory-only local broker after a
  restart, a wiped cluster). The shared topics are made again and `on_reset` runs: the gateway replaces its
  Kafka clients and runs every active task again from its first frame under a new epoch. Apache Kafka keeps
  its data across broker restarts, so there this only happens after a real loss.
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from confluent_kafka import KafkaException

from posemesh.gateway.store import now_us
from posemesh.mesh import kafka
from posemesh.mesh.settings import Settings

log = logging.getLogger("posemesh.gateway")

EVERY_S = 1.0


class BrokerWatch(threading.Thread):
    def __init__(self, settings: Settings, on_reset, incarnation: str | None):
        super().__init__(name="broker-watch", daemon=True)
        self.settings, self.on_reset = settings, on_reset
        self.admin = kafka.admin(settings)
        self.incarnation = incarnation
        self.available = True
        # Spans (from, to) in µs when the broker did not answer, the latest last; `silent_from` while it is.
        self.silences: deque[tuple[int, int]] = deque(maxlen=256)
        self.silent_from: int | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(EVERY_S):
            try:
                self.check_once()
            except Exception:  # the next round tries again
                log.exception("broker check failed")

    def answering_since(self, span_us: int, now_us: int) -> int:
        """The time from which the broker has answered for `span_us` up to `now_us`: its silences in between
        are not counted (they are walked back from the latest)."""
        spans = list(self.silences) + ([(self.silent_from, now_us)] if self.silent_from is not None else [])
        at, left = now_us, span_us
        for frm, to in reversed(spans):
            answered = at - min(to, at)
            if answered >= left:
                break
            left -= answered
            at = min(frm, at)
        return at - left

    def check_once(self) -> None:
        asked_us = now_us()
        try:
            current = kafka.incarnation(self.admin, timeout=3)
        except (KafkaException, TimeoutError) as exc:
            if self.available:
                log.warning("the message broker cannot be reached (%s)", exc.__class__.__name__)
            self.available = False
            if self.silent_from is None:
                self.silent_from = asked_us
            return
        if self.silent_from is not None:
            self.silences.append((self.silent_from, now_us()))
            self.silent_from = None
        if current is None:  # posemesh.control is gone: the broker lost its data
            kafka.ensure_shared_topics(self.settings, self.admin)
            current = kafka.incarnation(self.admin, timeout=3)
        if not self.available:
            log.info("the message broker answers again")
        self.available = True
        if current and current != self.incarnation:
            previous, self.incarnation = self.incarnation, current
            if previous is not None:
                log.warning("the broker lost its data (posemesh.control is a new topic): running active tasks again")
                self.on_reset(current)

    def stop(self) -> None:
        self.halt.set()
