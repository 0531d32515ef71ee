"""The loop a user would write instead of the mesh, and the mesh measured against it side by side.

    .venv/bin/python bench/loop.py [--clip PATH] [--frames 302] [--pose-model blazepose_lite]

The loop is one process and nothing of the mesh: decode (PyAV) -> YOLOX -> crops -> pose -> ByteTrack ->
draw -> H.264 MP4 + keypoints JSON lines, with the project's own ONNX files, pre- and post-processing,
tracker and drawing, ONNX Runtime on one thread. In one run, in this order: one loop; the stack with one
upload; N loops in parallel (N = cores, one video each); the stack with N and with 2N concurrent uploads.
Printed: frames/s, CPU ms per frame (the loop's own process; the stack's processes: broker, Triton,
gateway, each stage) and the ratios against their targets (issue 19):

- stack, 1 upload / one loop >= 1.5 (two cores pipelined against one loop);
- stack, N and 2N uploads / N parallel loops >= 0.9;
- stack CPU per frame / the loop's <= 1.25.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import av
import numpy as np
import onnxruntime as ort

from bench.end_to_end import cpu_by_service
from bench.measure import descendants, idle_between_bursts, run_uploads
from bench.profile import Profiler
from posemesh.client import Client
from posemesh.devstack.stack import Stack, StackConfig
from posemesh.mesh import media
from posemesh.mesh.models import prepare
from posemesh.mesh.settings import REPO_ROOT, default_media_dir
from posemesh.stages.detect import DEFAULT_MIN_SCORE, Detector
from posemesh.stages.drawing import draw
from posemesh.stages.pose import PoseEstimator
from posemesh.stages.results import keypoints_record
from posemesh.stages.track import TaskTracker
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb

TARGETS = {"stack 1 / loop 1": 1.5, "stack N / loops N": 0.9, "stack 2N / loops N": 0.9}
CPU_TARGET = 1.25


class OnnxModel:
    """An ONNX Runtime session called like TritonModel: inputs and outputs by name."""

    def __init__(self, path: Path, threads: int = 1):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.names, self.session.run(None, inputs)))


def plain_loop(clip: Path, out_dir: Path, onnx_dir: Path, pose_model: str, threads: int = 1) -> int:
    """The whole job for one video in one process; returns the frames done."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = media.probe(clip).video
    detector = Detector(OnnxModel(onnx_dir / "yolox.onnx", threads))
    estimator = PoseEstimator(pose_model, OnnxModel(onnx_dir / f"{pose_model}.onnx", threads))
    tracker = TaskTracker(info.fps or 30.0, DEFAULT_MIN_SCORE)
    frames = 0
    with av.open(str(out_dir / "annotated.mp4"), "w") as container, open(out_dir / "keypoints.jsonl", "w") as jsonl:
        stream = container.add_stream("libx264", rate=Fraction(info.fps or 30.0).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = info.width, info.height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23", "bf": "0"}
        for decoded in media.FrameReader(clip, info.fps):
            image = decoded.image
            h, w = image.shape[:2]
            [(boxes, scores)] = detector([image], [DEFAULT_MIN_SCORE])
            boxes = np.clip(boxes, 0, [w, h, w, h])
            frame = pb.Frame(index=decoded.index, timestamp_s=decoded.timestamp_s, width=w, height=h)
            for box, score in zip(boxes.tolist(), scores.tolist()):
                frame.persons.add(box=tpb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]), score=score)
            if len(boxes):
                crops, matrices = zip(*(estimator.crop(image, b) for b in boxes))
                points, point_scores = estimator(np.stack(crops), list(matrices))
                for person, pts, ss in zip(frame.persons, points.tolist(), point_scores.tolist()):
                    for (x, y), s in zip(pts, ss):
                        person.keypoints.add(x=x, y=y, score=s)
            for person, track_id in zip(frame.persons, tracker.update(boxes, scores, decoded.timestamp_s)):
                person.track_id = track_id
            draw(image, frame.persons)
            picture = av.VideoFrame.from_ndarray(image, format="bgr24")
            for packet in stream.encode(picture):
                container.mux(packet)
            jsonl.write(json.dumps(keypoints_record(frame)) + "\n")
            frames += 1
        for packet in stream.encode():
            container.mux(packet)
    return frames


def _loop_process(args) -> tuple[int, float]:
    clip, out_dir, onnx_dir, pose_model, start = args
    start.wait()
    before = resource.getrusage(resource.RUSAGE_SELF)
    frames = plain_loop(clip, out_dir, onnx_dir, pose_model)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return frames, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def loops(n: int, clip: Path, work: Path, onnx_dir: Path, pose_model: str) -> dict:
    """n plain loops in parallel processes, one video each: frames/s in all and CPU ms per frame."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Barrier(n + 1)
        with ctx.Pool(n) as pool:
            jobs = pool.map_async(_loop_process, [(clip, work / f"loop{k}", onnx_dir, pose_model, start)
                                                  for k in range(n)])
            start.wait()
            t0 = time.perf_counter()
            results = jobs.get()
            wall = time.perf_counter() - t0
    frames = sum(f for f, _c in results)
    return {"fps": frames / wall, "cpu_ms": 1000 * sum(c for _f, c in results) / frames, "by": {}, "activities": {}}


def python_processes(stack: Stack) -> dict[str, int]:
    """The stack's Python processes by name: gateway, workers, and Triton's Python-backend stubs (the
    models run there)."""
    pids = {s.name: s.proc.pid for s in stack.services if s.name not in ("broker", "triton", "rtsp")}
    triton = next(s for s in stack.services if s.name == "triton")
    stubs: dict[str, int] = {}
    for pid in sorted(descendants(triton.proc.pid)):  # one stub per instance of a model (CPU_INSTANCES)
        model = _stub_model(pid)
        stubs[model] = stubs.get(model, 0) + 1
        pids[f"triton: {model} {stubs[model]}"] = pid
    return pids


def _stub_model(pid: int) -> str:
    """The model a Python-backend stub serves: its command line names the model's model.py."""
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    path = next((a.decode() for a in args if a.endswith(b"model.py")), "")
    return Path(path).parent.parent.name if path else str(pid)


def stack_run(stack: Stack, client: Client, clip: Path, n: int, pose_model: str, profile: bool = False,
              outputs: list[str] | None = None) -> dict:
    """n concurrent uploads; frames/s, CPU ms per frame by process and, when profiled, by activity."""
    idle_between_bursts()
    pids = python_processes(stack) if profile else {}
    # annotate's only threads that no library names are x264's (PyAV's encoder)
    profiler = Profiler(pids, unnamed={n: "encode" for n in pids if n.startswith("annotate")}) if profile else None
    before = cpu_by_service(stack)
    uploads, wall = run_uploads(client, clip, n, pose_model, outputs)
    after = cpu_by_service(stack)
    frames = sum(u.frames for u in uploads)
    by = {k: 1000 * (after[k] - before.get(k, 0.0)) / frames for k in after}
    activities: dict[str, dict[str, float]] = {}
    if profiler is not None:
        profiler.stop()
        for name, seconds in profiler.breakdown().items():
            activities[name] = {a: 1000 * s / frames for a, s in seconds.items()}
    return {"fps": frames / wall, "cpu_ms": sum(by.values()), "by": by, "activities": activities}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, default=default_media_dir() / "towncentre_1080p_302f.mp4")
    parser.add_argument("--frames", type=int, default=0, help="use the clip's first N frames (0: all)")
    parser.add_argument("--pose-model", default="blazepose_lite")
    args = parser.parse_args()
    n = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="posemesh-bench-loop-") as tmp:
        work = Path(tmp)
        clip = args.clip
        if args.frames:
            from tests.helpers import make_clip

            clip = make_clip(args.clip, work / "clip.mp4", args.frames)
        onnx_dir = REPO_ROOT / "run" / "onnx"
        prepare(onnx_dir)
        rows: dict[str, dict] = {}
        rows["loop 1"] = loops(1, clip, work, onnx_dir, args.pose_model)
        print(f"loop 1: {rows['loop 1']['fps']:.2f} frames/s", flush=True)
        stack = Stack(StackConfig(run_dir=work / "stack", rtsp_port=-1)).start()
        try:
            client = Client(stack.gateway_address, "posemesh-dev-key")
            rows["stack 1"] = stack_run(stack, client, clip, 1, args.pose_model)
            print(f"stack 1: {rows['stack 1']['fps']:.2f} frames/s", flush=True)
            # Keypoints only (no annotated video): no pixel work after pose (issue 19, item 3).
            rows["stack 1, keypoints only"] = stack_run(stack, client, clip, 1, args.pose_model, outputs=["keypoints"])
            print(f"stack 1, keypoints only: {rows['stack 1, keypoints only']['fps']:.2f} frames/s", flush=True)
            rows[f"loops {n}"] = loops(n, clip, work, onnx_dir, args.pose_model)
            print(f"loops {n}: {rows[f'loops {n}']['fps']:.2f} frames/s", flush=True)
            for k in (n, 2 * n):
                rows[f"stack {k}"] = stack_run(stack, client, clip, k, args.pose_model)
                print(f"stack {k}: {rows[f'stack {k}']['fps']:.2f} frames/s", flush=True)
            # Profiled apart: sampling costs the processes some CPU, so this run is not in the ratios.
            profiled = stack_run(stack, client, clip, 1, args.pose_model, profile=True)
        finally:
            stack.stop()
    print(f"\n{clip.name}, {args.pose_model}, {n} cores: frames/s and CPU ms per frame, measured side by side")
    kinds = sorted({k for r in rows.values() for k in r["by"]})
    print("| run | frames/s | CPU ms/frame | " + " | ".join(kinds) + " |")
    print("|---|---|---|" + "---|" * len(kinds))
    for name, r in rows.items():
        print(f"| {name} | {r['fps']:.2f} | {r['cpu_ms']:.0f} | "
              + " | ".join(f"{r['by'].get(k, 0):.0f}" if r["by"] else "-" for k in kinds) + " |")
    activities = profiled["activities"]
    if activities:
        names = sorted({a for shares in activities.values() for a in shares})
        print(f"\nstack, 1 upload again, profiled ({profiled['fps']:.2f} frames/s): CPU ms per frame by process "
              "and activity (each thread's CPU from /proc, spread over its py-spy samples)")
        print("| process | " + " | ".join(names) + " | all |")
        print("|---|" + "---|" * (len(names) + 1))
        for process, ms in activities.items():
            print(f"| {process} | " + " | ".join(f"{ms.get(a, 0):.1f}" for a in names) + f" | {sum(ms.values()):.1f} |")
        print("(not sampled: the broker, and tritonserver's own C++ threads: Triton's figure above minus its stubs')")
    ratios = {"stack 1 / loop 1": rows["stack 1"]["fps"] / rows["loop 1"]["fps"],
              "stack N / loops N": rows[f"stack {n}"]["fps"] / rows[f"loops {n}"]["fps"],
              "stack 2N / loops N": rows[f"stack {2 * n}"]["fps"] / rows[f"loops {n}"]["fps"]}
    print("\n| ratio | measured | target | met |\n|---|---|---|---|")
    for name, value in ratios.items():
        print(f"| {name} | {value:.2f} | >= {TARGETS[name]} | {'yes' if value >= TARGETS[name] else 'no'} |")
    cpu = rows["stack 1"]["cpu_ms"] / rows["loop 1"]["cpu_ms"]
    print(f"| stack CPU per frame / loop's (1 upload) | {cpu:.2f} | <= {CPU_TARGET} | "
          f"{'yes' if cpu <= CPU_TARGET else 'no'} |")


if __name__ == "__main__":
    main()
