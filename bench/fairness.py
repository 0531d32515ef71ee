"""Fairness of concurrent uploads: when each task's frames first pass each step, and how far apart equal
videos finish, over several rounds of concurrent uploads on one warm stack.

    .venv/bin/python bench/fairness.py [--clip PATH] [--uploads 4] [--rounds 3] [--pose-model blazepose_lite]

Printed per round and task: seconds from the end of its upload to its first frame through each step
(decode, detect, pose, track, annotate) and to its end; then the worst first annotated frame (target < 3 s)
and the slowest / fastest completion (target <= 1.25) over all rounds. The step times say where a late task
waited: a late `detect` with an early `decode` is a consumer group that had not yet taken the task's topic.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import idle_between_bursts, run_uploads
from posemesh.client import Client
from posemesh.devstack.stack import Stack, StackConfig
from posemesh.mesh.pipeline import PROGRESS_STEPS
from posemesh.mesh.settings import default_media_dir


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=default_media_dir() / "towncentre_1080p_302f.mp4")
    parser.add_argument("--uploads", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pose-model", default="blazepose_lite")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="posemesh-fairness-"))
    print(f"clip {args.clip.name}, {args.uploads} concurrent uploads x {args.rounds} rounds, {os.cpu_count()} cores",
          flush=True)
    stack = Stack(StackConfig(run_dir=work / "stack"))
    firsts: list[float] = []
    spreads: list[float] = []
    try:
        stack.start()
        with Client(stack.gateway_address) as client:
            run_uploads(client, default_media_dir() / "mmpose_demo_960x540_5f.mp4", 1, args.pose_model)  # warm
            header = " | ".join(f"{s:>8}" for s in PROGRESS_STEPS)
            for r in range(args.rounds):
                idle_between_bursts()
                uploads, wall = run_uploads(client, args.clip, args.uploads, args.pose_model)
                print(f"round {r + 1}: {wall:.1f} s; seconds after each upload ended to the first frame of:\n"
                      f"  upload s | {header} |     done", flush=True)
                for u in uploads:
                    steps = " | ".join(f"{u.step_first[s] - u.t['uploaded']:8.2f}" if s in u.step_first else "       -"
                                       for s in PROGRESS_STEPS)
                    print(f"  {u.t['uploaded'] - u.t['start']:8.2f} | {steps} | {u.duration:8.1f}", flush=True)
                firsts += [u.first_latency for u in uploads]
                durations = [u.duration for u in uploads]
                spreads.append(max(durations) / min(durations))
    finally:
        stack.stop()
    worst, spread = max(firsts), max(spreads)
    print(f"first annotated frame after upload: worst {worst:.2f} s "
          f"(target < 3 s: {'yes' if worst < 3 else 'no'}); "
          f"completion slowest / fastest: worst round {spread:.2f} "
          f"(target <= 1.25: {'yes' if spread <= 1.25 else 'no'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
