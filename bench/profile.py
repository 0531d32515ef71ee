"""Where each process of the stack spends its CPU, by activity, from a sampling profiler (py-spy) and the
kernel's per-thread CPU counts.

`Profiler(pids)` records every Python process of the stack (gateway, workers, Triton's Python-backend
stubs) while a run goes on, and reads each of their threads' CPU time from /proc every `THREAD_READ_S`.
`breakdown()` sorts each thread's samples by the innermost frame that names a known activity and spreads
that thread's own measured CPU over them: a thread's samples say what it did, the kernel says how much.
A Python thread never sampled running is "other Python"; threads py-spy does not see (librdkafka's, gRPC's,
codecs') are named by the kernel's name for them; what threads that ended between two readings used (the
process's own count minus its threads') is spread over the samples of threads never read.

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

from bench.measure import process_cpu

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


def thread_cpu(pid: int) -> dict[int, tuple[str, int, float]]:
    """tid -> (the kernel's name for the thread, when it started (clock ticks after boot), CPU seconds it has used)."""
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
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on: utime is field 14, stime 15, start 22
        out[int(task.name)] = (stat[stat.index("(") + 1:stat.rindex(")")], int(fields[19]),
                               (int(fields[11]) + int(fields[12])) / ticks)
    return out


def python_threads(binary: str, pid: int) -> set[int]:
    """The tids of the process's Python threads now, idle ones included (py-spy dump)."""
    try:
        dump = subprocess.run([binary, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, text=True,
                              timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {int(found) for found in re.findall(r"^Thread (\d+) ", dump, re.MULTILINE)}


class Profiler:
    def __init__(self, pids: dict[str, int], rate: int = 50, unnamed: dict[str, str] | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="posemesh-profile-"))
        self.pids, self.unnamed = pids, unnamed or {}
        self.procs: dict[str, subprocess.Popen] = {}
        # (name, tid, start) -> [kernel's thread name, CPU seconds at its first reading (0 for a thread begun since
        # the profile began), at its latest one, the number of that reading]. A tid used again is another entry.
        self.threads: dict[tuple[str, int, int], list] = {}
        self.readings = 0
        self.python: dict[str, set[int]] = {}  # Python threads' tids, by process (at stop())
        self.lock = threading.Lock()
        self.reading = threading.Event()
        self.process_cpu = {name: process_cpu(pid) for name, pid in pids.items()}
        self._read_threads(first=True)
        self.binary = py_spy()
        if self.binary is not None:
            for name, pid in pids.items():
                out = self.dir / f"{name}.txt"
                self.procs[name] = subprocess.Popen(
                    [self.binary, "record", "--pid", str(pid), "--rate", str(rate), "--format", "raw", "--threads",
                     "--nonblocking", "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.reader = threading.Thread(target=self._keep_reading, daemon=True)
        self.reader.start()

    def _read_threads(self, first: bool = False) -> None:
        self.readings += 1
        for name, pid in self.pids.items():
            for tid, (comm, start, cpu) in thread_cpu(pid).items():
                with self.lock:
                    seen = self.threads.setdefault((name, tid, start), [comm, cpu if first else 0.0, cpu, 0])
                    seen[0], seen[2], seen[3] = comm, cpu, self.readings  # a library may name its thread later

    def _keep_reading(self) -> None:
        while not self.reading.wait(THREAD_READ_S):
            self._read_threads()

    def stop(self) -> None:
        self.reading.set()
        self.reader.join()
        self._read_threads()
        self.process_cpu = {name: process_cpu(pid) - self.process_cpu[name] for name, pid in self.pids.items()}
        if self.binary is not None:
            self.python = {name: python_threads(self.binary, pid) for name, pid in self.pids.items()}
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
        """process -> activity -> CPU seconds over the run (after stop()); a process py-spy took no sample of is left
        out (py-spy missing, or not allowed to read the process: it needs ptrace)."""
        out: dict[str, dict[str, float]] = {}
        for name, pid in self.pids.items():
            samples = self.samples(name)
            if not samples:
                continue
            spent: Counter = Counter()
            main = next((v[0] for (n, tid, _), v in self.threads.items() if n == name and tid == pid), "python")
            read: set[int] = set()
            ended: Counter = Counter()  # what threads that ended before the last reading did
            for (process, tid, _start), (comm, first, last, reading) in self.threads.items():
                if process != name:
                    continue
                read.add(tid)
                cpu = last - first
                shares = samples.get(tid)
                if cpu <= 0:
                    continue
                did: Counter = Counter()
                if shares:
                    spread(did, shares, cpu)
                elif tid in self.python.get(name, ()):  # a Python thread never sampled running
                    did["other Python"] += cpu
                else:
                    did[native_activity(comm, self.unnamed.get(name, "unnamed native threads"), main)] += cpu
                spent.update(did)
                if reading < self.readings:
                    ended.update(did)
            # What ended threads used after their last reading, and threads that came and went between two: the
            # process's own count has it. Spread like the ended threads' CPU, or over the samples of threads never
            # read; else said so.
            rest = self.process_cpu.get(name, 0.0) - sum(spent.values())
            unread: Counter = Counter()
            for tid, shares in samples.items():
                if tid not in read:
                    unread.update(shares)
            if rest > 0 and ended:
                spread(spent, ended, rest)
            elif rest > 0 and unread:
                spread(spent, unread, rest)
            elif rest > 0:
                spent["threads that ended, unread"] += rest
            out[name] = dict(spent)
        return out


def spread(spent: Counter, shares: Counter, cpu: float) -> None:
    """Adds `cpu` seconds to `spent`, by the activities' shares of samples."""
    total = sum(shares.values())
    for what, count in shares.items():
        spent[what] += cpu * count / total  # shares: sample counts, or seconds
