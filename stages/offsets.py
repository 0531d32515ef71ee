"""Which consumed offsets may be committed: those whose output exists, and every one before them."""

from __future__ import annotations

from confluent_kafka import TopicPartition

TP = tuple[str, int]


class OffsetBook:
    """Per partition, the consumed offsets in order and whether each one's output exists yet.

    Kafka commits a position, not a set: offset N may be committed only when every message below N
    is done. A frame waiting in a re-order buffer (track) or in an open MP4 (annotate) holds back
    the commit of everything after it, so a crash redelivers it and nothing is lost.
    """

    def __init__(self) -> None:
        self._parts: dict[TP, dict[int, bool]] = {}

    def add(self, tp: TP, offset: int) -> None:
        self._parts.setdefault(tp, {})[offset] = False

    def done(self, tp: TP, offset: int) -> None:
        part = self._parts.get(tp)
        if part is not None and offset in part:
            part[offset] = True

    def committable(self) -> list[TopicPartition]:
        out = []
        for (topic, partition), part in self._parts.items():
            last = None
            for offset in list(part):  # insertion order is offset order within a partition
                if not part[offset]:
                    break
                last = offset
                del part[offset]
            if last is not None:
                out.append(TopicPartition(topic, partition, last + 1))
        return out

    def forget(self, tp: TP) -> None:
        self._parts.pop(tp, None)

    def pending(self) -> int:
        return sum(1 for part in self._parts.values() for ok in part.values() if not ok)
