"""Where each process of the stack spends its CPU, by activity, from a sampling profiler (py-spy).

`Profiler(pids)` records every Python process of the stack (gateway, workers, Triton's Python-backend
stubs) while a run goes on; `breakdown()` sorts each sample by the innermost frame that names a known
activity and returns, per process, the share of its samples per activity. Multiplied by the process's
measured CPU per frame, that gives CPU ms per frame per activity. Samples are taken of running threads
only (py-spy's default: idle waits are not counted). The broker and tritonserver itself are not Python
and are reported as a whole.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

# (activity, substrings of a frame "function (file:line)"), innermost match wins; the order breaks ties
# within one frame.
ACTIVITIES: list[tuple[str, tuple[str, ...]]] = [
    ("model", ("onnxruntime", "model.py")),
    ("Triton call", ("tritonclient", "stages/triton.py")),
    ("JPEG", ("mesh/jpeg.py", "imdecode", "imencode")),
    ("draw", ("stages/drawing.py",)),
    ("encode", ("stages/results.py", "live_out.py")),
    ("decode", ("mesh/media.py", "/av/")),
    ("protobuf", ("google/protobuf", "SerializeToString", "FromString", "ParseFromString")),
    ("Kafka", ("confluent_kafka", "stages/reading.py", "stages/pixels.py", "mesh/kafka.py", "mesh/frames.py",
               "consume (", "poll (", "produce (", "flush (")),
    ("pose crops", ("stages/pose.py",)),
    ("detect pre/post", ("stages/detect.py",)),
    ("tracking", ("stages/track.py", "trackers/", "supervision/")),
]


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def activity(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):  # innermost first
        for name, marks in ACTIVITIES:
            if any(m in frame for m in marks):
                return name
    return "other Python"


class Profiler:
    def __init__(self, pids: dict[str, int], rate: int = 50):
        self.dir = Path(tempfile.mkdtemp(prefix="posemesh-profile-"))
        self.procs: dict[str, subprocess.Popen] = {}
        binary = py_spy()
        if binary is None:
            return
        for name, pid in pids.items():
            out = self.dir / f"{name}.txt"
            self.procs[name] = subprocess.Popen(
                [binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--threads",
                 "--nonblocking", "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def breakdown(self) -> dict[str, dict[str, float]]:
        """process -> activity -> share of its samples."""
        out: dict[str, dict[str, float]] = {}
        for name in self.procs:
            path = self.dir / f"{name}.txt"
            if not path.exists():
                continue
            counts: Counter = Counter()
            for line in path.read_text(errors="replace").splitlines():
                stack, _, n = line.rpartition(" ")
                if stack and n.isdigit():
                    counts[activity(stack)] += int(n)
            total = sum(counts.values())
            if total:
                out[name] = {k: v / total for k, v in counts.items()}
        return out
