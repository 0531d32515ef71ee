"""End-to-end benchmark: the stack against the model-compute limit, measured side by side in one run.

    .venv/bin/python bench/end_to_end.py [--clip PATH] [--pose-models blazepose_lite,blazepose_full]

For each pose model, in this order: the model-compute limit (bench/limit.py), the stack with 1 upload,
4 concurrent uploads, 1 upload again, the limit again. Ratios compare means of runs taken around each
other (this machine is shared and noisy: absolute times drift by 15% or more). Printed per model:

- stack frames/s over the limit, for 1 upload and for 4 (targets >= 0.85), and 4 uploads' aggregate over
  1 upload's (target >= 1.0);
- per frame: bytes the task's topics hold over the frame's JPEG bytes (target <= 1.3), JPEG decodes
  (and encodes), and CPU milliseconds by process (where the time goes);
- fairness with 4 uploads: each task's first annotated frame after its upload (target < 3 s) and the
  spread of equal videos' completion times (slowest / fastest, target <= 1.25);
- tracking: track ids per clip and detections without a track id (target 0).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import limit as model_limit
from bench.measure import counters, idle_between_bursts, run_uploads, topic_bytes, tree_cpu
from posemesh.client import Client
from posemesh.devstack.stack import Stack, StackConfig
from posemesh.mesh import kafka
from posemesh.mesh.models import prepare
from posemesh.mesh.settings import REPO_ROOT, default_media_dir


def cpu_by_service(stack: Stack) -> dict[str, float]:
    out: dict[str, float] = {}
    for service in stack.services:
        kind = service.name.split("-")[0]
        out[kind] = out.get(kind, 0.0) + tree_cpu(service.proc.pid)
    return out


def jpeg_counts(stack: Stack) -> dict[str, float]:
    totals: dict[str, float] = {}
    for _name, port in stack.metrics_ports.items():
        url = f"http://127.0.0.1:{port}/metrics"
        for key, value in counters(url, "posemesh_jpeg_decodes_total").items():
            scale = "full" if "full" in key else "reduced"
            totals[f"decode_{scale}"] = totals.get(f"decode_{scale}", 0.0) + value
        for _key, value in counters(url, "posemesh_jpeg_encodes_total").items():
            totals["encode"] = totals.get("encode", 0.0) + value
    return totals


def measured_run(stack: Stack, client: Client, clip: Path, n: int, pose_model: str) -> dict:
    cpu0, jpeg0 = cpu_by_service(stack), jpeg_counts(stack)
    uploads, wall = run_uploads(client, clip, n, pose_model)
    cpu1, jpeg1 = cpu_by_service(stack), jpeg_counts(stack)
    frames = sum(u.frames for u in uploads)
    task = uploads[0].task
    stored = {prefix: topic_bytes(stack.bootstrap, kafka.task_topic(prefix, task.task_id)) for prefix in
              kafka.TASK_TOPIC_PREFIXES}
    records = [json.loads(line) for line in _keypoints(client, task.task_id)]
    persons = [p for r in records for p in r["persons"]]
    return {
        "n": n, "frames": frames, "wall": wall, "fps": frames / wall,
        "first": [u.first_latency for u in uploads], "durations": [u.duration for u in uploads],
        "cpu_ms": {k: (cpu1.get(k, 0) - cpu0.get(k, 0)) / frames * 1000 for k in cpu1},
        "jpeg": {k: (jpeg1.get(k, 0) - jpeg0.get(k, 0)) / frames for k in jpeg1},
        "stored": stored, "task_frames": uploads[0].frames,
        "track_ids": len({p["track_id"] for p in persons if p["track_id"]}),
        "untracked": sum(1 for p in persons if not p["track_id"]), "detections": len(persons),
    }


def _keypoints(client: Client, task_id: str) -> list[str]:
    import io

    buf = io.BytesIO()
    client.download(task_id, "keypoints", buf)
    return buf.getvalue().decode().splitlines()


def bench_model(clip: Path, onnx_dir: Path, pose_model: str, work: Path) -> dict:
    load = model_limit.prepare(clip, onnx_dir, pose_model, work=work / f"limit-{pose_model}")
    print(f"[{pose_model}] {load.frames} frames, {load.persons_per_frame:.1f} persons/frame; best batches: yolox "
          f"{load.yolox_batch} ({load.yolox_ms:.1f} ms/frame), pose {load.pose_batch} ({load.pose_ms:.2f} ms/crop)",
          flush=True)
    limits = [model_limit.frames_per_second(load, onnx_dir, pose_model)]
    print(f"[{pose_model}] model-compute limit: {limits[-1]:.2f} frames/s", flush=True)
    os.environ["POSEMESH_TOPIC_DELETE_DELAY_S"] = "3600"  # keep the topics to count their bytes
    stack = Stack(StackConfig(run_dir=work / f"stack-{pose_model}"))
    runs = []
    try:
        stack.start()
        with Client(stack.gateway_address) as client:
            warm = default_media_dir() / "mmpose_demo_960x540_5f.mp4"
            run_uploads(client, warm, 1, pose_model)  # first calls, group joins
            for n in (1, 4, 1):
                idle_between_bursts()
                run = measured_run(stack, client, clip, n, pose_model)
                runs.append(run)
                print(f"[{pose_model}] stack, {n} upload(s): {run['frames']} frames in {run['wall']:.1f} s = "
                      f"{run['fps']:.2f} frames/s; first annotated frame "
                      f"{', '.join(f'{x:.2f}' for x in run['first'])} s after upload", flush=True)
    finally:
        stack.stop()
    limits.append(model_limit.frames_per_second(load, onnx_dir, pose_model))
    print(f"[{pose_model}] model-compute limit: {limits[-1]:.2f} frames/s", flush=True)
    return {"model": pose_model, "limits": limits, "runs": runs, "load": load}


def report(result: dict) -> list[str]:
    limit = statistics.mean(result["limits"])
    singles = [r for r in result["runs"] if r["n"] == 1]
    four = next(r for r in result["runs"] if r["n"] == 4)
    single_fps = statistics.mean(r["fps"] for r in singles)
    one, r4, agg = single_fps / limit, four["fps"] / limit, four["fps"] / single_fps
    stored = singles[0]["stored"]
    frames = singles[0]["task_frames"]
    jpeg_bytes = stored[kafka.RAW_FRAMES][2]
    total_bytes = sum(v[1] for v in stored.values())
    ratio = total_bytes / jpeg_bytes if jpeg_bytes else float("nan")
    first4 = max(four["first"])
    spread = max(four["durations"]) / min(four["durations"])
    cpu = singles[0]["cpu_ms"]
    jpeg = singles[0]["jpeg"]
    m = result["model"]

    def yes(ok: bool) -> str:
        return "yes" if ok else "no"
    stack_runs = ", ".join(f"{r:.2f}" for r in (run["fps"] for run in singles))
    limit_runs = ", ".join(f"{x:.2f}" for x in result["limits"])
    rows = [
        f"| {m}: stack / model-compute limit, 1 upload | {single_fps:.2f} / {limit:.2f} frames/s = **{one:.2f}** "
        f"(stack {stack_runs}; limit {limit_runs}) | >= 0.85 | {yes(one >= 0.85)} |",
        f"| {m}: stack / limit, 4 concurrent uploads | {four['fps']:.2f} / {limit:.2f} = **{r4:.2f}** "
        f"| >= 0.85 | {yes(r4 >= 0.85)} |",
        f"| {m}: 4 uploads aggregate / 1 upload | {four['fps']:.2f} / {single_fps:.2f} = **{agg:.2f}** "
        f"| >= 1.0 | {yes(agg >= 1.0)} |",
        f"| {m}: broker bytes on the task's topics / JPEG bytes | {total_bytes / frames / 1e3:.1f} KB / "
        f"{jpeg_bytes / frames / 1e3:.1f} KB a frame = **{ratio:.2f}** "
        f"({', '.join(f'{k} {v[1] / frames / 1e3:.1f} KB' for k, v in stored.items())}) "
        f"| <= 1.3 | {yes(ratio <= 1.3)} |",
        f"| {m}: JPEG work per frame | decodes {jpeg.get('decode_full', 0):.2f} full "
        f"+ {jpeg.get('decode_reduced', 0):.2f} "
        f"at 1/4 scale, encodes {jpeg.get('encode', 0):.2f} | - | - |",
        f"| {m}: CPU ms per frame by process (1 upload) | "
        f"{', '.join(f'{k} {v:.1f}' for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]))}; total "
        f"{sum(cpu.values()):.1f} (models alone: "
        f"{result['load'].yolox_ms + result['load'].pose_ms * result['load'].persons_per_frame:.1f}) | - | - |",
        f"| {m}: first annotated frame after upload, 4 uploads | **{first4:.2f} s** worst "
        f"({', '.join(f'{x:.2f}' for x in four['first'])}) | < 3 s each | {yes(first4 < 3)} |",
        f"| {m}: equal videos' completion, slowest / fastest (4 uploads) | **{spread:.2f}** "
        f"({', '.join(f'{x:.1f}' for x in four['durations'])} s) | <= 1.25 | {yes(spread <= 1.25)} |",
        f"| {m}: tracking, 1 upload | {singles[0]['track_ids']} track ids, {singles[0]['untracked']} of "
        f"{singles[0]['detections']} detections untracked | untracked = 0 | {yes(singles[0]['untracked'] == 0)} |",
    ]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", type=Path, default=default_media_dir() / "towncentre_1080p_302f.mp4")
    parser.add_argument("--pose-models", default="blazepose_lite,blazepose_full")
    args = parser.parse_args()
    onnx_dir = REPO_ROOT / "run" / "onnx"
    prepare(onnx_dir)
    work = Path(tempfile.mkdtemp(prefix="posemesh-bench-"))
    print(f"clip {args.clip.name}; {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    results = [bench_model(args.clip, onnx_dir, m, work) for m in args.pose_models.split(",")]
    print()
    print("| measure | value | target | met |")
    print("|---|---|---|---|")
    for result in results:
        for row in report(result):
            print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
