"""bench/profile.py: each thread's CPU is the kernel's count, spread over that thread's py-spy samples. (What that
mends, a waiting thread sampled as running on a loaded machine, is not staged on a real process here: it needs
threads woken while every core is busy; bench/profile.py's docstring has the measurement. The second test gives
the breakdown such samples.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.profile import Profiler, native_activity, py_spy, thread_cpu


def _can_attach() -> bool:
    """py-spy reads another process's memory: root, or a kernel that lets a process trace its children's peers."""
    try:
        scope = Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip()
    except OSError:
        scope = "0"
    return py_spy() is not None and (os.geteuid() == 0 or scope == "0")


# The busy function lives in a file whose path names an activity (bench/profile.py ACTIVITIES: "draw").
BUSY = "def burn(seconds):\n    import time\n    end = time.process_time() + seconds\n    n = 0\n" \
       "    while time.process_time() < end:\n        n += 1\n    return n\n"
# Started without site-packages (-S), so that `stages` is this file and not the project's package; py-spy names a
# frame's file relative to the sys.path entry it came from, as it does the stack's. It burns 0.3 s before it is
# ready: CPU used before the profile began must not be counted (each thread's first reading is its baseline).
CHILD = ("import socket, sys, threading\n"
         "sys.path.insert(0, sys.argv[1])\n"
         "from stages.drawing import burn\n"
         "a, b = socket.socketpair()\n"
         "threading.Thread(target=lambda: a.recv(1), name='waiter', daemon=True).start()\n"
         "burn(0.3)\n"
         "print('ready', flush=True)\n"
         "sys.stdin.readline()\n"
         "burn(1.5)\n"
         "print('done', flush=True)\n"
         "sys.stdin.readline()\n")


@pytest.mark.skipif(not _can_attach(), reason="py-spy is not installed or may not read other processes")
def test_a_real_processs_cpu_is_its_threads_kernel_counts_spread_over_their_samples(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "drawing.py").write_text(BUSY)
    child = subprocess.Popen([sys.executable, "-S", "-c", CHILD, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        before = sum(cpu for _, _, cpu in thread_cpu(child.pid).values())
        profiler = Profiler({"child": child.pid}, rate=100)
        time.sleep(0.5)  # py-spy attached
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        time.sleep(0.3)
        after = sum(cpu for _, _, cpu in thread_cpu(child.pid).values())
        profiler.stop()
    finally:
        child.kill()
        child.wait()
    spent = profiler.breakdown()["child"]
    # The burn's 1.5 s of CPU is drawing's, whatever else the process did; the waiting thread used next to nothing.
    assert 1.3 < spent.get("draw", 0.0) < 1.75, spent
    assert sum(spent.values()) - spent["draw"] < 0.2, spent
    assert abs(sum(spent.values()) - (after - before)) < 0.1, (spent, after - before)


def test_each_threads_own_cpu_goes_to_its_own_samples_and_the_rest_by_name(tmp_path):
    """A busy thread with few samples and a waiting one with many (py-spy's runnable waits): each gets its own CPU.
    Threads without samples go by the kernel's name for them, or to other Python when py-spy lists them. What the
    process used beyond its threads' readings goes the way the threads that ended went (their CPU after their last
    reading), or else to the samples of threads never read (threads that came and went between two readings)."""
    profiler = Profiler.__new__(Profiler)
    profiler.dir, profiler.unnamed = tmp_path, {"annotate-0": "encode", "annotate-1": "encode"}
    profiler.pids = {"annotate-0": 10, "annotate-1": 30, "idle": 20}
    profiler.readings = 2
    profiler.threads = {("annotate-0", 10, 1): ["python", 0.0, 1.0, 2],     # the main thread, busy drawing
                        ("annotate-0", 11, 1): ["python", 0.0, 0.01, 2],    # a follower, waiting in a poll
                        ("annotate-0", 12, 1): ["rdk:main", 0.0, 0.2, 2],   # librdkafka's
                        ("annotate-0", 13, 1): ["python", 0.0, 0.05, 2],    # a Python thread never sampled
                        ("annotate-0", 14, 1): ["python", 0.0, 0.3, 2],     # x264's
                        ("annotate-1", 30, 1): ["python", 0.0, 1.0, 2],
                        ("annotate-1", 31, 5): ["python", 0.0, 0.3, 1],     # x264's, ended after the first reading
                        ("idle", 20, 1): ["python", 0.0, 0.1, 2]}
    profiler.python = {"annotate-0": {10, 11, 13}, "annotate-1": {30}, "idle": {20}}
    profiler.process_cpu = {"annotate-0": 1.96, "annotate-1": 1.5, "idle": 0.1}  # 0.4 and 0.2 s more than read
    draws = "thread ({});process (stages/annotate.py:80);draw (stages/drawing.py:30) 10\n"
    (tmp_path / "annotate-0.txt").write_text(
        draws.format(10) + "thread (11);run (stages/control.py:110);poll (stages/control.py:144) 90\n"
        "thread (15);picture (stages/annotate.py:107);decode (mesh/jpeg.py:40) 5\n")  # a thread that came and went
    (tmp_path / "annotate-1.txt").write_text(draws.format(30) + "thread (35);decode (mesh/jpeg.py:40) 5\n")
    spent = {name: {k: round(v, 3) for k, v in did.items()} for name, did in profiler.breakdown().items()}
    # The follower's 90 samples in poll() are Kafka's, with its 0.01 s: spread by samples alone, drawing would have
    # had 10 of 105 samples of the process's 1.96 s (0.19 s) and the poll 1.68 s.
    assert spent["annotate-0"] == {"draw": 1.0, "Kafka": 0.21, "other Python": 0.05, "encode": 0.3, "JPEG": 0.4}
    assert spent["annotate-1"] == {"draw": 1.0, "encode": 0.5}
    assert "idle" not in spent  # no sample of it: nothing to say what it did


def test_threads_py_spy_does_not_see_are_named_by_the_kernels_name_for_them():
    assert native_activity("rdk:broker1") == native_activity("rdk:main") == "Kafka"
    assert native_activity("grpc_global_tim") == native_activity("event_engine") == "gRPC"
    assert native_activity("av:h264:df0") == "decode"  # FFmpeg's
    assert native_activity("python") == "unnamed native threads"  # x264's, say: named as the process is
    assert native_activity("python", "encode") == "encode"
    assert native_activity("libuv-worker") == "other native threads"
