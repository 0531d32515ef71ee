"""GetTask latency while 200 WatchTask streams are open and uploads run, next to the same calls on a quiet
gateway, on one stack (issue 7: no user can starve another).

    .venv/bin/python bench/gateway_load.py [--streams 200] [--calls 200]

Five users. Quiet: `--calls` GetTask calls from one user, nothing else running. Loaded: four users each
upload towncentre (so the mesh is busy and every stream gets progress updates) and hold streams/4
WatchTask streams each on their task, a fifth user uploads two more clips, and the first user makes the same
GetTask calls. Printed: p50 / p95 / max of both, and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc

from posemesh.devstack.stack import Stack, StackConfig
from posemesh.mesh.settings import default_media_dir
from posemesh.v1 import task_service_pb2 as tpb
from posemesh.v1 import task_service_pb2_grpc as tpb_grpc
from tests.helpers import upload
from tests.test_gateway_load import KEYS, Crowd, meta


def get_latencies(stub, task_id: str, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        stub.GetTask(tpb.GetTaskRequest(task_id=task_id), metadata=meta("alice"), timeout=30)
        out.append(time.perf_counter() - t0)
        time.sleep(0.01)
    return out


def summary(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))], ordered[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    clip = default_media_dir() / "towncentre_1080p_302f.mp4"
    os.environ["POSEMESH_API_KEYS"] = ",".join(f"{u}:{k}" for u, k in KEYS.items())
    with tempfile.TemporaryDirectory(prefix="posemesh-bench-load-") as tmp:
        stack = Stack(StackConfig(run_dir=Path(tmp) / "stack", rtsp_port=-1)).start()
        try:
            with grpc.insecure_channel(stack.gateway_address) as channel:
                stub = tpb_grpc.TaskServiceStub(channel)
                probe = upload(stub, default_media_dir() / "mmpose_demo_960x540_5f.mp4", meta("alice")).task_id
                get_latencies(stub, probe, 20)  # warm-up
                quiet = get_latencies(stub, probe, args.calls)
                users = ("alice", "bob", "carol", "dave")
                tasks = {u: upload(stub, clip, meta(u)).task_id for u in users}
                crowd = Crowd(stack.gateway_address, tasks, per_user=args.streams // len(users)).start()
                try:
                    if not crowd.ready.wait(120) or crowd.errors:
                        sys.exit(f"streams did not open: {crowd.open} open, errors {crowd.errors[:3]}")
                    uploads = [threading.Thread(target=upload, args=(stub, clip, meta("erin"))) for _ in range(2)]
                    for t in uploads:
                        t.start()
                    loaded = get_latencies(stub, probe, args.calls)
                    for t in uploads:
                        t.join()
                finally:
                    crowd.stop()
        finally:
            stack.stop()
    q, lo = summary(quiet), summary(loaded)
    print(f"\nGetTask latency, {args.calls} calls each (ms); loaded = {crowd.open} open WatchTask streams of 4 users "
          f"on 4 running towncentre tasks + 2 uploads by a fifth user")
    print("| | p50 | p95 | max |")
    print("|---|---|---|---|")
    print(f"| quiet gateway | {q[0] * 1e3:.1f} | {q[1] * 1e3:.1f} | {q[2] * 1e3:.1f} |")
    print(f"| under load | {lo[0] * 1e3:.1f} | {lo[1] * 1e3:.1f} | {lo[2] * 1e3:.1f} |")
    print(f"| loaded / quiet | {lo[0] / q[0]:.2f} | {lo[1] / q[1]:.2f} | {lo[2] / q[2]:.2f} |")


if __name__ == "__main__":
    main()
