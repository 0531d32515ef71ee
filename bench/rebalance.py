"""How long a consumer group fetches nothing when its subscription changes, on the local broker (Tansu).

    .venv/bin/python bench/rebalance.py            # about 40 s

A stage worker adds a task's topics to its subscription, or lets go of an ended task's, with one subscribe();
under the eager protocol (mesh/kafka.py) the member gives up every partition, joins the group again and gets
its assignment back, fetching nothing meanwhile. On a broker of its own (devstack's LocalBroker), one member (the
workers' own InputReader, stages/reading.py) subscribes to 1, 2, 3 and 4 topics in turn, at several session
timeouts; printed: the seconds from each subscribe() to the assignment that answers it (the first includes
finding the group's coordinator). A live task's lag grows by this much (README, "Bounded lag"; the workers log
each one as `rebalanced in ... s`).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from posemesh.devstack.broker import LocalBroker
from posemesh.mesh import kafka
from posemesh.mesh.settings import Settings
from posemesh.stages.base import Recovery
from posemesh.stages.reading import InputReader

SESSION_TIMEOUTS_MS = (1000, 2000, 4000, 10000)
TOPICS = [f"rebalance_{n}" for n in range(4)]


def subscribe_times(settings: Settings, session_timeout_ms: int) -> list[float]:
    settings = dataclasses.replace(settings, kafka_session_timeout_ms=session_timeout_ms,
                                   kafka_heartbeat_ms=min(settings.kafka_heartbeat_ms, session_timeout_ms // 3))
    reader = InputReader(settings, f"bench-rebalance-{session_timeout_ms}", "bench-rebalance", Recovery.REDO,
                         lambda tps: None, lambda tps: None)
    times = []
    try:
        for n in range(1, len(TOPICS) + 1):
            assignments, start = reader.assignments, time.monotonic()
            reader.subscribe(TOPICS[:n])
            while reader.assignments == assignments and time.monotonic() - start < 30:
                reader.poll(1, 0.05)
            times.append(time.monotonic() - start if reader.assignments > assignments else float("nan"))
    finally:
        reader.close()
    return times


def main() -> None:
    with LocalBroker() as broker:
        settings = Settings()
        settings.kafka_bootstrap = broker.bootstrap
        kafka.ensure_shared_topics(settings)  # the idle topic every stage's group reads
        kafka.create_topics(kafka.admin(settings), [kafka.TopicSpec(t, 4, {}) for t in TOPICS])
        print("| session timeout | first join, s | each later subscription change, s (median of 3) |")
        print("|---|---|---|")
        for timeout_ms in SESSION_TIMEOUTS_MS:
            first, *later = subscribe_times(settings, timeout_ms)
            print(f"| {timeout_ms} ms | {first:.2f} | {statistics.median(later):.2f} |", flush=True)


if __name__ == "__main__":
    main()
