"""Memory of every process on the largest input the gateway accepts (3840x2160, the default
POSEMESH_MAX_FRAME_PIXELS), next to a 1080p upload of the same scene, on one stack.

    .venv/bin/python bench/memory.py [--frames 90] [--ingest N]

The 4K clip is towncentre scaled up (so detect and pose have real people to work on), encoded ahead.
Each process's resident memory (with its children: Triton's Python-backend stubs) is sampled every 0.1 s;
printed per process: before the uploads, the peak during the 1080p task and the peak during the 4K task.
Bounded means the workers' and the gateway's peaks do not grow with the video's length (frames are
processed in a window of POSEMESH_MAX_FRAMES_AHEAD; annotate writes segments), only with the frame size:
the 4K clip runs at two lengths. The memory-only local broker is the exception by design: it holds a
task's records until the task's topics are deleted (Apache Kafka keeps them on disk). With `--ingest N`,
N ingest replicas decode the uploads (POSEMESH_INGEST=stage) and have a row of their own.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import av

from bench.measure import tree_rss
from posemesh.client import Client
from posemesh.devstack.stack import Stack, StackConfig
from posemesh.mesh.pipeline import STAGE_NAMES
from posemesh.mesh.settings import default_media_dir
from posemesh.v1 import task_service_pb2 as tpb


def scaled_clip(src: Path, dst: Path, width: int, height: int, frames: int) -> Path:
    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        for n, frame in enumerate(inp.decode(video=0)):
            if n >= frames:
                break
            scaled = frame.reformat(width=width, height=height, format="yuv420p")
            scaled.pts, scaled.time_base = n, Fraction(1, 25)
            for packet in stream.encode(scaled):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return dst


class Sampler:
    def __init__(self, stack: Stack):
        self.stack, self.peaks, self.stop = stack, {}, threading.Event()

    def sample(self) -> dict[str, float]:
        return {s.name: tree_rss(s.proc.pid) for s in self.stack.services}

    def __enter__(self) -> Sampler:
        self.peaks = self.sample()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(0.1):
            for name, mb in self.sample().items():
                self.peaks[name] = max(self.peaks.get(name, 0.0), mb)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--ingest", type=int, default=0, help="ingest replicas decoding the uploads (0: the gateway)")
    args = parser.parse_args()
    src = default_media_dir() / "towncentre_1080p_302f.mp4"
    with tempfile.TemporaryDirectory(prefix="posemesh-bench-memory-") as tmp:
        work = Path(tmp)
        clips = {f"1080p, {args.frames} frames": scaled_clip(src, work / "hd.mp4", 1920, 1080, args.frames),
                 f"4K, {args.frames} frames": scaled_clip(src, work / "uhd.mp4", 3840, 2160, args.frames),
                 f"4K, {3 * args.frames} frames": scaled_clip(src, work / "uhd3.mp4", 3840, 2160, 3 * args.frames)}
        workers = {s: 1 for s in STAGE_NAMES} | ({"ingest": args.ingest} if args.ingest else {})
        stack = Stack(StackConfig(run_dir=work / "stack", rtsp_port=-1, workers=workers)).start()
        try:
            before = Sampler(stack).sample()
            peaks = {}
            client = Client(stack.gateway_address, "posemesh-dev-key")
            for label, clip in clips.items():
                with Sampler(stack) as sampler:
                    t = time.monotonic()
                    task = client.submit(clip)
                    final = client.wait(task.task_id, timeout_s=900)
                    assert final.state == tpb.TASK_STATE_COMPLETED, final.error_message
                peaks[label] = sampler.peaks
                print(f"{label}: {time.monotonic() - t:.1f}s", flush=True)
        finally:
            stack.stop()
    print("\nresident memory (MB, process and its children), peak during each upload, one stack")
    print("| process | idle | " + " | ".join(f"peak, {label}" for label in peaks) + " |")
    print("|---|---|" + "---|" * len(peaks))
    for name in before:
        print(f"| {name} | {before[name]:.0f} | " + " | ".join(f"{p[name]:.0f}" for p in peaks.values()) + " |")
    print(f"| **all** | {sum(before.values()):.0f} | "
          + " | ".join(f"{sum(p.values()):.0f}" for p in peaks.values()) + " |")


if __name__ == "__main__":
    main()
