"""What a running stack costs when nobody uses it: CPU of every process over a quiet minute.

    .venv/bin/python bench/idle.py [--seconds 60] [--reserved 0 4] [--ingest N]

Starts a local stack (broker, Triton, gateway, one worker per stage, no RTSP relay), lets it settle (the
reserved task ids' topics are made and every stage has joined them), then samples each process tree's CPU
seconds and context switches over the window. Prints % of one core per process and the total, against the
target: an idle mesh below 5% of one core in all; then the wake-ups a second of each process (every thread's
context switches). The CPU of an idle process is its wake-ups times a price per wake-up that this host changes
from hour to hour (the same code read 7.6% and 35% of a core on two days), so compare CPU within one run, and
wake-ups across runs. Each configuration runs with 0 and 4 reserved task ids
(POSEMESH_RESERVED_TASKS: per-task topics kept ready for the next uploads, read by every stage), to show
how the idle cost scales with them, under the local stack's Kafka client settings and under deploy/'s
(POSEMESH_KAFKA_FETCH_WAIT_MS=500, a 1 s heartbeat and a 10 s metadata refresh, for Apache Kafka, which
answers a held fetch as soon as a record arrives and keeps its topics). --ingest N adds N ingest replicas
(POSEMESH_INGEST=stage).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import tree_cpu, tree_wakeups
from posemesh.devstack.stack import Stack, StackConfig
from posemesh.mesh.pipeline import INGEST, STAGE_NAMES

TARGET = 5.0  # % of one core, all processes


CONFIGS = {
    "local stack": {},
    "deploy/ settings": {"POSEMESH_KAFKA_FETCH_WAIT_MS": "500", "POSEMESH_KAFKA_HEARTBEAT_MS": "1000",
                         "POSEMESH_KAFKA_SESSION_TIMEOUT_MS": "10000", "POSEMESH_KAFKA_METADATA_REFRESH_MS": "10000"},
}


def idle_cost(seconds: float, reserved: int, settle_s: float, config: dict[str, str],
              ingest: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    """(% of one core, wake-ups a second) of each process tree of an idle stack."""
    os.environ.update(config, POSEMESH_RESERVED_TASKS=str(reserved))
    workers = {s: 1 for s in STAGE_NAMES} | ({INGEST: ingest} if ingest else {})
    with tempfile.TemporaryDirectory(prefix="posemesh-bench-idle-") as tmp:
        stack = Stack(StackConfig(run_dir=Path(tmp) / "stack", rtsp_port=-1, workers=workers)).start()
        try:
            time.sleep(settle_s)
            cpu0 = {s.name: tree_cpu(s.proc.pid) for s in stack.services}
            woke0 = {s.name: tree_wakeups(s.proc.pid) for s in stack.services}
            t0 = time.monotonic()
            time.sleep(seconds)
            took = time.monotonic() - t0
            return ({s.name: 100 * (tree_cpu(s.proc.pid) - cpu0[s.name]) / took for s in stack.services},
                    {s.name: (tree_wakeups(s.proc.pid) - woke0[s.name]) / took for s in stack.services})
        finally:
            stack.stop()
            for name in config:
                del os.environ[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=20.0)
    parser.add_argument("--reserved", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--ingest", type=int, default=0, help="ingest replicas (0: the gateway decodes)")
    args = parser.parse_args()
    costs = {f"{label}, {n} reserved": idle_cost(args.seconds, n, args.settle, config, args.ingest)
             for label, config in CONFIGS.items() for n in args.reserved}
    cpu = {label: c for label, (c, _woke) in costs.items()}
    woke = {label: w for label, (_c, w) in costs.items()}
    print(f"\nidle CPU, % of one core over {args.seconds:.0f} s, one stack (target: all < {TARGET:.0f}%)")
    table(cpu, "{:.1f}", lambda total: f"{total:.1f} ({'ok' if total < TARGET else 'OVER'})")
    print(f"\nwake-ups a second (context switches of every thread), the same {args.seconds:.0f} s: what the CPU above "
          "follows, at a price per wake-up that this host changes from hour to hour")
    table(woke, "{:.0f}", lambda total: f"{total:.0f}")


def table(runs: dict[str, dict[str, float]], cell: str, total) -> None:
    names = list(next(iter(runs.values())))
    print("| process | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for name in names:
        print(f"| {name} | " + " | ".join(cell.format(r[name]) for r in runs.values()) + " |")
    print("| **all** | " + " | ".join(total(sum(r.values())) for r in runs.values()) + " |")


if __name__ == "__main__":
    main()
