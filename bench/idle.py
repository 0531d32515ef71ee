"""What a running stack costs when nobody uses it: CPU of every process over a quiet minute.

    .venv/bin/python bench/idle.py [--seconds 60] [--reserved 0 4] [--ingest N] [--clip PATH | --no-upload]

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

Next to the idle figures, measured the same hour on the same stacks: what each stack spends on one upload right
after its quiet window (% of one core while it runs, and CPU ms a frame), and what a wake-up costs this hour (a
process that only sleeps 1 ms at a time, before and after the stacks): the idle figure is its wake-ups a second
times that hour's price, and the loaded figure says what the price did to the work itself.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import run_uploads, tree_cpu, tree_wakeups
from posemesh.client import Client
from posemesh.devstack.stack import Stack, StackConfig
from posemesh.mesh.pipeline import INGEST, STAGE_NAMES
from posemesh.mesh.settings import default_media_dir

TARGET = 5.0  # % of one core, all processes


CONFIGS = {
    "local stack": {},
    "deploy/ settings": {"POSEMESH_KAFKA_FETCH_WAIT_MS": "500", "POSEMESH_KAFKA_HEARTBEAT_MS": "1000",
                         "POSEMESH_KAFKA_SESSION_TIMEOUT_MS": "10000", "POSEMESH_KAFKA_METADATA_REFRESH_MS": "10000"},
}


PRICE_PROBE = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from bench.measure import wakeups
seconds = float(sys.argv[2])
woke0, cpu0, t0 = wakeups(os.getpid()), time.process_time(), time.monotonic()
while time.monotonic() - t0 < seconds:
    time.sleep(0.001)
print(1e6 * (time.process_time() - cpu0) / max(1, wakeups(os.getpid()) - woke0))
"""


def wake_up_price_us(seconds: float = 5.0) -> float:
    """This hour's CPU microseconds a wake-up: a fresh process (one thread) sleeping 1 ms at a time, its CPU over its
    context switches (Python's own few microseconds a loop included)."""
    probe = subprocess.run([sys.executable, "-c", PRICE_PROBE, str(Path(__file__).resolve().parent.parent),
                            str(seconds)], capture_output=True, text=True, check=True)
    return float(probe.stdout)


def loaded_cost(stack: Stack, clip: Path) -> tuple[dict[str, float], float]:
    """(% of one core of each process tree while one upload of `clip` runs, CPU ms a frame of all)."""
    with Client(stack.gateway_address) as client:
        cpu0 = {s.name: tree_cpu(s.proc.pid) for s in stack.services}
        uploads, wall = run_uploads(client, clip, 1, "blazepose_lite")
        used = {s.name: tree_cpu(s.proc.pid) - cpu0[s.name] for s in stack.services}
    frames = max(1, uploads[0].frames)
    return {name: 100 * cpu / wall for name, cpu in used.items()}, 1000 * sum(used.values()) / frames


def idle_cost(seconds: float, reserved: int, settle_s: float, config: dict[str, str], ingest: int = 0,
              clip: Path | None = None) -> tuple[dict[str, float], dict[str, float], tuple[dict[str, float], float]]:
    """(% of one core, wake-ups a second) of each process tree of an idle stack, and then what one upload of
    `clip` cost it (loaded_cost; empty without a clip)."""
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
            idle = ({s.name: 100 * (tree_cpu(s.proc.pid) - cpu0[s.name]) / took for s in stack.services},
                    {s.name: (tree_wakeups(s.proc.pid) - woke0[s.name]) / took for s in stack.services})
            return (*idle, loaded_cost(stack, clip) if clip else ({}, 0.0))
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
    parser.add_argument("--clip", type=Path, default=default_media_dir() / "towncentre_1080p_302f.mp4",
                        help="uploaded once to each stack after its quiet window, for the loaded figures")
    parser.add_argument("--no-upload", action="store_true", help="idle figures only")
    args = parser.parse_args()
    if not args.no_upload and not args.clip.is_file():
        parser.error(f"no clip at {args.clip} (--clip PATH, or --no-upload)")
    prices = [wake_up_price_us()]
    costs = {f"{label}, {n} reserved": idle_cost(args.seconds, n, args.settle, config, args.ingest,
                                                  None if args.no_upload else args.clip)
             for label, config in CONFIGS.items() for n in args.reserved}
    prices.append(wake_up_price_us())
    cpu = {label: c for label, (c, _woke, _loaded) in costs.items()}
    woke = {label: w for label, (_c, w, _loaded) in costs.items()}
    print(f"\nidle CPU, % of one core over {args.seconds:.0f} s, one stack (target: all < {TARGET:.0f}%)")
    table(cpu, "{:.1f}", lambda total: f"{total:.1f} ({'ok' if total < TARGET else 'OVER'})")
    print(f"\nwake-ups a second (context switches of every thread), the same {args.seconds:.0f} s: what the CPU above "
          "follows, at a price per wake-up that this host changes from hour to hour")
    table(woke, "{:.0f}", lambda total: f"{total:.0f}")
    price = sum(prices) / len(prices)
    print(f"\nthis hour's price of a wake-up (a process sleeping 1 ms at a time), before and after the stacks: "
          f"{prices[0]:.1f} and {prices[1]:.1f} CPU microseconds; each stack's wake-ups at that price, % of one core "
          "(the rest of its idle CPU is work done when awake):")
    print(" | ".join(f"{label}: {sum(w.values()) * price / 1e4:.1f}" for label, w in woke.items()))
    if not args.no_upload:
        loaded = {label: busy for label, (_c, _w, (busy, _ms)) in costs.items()}
        print(f"\nthe same stacks loaded: % of one core while one upload of {args.clip.name} ran, right after the "
              "quiet window")
        table(loaded, "{:.1f}", lambda total: f"{total:.1f}")
        per_frame = " | ".join(f"{ms:.0f}" for (_c, _w, (_busy, ms)) in costs.values())
        print(f"| CPU ms a frame, all | {per_frame} |")
        idle_share = " | ".join(f"{100 * sum(c.values()) / sum(busy.values()):.1f}%"
                                for (c, _w, (busy, _ms)) in costs.values())
        print(f"| idle / loaded, all | {idle_share} |")


def table(runs: dict[str, dict[str, float]], cell: str, total) -> None:
    names = list(next(iter(runs.values())))
    print("| process | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for name in names:
        print(f"| {name} | " + " | ".join(cell.format(r[name]) for r in runs.values()) + " |")
    print("| **all** | " + " | ".join(total(sum(r.values())) for r in runs.values()) + " |")


if __name__ == "__main__":
    main()
