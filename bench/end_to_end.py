"""End-to-end benchmark: the stack against the in-process ceiling, measured side by side in one run.

    .venv/bin/python bench/end_to_end.py [--clip PATH] [--pose-model blazepose_lite]

Prints ratios (this machine is shared and noisy; absolute times drift, ratios measured minutes apart
in one run much less):
  1. stack frames/s over the in-process ceiling: one Python process running the same ONNX models with
     ONNX Runtime directly (same stage code for pre/post-processing, tracking, drawing and encoding; no
     Kafka, gRPC, Triton or JPEG), with the same thread budget (ORT threads = the machine's cores);
  2. four concurrent uploads: aggregate frames/s over one upload alone;
  3. seconds from the end of an upload to its first annotated frame.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from posemesh import media  # noqa: E402
from posemesh.client import Client  # noqa: E402
from posemesh.models import prepare  # noqa: E402
from posemesh.settings import REPO_ROOT, Settings, default_media_dir  # noqa: E402
from posemesh.stack import Stack, StackConfig  # noqa: E402
from posemesh.v1 import pipeline_pb2 as pb  # noqa: E402
from posemesh.v1 import task_service_pb2 as tpb  # noqa: E402
from posemesh.stages.annotate import AnnotateStage, draw  # noqa: E402
from posemesh.stages.detect import DEFAULT_MIN_SCORE, Detector  # noqa: E402
from posemesh.stages.pose import PoseEstimator  # noqa: E402
from posemesh.stages.base import FrameItem, TaskInfo  # noqa: E402
from posemesh.stages.track import TrackStage  # noqa: E402


class OrtModel:
    """The same call signature as stages.triton.TritonModel, on ONNX Runtime in this process."""

    def __init__(self, path: Path, threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, **inputs):
        return dict(zip(self.outputs, self.session.run(self.outputs, inputs)))


def in_process(clip: Path, onnx_dir: Path, pose_model: str, threads: int, out_dir: Path) -> tuple[int, float]:
    """Decode -> detect -> pose -> track -> annotate, frame by frame in one process. Returns (frames, s)."""
    info = media.probe(clip)
    fps = info.video.fps
    detector = Detector(OrtModel(onnx_dir / "yolox.onnx", threads))
    estimator = PoseEstimator(pose_model, OrtModel(onnx_dir / f"{pose_model}.onnx", threads))
    tracker, annotate = TrackStage(), AnnotateStage()
    settings = Settings()
    settings.data_dir = out_dir
    tracker.setup(settings)
    annotate.setup(settings)
    task = TaskInfo("ceiling00000000000000000000000000"[:32], video=info.video)
    out = None
    t0 = time.perf_counter()
    count = 0
    for decoded in media.frames(clip, fps):
        image = decoded.image
        [(boxes, scores)] = detector([image], [DEFAULT_MIN_SCORE])
        frame = pb.Frame(index=decoded.index, timestamp_s=decoded.timestamp_s, width=image.shape[1],
                         height=image.shape[0])
        if len(boxes):
            crops, matrices = zip(*(estimator.crop(image, b) for b in boxes))
            points, kp_scores = estimator(np.stack(crops), list(matrices))
            for box, score, pts, sc in zip(boxes.tolist(), scores.tolist(), points.tolist(), kp_scores.tolist()):
                person = frame.persons.add(box=pb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]), score=score)
                for (x, y), s in zip(pts, sc):
                    person.keypoints.add(x=x, y=y, score=s)
        tracker.process([FrameItem(task, frame)])
        out = out or annotate.writer(task, frame)
        out.write(frame, draw(image, frame.persons))
        count += 1
    task.total = count
    annotate.finish_task(task)
    return count, time.perf_counter() - t0


def run_uploads(client: Client, clip: Path, n: int, pose_model: str) -> dict:
    """n concurrent uploads; per upload: end of upload, first annotated frame, completion."""
    results = [dict() for _ in range(n)]
    start = time.perf_counter()

    def one(k: int):
        r = results[k]
        task = client.submit(clip, pose_model=pose_model)
        r["uploaded"] = time.perf_counter()
        for snapshot in client.watch(task.task_id):
            done = next((p.frames_done for p in snapshot.progress if p.stage == "annotate"), 0)
            if done and "first" not in r:
                r["first"] = time.perf_counter()
            if snapshot.state in (tpb.TASK_STATE_COMPLETED, tpb.TASK_STATE_FAILED, tpb.TASK_STATE_CANCELLED):
                r["done"] = time.perf_counter()
                r["state"] = snapshot.state
                r["frames"] = max(p.frames_total for p in snapshot.progress)
                r["error"] = snapshot.error_message

    threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bad = [r for r in results if r.get("state") != tpb.TASK_STATE_COMPLETED]
    if bad:
        raise RuntimeError(f"uploads failed: {bad}")
    frames = sum(r["frames"] for r in results)
    wall = max(r["done"] for r in results) - start
    return {"frames": frames, "wall": wall, "fps": frames / wall,
            "first_latency": [r["first"] - r["uploaded"] for r in results]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=default_media_dir() / "towncentre_1080p_302f.mp4")
    parser.add_argument("--pose-model", default="blazepose_lite")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="ORT threads for the ceiling")
    args = parser.parse_args()
    onnx_dir = REPO_ROOT / "run" / "onnx"
    prepare(onnx_dir)
    work = Path(tempfile.mkdtemp(prefix="posemesh-bench-"))

    print(f"clip {args.clip.name}, pose model {args.pose_model}, {os.cpu_count()} cores, "
          f"{platform.processor() or platform.machine()}, python {platform.python_version()}", flush=True)
    # Interleaved: ceiling, 1 upload, 4 uploads, 1 upload, ceiling. Each ratio compares means of runs
    # taken around each other, so a slow minute on this shared machine hits both sides.
    ceilings, singles = [], []

    def ceiling_run(tag: str) -> None:
        frames, seconds = in_process(args.clip, onnx_dir, args.pose_model, args.threads, work / tag)
        ceilings.append(frames / seconds)
        print(f"in-process ceiling: {frames} frames in {seconds:.1f}s = {ceilings[-1]:.2f} frames/s", flush=True)

    def single_run(client) -> dict:
        r = run_uploads(client, args.clip, 1, args.pose_model)
        singles.append(r)
        print(f"stack, 1 upload: {r['frames']} frames in {r['wall']:.1f}s = {r['fps']:.2f} frames/s; "
              f"first annotated frame {r['first_latency'][0]:.2f}s after the upload", flush=True)
        return r

    ceiling_run("ceiling1")
    stack = Stack(StackConfig(run_dir=work / "stack"))
    try:
        stack.start()
        with Client(stack.gateway_address) as client:
            warm_up = default_media_dir() / "mmpose_demo_960x540_5f.mp4"
            run_uploads(client, warm_up if warm_up.exists() else args.clip, 1, args.pose_model)  # first calls, joins
            single_run(client)
            four = run_uploads(client, args.clip, 4, args.pose_model)
            print(f"stack, 4 uploads: {four['frames']} frames in {four['wall']:.1f}s = {four['fps']:.2f} frames/s; "
                  f"first annotated frame {', '.join(f'{x:.2f}' for x in four['first_latency'])}s", flush=True)
            single_run(client)
    finally:
        stack.stop()
    ceiling_run("ceiling2")

    ceiling = sum(ceilings) / len(ceilings)
    single_fps = sum(r["fps"] for r in singles) / len(singles)
    latencies = [r["first_latency"][0] for r in singles]
    r1, r2, lat = single_fps / ceiling, four["fps"] / single_fps, max(latencies)

    def spread(values) -> str:
        return f"{min(values):.2f}-{max(values):.2f}"
    print()
    print("| measure | value | target | met |")
    print("|---|---|---|---|")
    print(f"| stack e2e / in-process ceiling (1 upload) | {single_fps:.2f} / {ceiling:.2f} frames/s = **{r1:.2f}** "
          f"(stack {spread([r['fps'] for r in singles])}, ceiling {spread(ceilings)}) | >= 0.85 | {'yes' if r1 >= 0.85 else 'no'} |")
    print(f"| 4 concurrent uploads / 1 upload (aggregate frames/s) | {four['fps']:.2f} / {single_fps:.2f} = **{r2:.2f}** "
          f"| >= 1.2 | {'yes' if r2 >= 1.2 else 'no'} |")
    print(f"| end of upload -> first annotated frame (1 upload) | **{lat:.2f} s** (runs {', '.join(f'{x:.2f}' for x in latencies)};"
          f" 4 uploads: {', '.join(f'{x:.2f}' for x in four['first_latency'])} s) | < 2 s | {'yes' if lat < 2 else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
