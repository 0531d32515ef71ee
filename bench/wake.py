"""What a model run costs right after its CPU was idle, against the same run in a busy loop.

    .venv/bin/python bench/wake.py [--runs 40]

The plain loop (bench/loop.py) never lets its core rest: it goes from one frame's work to the next. The
stack's processes hand work to each other and wait in between, and on some machines the first milliseconds
after a core was idle are slower (a virtual CPU that halted and got its physical core back, frequency and
caches that cooled down). Printed, side by side in one run:

1. ONNX Runtime (one thread, in this process) running BlazePose-lite on 8 crops back to back, then with a
   sleep of each given length before every run: CPU ms per run (the thread's own time) and the ratio.
2. The same 8-crop batch sent to Triton's Python backend one request after another, as the pose stage sends
   them, with the stub's CPU per request against the in-process run: what Triton "adds to the model" is
   this process's figure 1 ratio, plus the server's own threads (about 2 ms a request).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import onnxruntime as ort

from bench.measure import process_cpu
from posemesh.devstack.triton_server import TritonServer
from posemesh.mesh.models import prepare
from posemesh.mesh.settings import REPO_ROOT
from posemesh.stages.triton import TritonModel

GAPS_MS = (0.0, 0.5, 2.0, 7.0, 20.0)
MODEL = "blazepose_lite"


def in_process(onnx: Path, crops: np.ndarray, runs: int) -> dict[float, float]:
    """CPU ms per run, by the idle gap (ms) before each run."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    for _ in range(5):
        session.run(names, {"input_1": crops})
    out = {}
    for gap in GAPS_MS:
        times = []
        for _ in range(runs):
            if gap:
                time.sleep(gap / 1000)
            t0 = time.thread_time()
            session.run(names, {"input_1": crops})
            times.append(time.thread_time() - t0)
        out[gap] = 1000 * float(np.median(times))
    return out


def through_triton(onnx_dir: Path, crops: np.ndarray, runs: int) -> tuple[float, float, float]:
    """Triton's stub, Triton's server and this client: CPU ms per request, requests one after another."""
    with tempfile.TemporaryDirectory(prefix="posemesh-bench-wake-") as tmp, \
            TritonServer(onnx_dir, Path(tmp), models=[MODEL]) as server:
        pid = server.proc.pid
        stubs = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]  # CPU_INSTANCES

        def stub_cpu() -> float:
            return sum(process_cpu(stub) for stub in stubs)
        model = TritonModel(server.url, MODEL)
        model.wait_ready(60)
        for _ in range(5):
            model(input_1=crops)
        stub0, server0, own0 = stub_cpu(), process_cpu(pid), time.process_time()
        for _ in range(runs):
            model(input_1=crops)
        stub1, server1, own1 = stub_cpu(), process_cpu(pid), time.process_time()
        model.close()
    return (1000 * (stub1 - stub0) / runs, 1000 * (server1 - server0) / runs, 1000 * (own1 - own0) / runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    onnx_dir = REPO_ROOT / "run" / "onnx"
    prepare(onnx_dir)
    crops = np.random.default_rng(0).integers(0, 256, (8, 256, 256, 3), dtype=np.uint8)
    alone = in_process(onnx_dir / f"{MODEL}.onnx", crops, args.runs)
    stub, server, client = through_triton(onnx_dir, crops, args.runs)
    again = in_process(onnx_dir / f"{MODEL}.onnx", crops, args.runs)
    print(f"\n{MODEL}, 8 crops a run, ONNX Runtime on one thread, {os.cpu_count()} CPUs: CPU ms per run (median of "
          f"{args.runs}), before and after the Triton runs")
    print("| idle before each run | before | after | / back to back |\n|---|---|---|---|")
    for gap in GAPS_MS:
        ratio = (alone[gap] + again[gap]) / (alone[0.0] + again[0.0])
        print(f"| {gap:g} ms | {alone[gap]:.1f} | {again[gap]:.1f} | {ratio:.2f} |")
    base = (alone[0.0] + again[0.0]) / 2
    print(f"\nThrough Triton, one request after another: the stub {stub:.1f} ms a request ({stub / base:.2f}x the "
          f"back-to-back run), the server {server:.1f} ms, this client {client:.1f} ms")


if __name__ == "__main__":
    main()
