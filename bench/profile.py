"""Where each process of the stack spends its CPU, by activity, from a sampling profiler (py-spy) and the
kernel's per-thread CPU counts.

`Profiler(pids)` records every Python process of the stack (gateway, workers, Triton's Python-backend
stubs) while a run goes on, and reads each of their threads' CPU time from /proc every `THREAD_READ_S`.
`breakdown()` sorts each thread's samples by the innermost frame that names a known activity and spreads
that thread's own measured CPU over them: a thread's samples say what it did, the kernel says how much.
Threads py-spy does not see (librdkafka's, gRPC's, codecs') are named by the kernel's thread name.

Why not the samples alone: py-spy (non-blocking, running threads only) takes a thread waiting in a native
call for a running one often enough to matter. On one upload, its samples put 1.3-1.6 ms a frame in each
worker's control-topic follower (in librdkafka's poll) and gRPC server thread (in its completion queue), where
/proc gave those threads 0.03 ms a frame (bench/README.md, loop.py, 2026-12-07). The broker and tritonserver
itself are not Python and are reported as a whole.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import Counter, defaultdict
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


# Threads py-spy does not sample, by the start of the name the kernel has for them (/proc/<pid>/task/<tid>/comm):
# FFmpeg names its decoding threads "av:<codec>:..."; a thread its library left unnamed has the process's name
# (`Profiler(unnamed=...)` says what those are, process by process: x264's in annotate).
NATIVE_THREADS = [("Kafka", ("rdk:",)), ("gRPC", ("grpc", "event_engine", "default-execut", "resolver")),
                  ("decode", ("av:",))]
THREAD_READ_S = 0.25  # a thread that ends (a task's frame thread) is counted up to its last reading


def native_activity(comm: str, unnamed: str = "unnamed native threads", process_name: str = "python") -> str:
    if comm == process_name:
        return unnamed
    return next((name for name, starts in NATIVE_THREADS if comm.startswith(starts)), "other native threads")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (the kernel's name for the thread, CPU seconds it has used)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            stat = (task / "stat").read_text()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(task.name)] = (stat[stat.index("(") + 1:stat.rindex(")")], (int(fields[11]) + int(fields[12])) / ticks)
    return out


class Profiler:
    def __init__(self, pids: dict[str, int], rate: int = 50, unnamed: dict[str, str] | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="posemesh-profile-"))
        self.pids, self.unnamed = pids, unnamed or {}
        self.procs: dict[str, subprocess.Popen] = {}
        # (name, tid) -> [kernel's thread name, CPU seconds at the first reading (0 for a thread begun since), at the
        # latest one]
        self.threads: dict[tuple[str, int], list] = {}
        self.reading = threading.Event()
        self._read_threads(first=True)
        binary = py_spy()
        if binary is not None:
            for name, pid in pids.items():
                out = self.dir / f"{name}.txt"
                self.procs[name] = subprocess.Popen(
                    [binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--threads",
                     "--nonblocking", "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.reader = threading.Thread(target=self._keep_reading, daemon=True)
        self.reader.start()

    def _read_threads(self, first: bool = False) -> None:
        for name, pid in self.pids.items():
            for tid, (comm, cpu) in thread_cpu(pid).items():
                seen = self.threads.setdefault((name, tid), [comm, cpu if first else 0.0, cpu])
                seen[2] = cpu

    def _keep_reading(self) -> None:
        while not self.reading.wait(THREAD_READ_S):
            self._read_threads()

    def stop(self) -> None:
        self.reading.set()
        self.reader.join()
        self._read_threads()
        for proc in self.procs.values():
            proc.send_signal(signal.SIGINT)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def samples(self, name: str) -> dict[int, Counter]:
        """tid -> activity -> py-spy samples, of process `name`."""
        path = self.dir / f"{name}.txt"
        out: dict[int, Counter] = defaultdict(Counter)
        if not path.exists():
            return out
        for line in path.read_text(errors="replace").splitlines():
            stack, _, n = line.rpartition(" ")
            found = re.match(r"thread \((\d+)\)", stack)
            if found and n.isdigit():
                out[int(found[1])][activity(stack)] += int(n)
        return out

    def breakdown(self) -> dict[str, dict[str, float]]:
        """process -> activity -> CPU seconds over the run (after stop())."""
        out: dict[str, dict[str, float]] = {}
        for name in self.pids:
            samples = self.samples(name)
            spent: Counter = Counter()
            main = self.threads.get((name, self.pids[name]), ["python"])[0]  # the process's own name
            for (process, tid), (comm, first, last) in self.threads.items():
                cpu = last - first
                if process != name or cpu <= 0:
                    continue
                shares = samples.get(tid)
                if shares:
                    total = sum(shares.values())
                    for what, count in shares.items():
                        spent[what] += cpu * count / total
                else:
                    spent[native_activity(comm, self.unnamed.get(name, "unnamed native threads"), main)] += cpu
            if spent:
                out[name] = dict(spent)
        return out
