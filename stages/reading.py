"""A worker's input: its consumer-group membership, which partitions it owns, where it reads from.

- Subscription: the input topic of every live task (the worker tells it which).
- Assignment (eager round-robin, see posemesh.mesh.kafka): a partition this worker keeps through a rebalance
  continues at its position (its frames are in our pool or our open files). A partition new to us starts
  where the stage's recovery says: Recovery.REPLAY from the topic's beginning (the state is rebuilt from
  the task's first frame), the others from the group's committed offset.
- Flow control (unordered stages): a partition with frames waiting in the pool is paused until they are
  processed, so one task's backlog cannot crowd out the others (the local broker fills a fetch from one
  partition at a time).
- Held topics: the idle topic always, a reserved task id's topics until its TaskStarted is read, and an ended
  task's until the worker lets go of them, stay paused, so nothing is fetched from them. Fetching empty
  partitions was most of an idle stack's CPU.
- Commits: only offsets whose output exists (OffsetBook), only for partitions we own.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from posemesh.mesh import kafka
from posemesh.mesh.settings import Settings
from posemesh.stages.base import Recovery
from posemesh.stages.offsets import OffsetBook

log = logging.getLogger("posemesh.stage")

TP = tuple[str, int]
COMMITTED_WAIT_S = 0.5  # the longest a released partition's commit is waited for (then it starts a little later)


class InputReader:
    def __init__(self, settings: Settings, group: str, client_id: str, recovery: Recovery,
                 on_revoked: Callable[[set[TP]], None], on_assigned: Callable[[set[TP]], None]):
        self.recovery = recovery
        self.on_revoked, self.on_assigned = on_revoked, on_assigned
        self.consumer = Consumer(kafka.consumer_config(settings, group, client_id))
        self.subscribed: list[str] = []
        self.owned: set[TP] = set()
        self.positions: dict[TP, int] = {}
        self.assigned_at: dict[TP, int] = {}  # where the latest assignment started a partition, where it said
        self.paused: set[TP] = set()  # by flow control
        self.held_topics: set[str] = {kafka.IDLE_TOPIC}
        self.holding: set[TP] = set()  # owned partitions of held topics (paused)
        self.book = OffsetBook()
        # Between a subscribe() and the assignment that answers it. Another subscribe() meanwhile would
        # start the join over: four tasks starting a second apart kept groups re-joining for 5 s.
        self.joining = False
        self.rebalance_since = 0.0  # when this member stopped fetching for a rebalance (0: it is not in one)
        self.assignments = 0  # answers from the group so far (each one a rebalance)
        self.subscription_changes = 0
        self.leaving: set[str] = set()
        self.revokes = 0

    # ------------------------------------------------------------------ subscription and assignment

    def subscribe(self, topics: list[str]) -> bool:
        """Read exactly these topics (and the idle topic, always: see posemesh.mesh.kafka.IDLE_TOPIC); True when
        that changed the subscription."""
        topics = sorted(set(topics) | {kafka.IDLE_TOPIC})
        if topics == self.subscribed:
            return False
        self.consumer.subscribe(topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        # Topics dropped from the subscription still count as read until the group's next assignment: the
        # rebalance under way still involves them, and a topic deleted under it crashed librdkafka.
        self.leaving |= set(self.subscribed) - set(topics)
        self.subscribed = topics
        self.joining = True
        self.rebalance_since = self.rebalance_since or time.monotonic()
        self.subscription_changes += 1
        return True

    @property
    def task_topics(self) -> list[str]:
        return [t for t in self.subscribed if t != kafka.IDLE_TOPIC]

    def _on_revoke(self, consumer, partitions) -> None:
        self.revokes += 1
        self.rebalance_since = self.rebalance_since or time.monotonic()  # a rebalance another member began
        # Answer the revoke here. Left unanswered, confluent-kafka answers it itself and first asks
        # librdkafka for the rebalance protocol while holding the GIL; during close() that question can
        # wait forever (librdkafka #4041), and with the GIL held the whole worker froze (seen in CI).
        consumer.unassign()

    def _on_assign(self, consumer, partitions) -> None:
        if self.rebalance_since:
            # While its group rebalances no replica of the stage fetches (only records fetched before come out): at
            # least a second on the local broker, which holds each JoinGroup that long, and a live task's lag grows
            # by as much. Logged so an operator sees it; tests/mesh.py reads it to tell such a stall from others.
            log.info("rebalanced in %.2f s: %d partitions now", time.monotonic() - self.rebalance_since,
                     len(partitions))
            self.rebalance_since = 0.0
        self.joining = False
        self.assignments += 1
        self.leaving = set()
        now = {(p.topic, p.partition) for p in partitions}
        starts, fresh = start_offsets(now, self.owned, self.positions, self.recovery)
        self.assigned_at = starts
        for p in partitions:
            p.offset = starts.get((p.topic, p.partition), p.offset)
        gone = self.owned - now
        self.owned = now
        self._lose(gone)
        consumer.assign(partitions)
        # librdkafka keeps a partition's pause flag through an eager revoke and re-assign; flow control
        # starts afresh with every assignment, so every assigned partition starts resumed.
        if partitions:
            consumer.resume(partitions)
        self.paused, self.holding = set(), set()
        self._sync_holds()
        if fresh:
            self.on_assigned(fresh)

    def _lose(self, gone: set[TP]) -> None:
        if not gone:
            return
        for tp in gone:
            self.book.forget(tp)
            self.positions.pop(tp, None)
        self.on_revoked(gone)

    # ------------------------------------------------------------------ reading

    def poll(self, max_messages: int, timeout: float) -> list:
        msgs = self.consumer.consume(num_messages=max_messages, timeout=timeout)
        for msg in msgs:
            if msg.error() is None:
                tp = (msg.topic(), msg.partition())
                self.positions[tp] = msg.offset() + 1
                self.book.add(tp, msg.offset())
        return msgs

    def poll_only(self, tps: set[TP], max_messages: int, timeout: float) -> list:
        """Poll these partitions alone: the others are paused meanwhile (which drops what librdkafka had
        fetched ahead for them; it is fetched again) and resumed after, unless flow control holds them."""
        others = [tp for tp in self._flowing() if tp not in tps]
        if others:
            self.consumer.pause([TopicPartition(t, p) for t, p in others])
        try:
            return self.poll(max_messages, timeout)
        finally:
            # A rebalance inside the poll may have taken some of them (and resumed what it assigned).
            others = [tp for tp in others if tp in self._flowing()]
            try:
                self._resume(others)
            except KafkaException as exc:
                log.warning("resume after a new task's poll: %s", exc)

    def flow_control(self, waiting: dict[TP, int], cap: int) -> None:
        """Pause partitions with `cap` frames waiting in the pool; resume them once those have left it.
        Pausing drops what librdkafka had fetched ahead for the partition (fetched again on resume), so
        the next fetches go to the partitions still running."""
        pause = [tp for tp in self.owned if waiting.get(tp, 0) >= cap and tp not in self.paused]
        resume = [tp for tp in self.paused if waiting.get(tp, 0) == 0 and tp in self.owned]
        if pause:
            self.consumer.pause([TopicPartition(t, p) for t, p in pause])
            self.paused.update(pause)
        if resume:
            self.paused.difference_update(resume)
            self._resume([tp for tp in resume if tp not in self.holding])

    def hold(self, topics: set[str]) -> set[TP]:
        """Fetch nothing from these topics (nor from the idle topic, ever) until a later call leaves them out:
        the worker holds a reserved task id's topics until its TaskStarted is read, and an ended task's until it
        lets go of them (stages/worker.py). librdkafka fetches an
        empty partition about 14 times a second at fetch.wait.max.ms=50, and every reserved id adds its topics
        to every stage's consumer: most of an idle stack's CPU was the broker answering those (bench/idle.py).
        Returns the owned partitions this call released."""
        topics = set(topics) | {kafka.IDLE_TOPIC}
        if topics == self.held_topics:
            return set()
        previous, self.held_topics = self.held_topics, topics
        try:
            return self._sync_holds()
        except KafkaException:
            self.held_topics = previous  # tried again on the next call
            raise

    def _sync_holds(self) -> set[TP]:
        # `holding` is always within `owned`: an assignment empties it before calling this.
        want = {tp for tp in self.owned if tp[0] in self.held_topics}
        pause = [tp for tp in want - self.holding if tp not in self.paused]
        released = self.holding - want
        resume = [tp for tp in released if tp not in self.paused]
        if pause:
            self.consumer.pause([TopicPartition(t, p) for t, p in pause])
        self._resume(resume, unread_too=True, held=want)  # a reserved task that started: its first frames wait for this
        self.holding = want
        return released

    def _resume(self, tps: list[TP], unread_too: bool = False, held: set[TP] | None = None) -> None:
        """Fetch from these paused partitions again, each also sought to where the resume would fetch from anyway,
        and librdkafka woken when no other partition fetches (kafka.resume: a resume alone waited 0.4-0.8 s on an idle
        stage). That offset is this member's position in a partition it read; with `unread_too`, for one it never
        read, where its assignment started it (start_offsets), or else the group's commit (one round trip to the
        coordinator), or the beginning without one (consumer_config's auto.offset.reset). `held`: the partitions held
        from now on, when a hold is being changed (the default: those held now)."""
        at = {tp: self.positions[tp] for tp in tps if tp in self.positions}
        unread = [tp for tp in tps if tp not in at] if unread_too else []
        at.update({tp: self.assigned_at[tp] for tp in unread if tp in self.assigned_at})
        unread = [tp for tp in unread if tp not in at]
        try:
            if unread:
                for c in self.consumer.committed([TopicPartition(t, p) for t, p in unread], timeout=COMMITTED_WAIT_S):
                    if c.error is None:  # else left to the resume alone
                        at[(c.topic, c.partition)] = c.offset if c.offset >= 0 else OFFSET_BEGINNING
        except KafkaException as exc:  # those start when librdkafka notices the resume
            log.debug("committed offsets on resume: %s", exc)
        kafka.resume(self.consumer, tps, at, wake=not (self._flowing(held) - set(tps)))

    @property
    def flowing(self) -> bool:
        """Whether some owned partition may give records."""
        return bool(self._flowing())

    def _flowing(self, held: set[TP] | None = None) -> set[TP]:
        """Owned partitions that neither flow control nor a hold keeps paused (`held`: the partitions held from now on,
        while a hold is being changed; the default: those held now)."""
        return self.owned - self.paused - (self.holding if held is None else held)

    def done(self, tp: TP, offset: int) -> None:
        self.book.done(tp, offset)

    def commit(self) -> None:
        offsets = [tp for tp in self.book.committable() if (tp.topic, tp.partition) in self.owned]
        if not offsets:
            return
        try:
            self.consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # e.g. a rebalance took the partition: its new owner redoes the rest
            log.warning("commit failed: %s", exc)

    def reading_tasks(self) -> list[str]:
        topics = set(self.subscribed) | self.leaving | {tp[0] for tp in self.owned}
        return sorted({kafka.task_of_topic(t) for t in topics} - {None})

    def close(self, revoke_wait_s: float = 2.0) -> None:
        """Leave the group, so its partitions move to the other replicas now, and destroy the client."""
        self.leave(revoke_wait_s)
        self.abandon()

    def leave(self, revoke_wait_s: float = 2.0) -> None:
        """Leave the group, so its partitions move to the other replicas now; the client stays (a process
        about to exit need not destroy it, and a destroy can wait on librdkafka's threads).
        Consumer.close() is not used: rebalance callbacks run inside it hold the GIL while they call into
        librdkafka, which can wait forever there (librdkafka #4041, #4884) and froze a whole worker in CI.
        unsubscribe() leaves the group; its revoke is answered by a poll here, on this thread."""
        try:
            if self.subscribed:
                revokes = self.revokes
                self.consumer.unsubscribe()
                deadline = time.monotonic() + revoke_wait_s
                while self.owned and self.revokes == revokes and time.monotonic() < deadline:
                    self.consumer.poll(0.05)  # what it returns is dropped: never processed, never committed
                self.consumer.poll(0.05)  # lets the LeaveGroup go out
        except Exception:  # noqa: BLE001 - the broker vanished: the group notices at its session timeout
            log.debug("leaving the group failed", exc_info=True)

    def abandon(self) -> None:
        """Destroy the client without leaving its group (after the broker lost its data, a group nobody
        uses again): no callbacks, the GIL released, on the calling thread."""
        consumer, self.consumer = self.consumer, None
        self.subscribed, self.owned, self.leaving = [], set(), set()
        del consumer  # the last reference: confluent-kafka destroys it with NO_CONSUMER_CLOSE


def start_offsets(now: set[TP], owned: set[TP], positions: dict[TP, int],
                  recovery: Recovery) -> tuple[dict[TP, int], set[TP]]:
    """Where each newly assigned partition starts, and which of them are fresh to this member.

    Kept: owned before this rebalance and read from, so its frames are in our pool or our state: it continues
    at our position, not at the last commit. Anything else is fresh, even a partition we owned without reading
    it: its task has no state here. A REPLAY stage starts a fresh partition at its beginning; a REPLAY stage
    that started at the group's commit instead (another replica's progress) waited forever for the frames
    before it (CI, after a session timeout during a broker stall). The other recoveries start at the commit
    (no entry: the consumer's default)."""
    kept = {tp for tp in now & owned if tp in positions}
    starts = {tp: positions[tp] for tp in kept}
    if recovery is Recovery.REPLAY:
        starts.update({tp: OFFSET_BEGINNING for tp in now - kept})
    return starts, now - kept
