"""bench/profile.py on a real process: each thread's CPU is the kernel's count, spread over that thread's py-spy
samples. (What that mends, a waiting thread sampled as running on a loaded machine, is not staged here: it needs
threads woken while every core is busy; bench/profile.py's docstring has the measurement.)"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bench.profile import Profiler, native_activity, py_spy, thread_cpu

# The busy function lives in a file whose path names an activity (bench/profile.py ACTIVITIES: "draw").
BUSY = "def burn(seconds):\n    import time\n    end = time.process_time() + seconds\n    n = 0\n" \
       "    while time.process_time() < end:\n        n += 1\n    return n\n"
# Started without site-packages (-S), so that `stages` is this file and not the project's package; py-spy names a
# frame's file relative to the sys.path entry it came from, as it does the stack's.
CHILD = ("import socket, sys, threading\n"
         "sys.path.insert(0, sys.argv[1])\n"
         "from stages.drawing import burn\n"
         "a, b = socket.socketpair()\n"
         "threading.Thread(target=lambda: a.recv(1), name='waiter', daemon=True).start()\n"
         "print('ready', flush=True)\n"
         "sys.stdin.readline()\n"
         "burn(1.5)\n"
         "print('done', flush=True)\n"
         "sys.stdin.readline()\n")


@pytest.mark.skipif(py_spy() is None, reason="py-spy is not installed")
def test_a_threads_cpu_is_the_kernels_count_spread_over_its_samples(tmp_path):
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "drawing.py").write_text(BUSY)
    child = subprocess.Popen([sys.executable, "-S", "-c", CHILD, str(tmp_path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        before = sum(cpu for _, cpu in thread_cpu(child.pid).values())
        profiler = Profiler({"child": child.pid}, rate=100)
        time.sleep(0.5)  # py-spy attached
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
        time.sleep(0.3)
        after = sum(cpu for _, cpu in thread_cpu(child.pid).values())
        profiler.stop()
    finally:
        child.kill()
        child.wait()
    spent = profiler.breakdown()["child"]
    # The burn's 1.5 s of CPU is drawing's, whatever else the process did; the waiting thread used next to nothing.
    assert 1.3 < spent.get("draw", 0.0) < 2.0, spent
    assert sum(spent.values()) - spent["draw"] < 0.2, spent
    assert abs(sum(spent.values()) - (after - before)) < 0.1, (spent, after - before)


def test_threads_py_spy_does_not_see_are_named_by_the_kernels_name_for_them():
    assert native_activity("rdk:broker1") == native_activity("rdk:main") == "Kafka"
    assert native_activity("grpc_global_tim") == native_activity("event_engine") == "gRPC"
    assert native_activity("av:h264:df0") == "decode"  # FFmpeg's
    assert native_activity("python") == "unnamed native threads"  # x264's, say: named as the process is
    assert native_activity("python", "encode") == "encode"
    assert native_activity("libuv-worker") == "other native threads"
