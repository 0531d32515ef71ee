"""Does cost grow linearly? Time and broker memory against video length and against concurrent tasks.

    .venv/bin/python bench/scaling.py [--clip PATH] [--pose-model blazepose_lite]

On one stack: the clip (default the 795-frame vtest) once, a 4x longer concatenation of it once, then
1, 4 and 8 concurrent uploads of the clip. For each run: seconds and CPU milliseconds per frame, and how
much the broker's memory grew per frame while the task's topics existed (the local broker keeps every
record in memory until the topics are deleted; the runs keep them, and delete them between runs). Linear
means the per-frame numbers stay flat as length and concurrency grow.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench.measure import rss_mb, run_uploads, topic_bytes, tree_cpu
from posemesh.client import Client
from posemesh.devstack.stack import Stack, StackConfig
from posemesh.mesh import kafka
from posemesh.mesh.settings import default_media_dir
from tests.clips import repeat


def run(stack: Stack, client: Client, clip: Path, n: int, pose_model: str) -> dict:
    broker = next(s for s in stack.services if s.name == "broker")
    before_mem = rss_mb(broker.proc.pid)
    cpu0 = sum(tree_cpu(s.proc.pid) for s in stack.services)
    uploads, wall = run_uploads(client, clip, n, pose_model)
    cpu1 = sum(tree_cpu(s.proc.pid) for s in stack.services)
    frames = sum(u.frames for u in uploads)
    grown = rss_mb(broker.proc.pid) - before_mem
    held = sum(topic_bytes(stack.bootstrap, kafka.task_topic(p, u.task.task_id))[1]
               for u in uploads for p in kafka.TASK_TOPIC_PREFIXES)
    _delete_topics(stack, [u.task.task_id for u in uploads])
    return {"n": n, "frames": frames, "wall": wall, "s_per_frame": wall / frames,
            "cpu_ms": (cpu1 - cpu0) / frames * 1000, "held_kb_per_frame": held / 1024 / frames,
            "held_mb": held / 2**20, "broker_mb": grown}


def _delete_topics(stack: Stack, task_ids: list[str]) -> None:
    """Free the broker between runs (the gateway would, after its delay): announce nothing, just wait for
    the gateway's own deletion, which the short delay below makes prompt."""
    from posemesh.mesh.settings import Settings

    settings = Settings()
    settings.kafka_bootstrap = stack.bootstrap
    admin = kafka.admin(settings)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        left = kafka.list_task_topics(admin)
        if not any(t in left for t in task_ids):
            return
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=default_media_dir() / "vtest_opencv_480x360.mp4")
    parser.add_argument("--pose-model", default="blazepose_lite")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="posemesh-scaling-"))
    longer = repeat(args.clip, work / f"{args.clip.stem}_x4.mp4", 4)
    # Topics go 30 s after a task ends, once no worker reads them: time to count what they hold first.
    os.environ["POSEMESH_TOPIC_DELETE_DELAY_S"] = "30"
    stack = Stack(StackConfig(run_dir=work / "stack"))
    rows = []
    try:
        stack.start()
        with Client(stack.gateway_address) as client:
            run_uploads(client, default_media_dir() / "mmpose_demo_960x540_5f.mp4", 1, args.pose_model)
            for label, clip, n in (("length x1", args.clip, 1), ("length x4", longer, 1),
                                   ("1 task", args.clip, 1), ("4 tasks", args.clip, 4), ("8 tasks", args.clip, 8)):
                r = run(stack, client, clip, n, args.pose_model)
                rows.append((label, r))
                print(f"{label}: {r['frames']} frames in {r['wall']:.1f} s = {r['s_per_frame'] * 1000:.1f} ms/frame, "
                      f"CPU {r['cpu_ms']:.1f} ms/frame, topics hold {r['held_mb']:.0f} MB "
                      f"({r['held_kb_per_frame']:.1f} KB/frame), broker RSS +{r['broker_mb']:.0f} MB", flush=True)
    finally:
        stack.stop()
    base = rows[0][1]
    print()
    print("| run | frames | wall ms/frame | CPU ms/frame | broker holds KB/frame | broker RSS growth MB | "
          "wall per frame vs first |")
    print("|---|---|---|---|---|---|---|")
    for label, r in rows:
        print(f"| {label} ({args.clip.name}) | {r['frames']} | {r['s_per_frame'] * 1000:.1f} | {r['cpu_ms']:.1f} | "
              f"{r['held_kb_per_frame']:.1f} | {r['broker_mb']:.0f} | {r['s_per_frame'] / base['s_per_frame']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
