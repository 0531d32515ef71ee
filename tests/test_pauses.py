"""A process that was paused says so in its log (posemesh.mesh.pauses), and the live lag tests allow a logged pause
of a mesh process as long as it was (tests/mesh.py `lags_over_bound`). The pause is real: a process stopped with
SIGSTOP and continued."""

from __future__ import annotations

import datetime
import re
import signal
import subprocess
import sys
import time

import pytest

from tests import helpers
from tests.mesh import Mesh

WATCHED = ("import logging, time\n"
           "logging.basicConfig(level=logging.INFO, format='%(asctime)s test %(levelname)s %(message)s')\n"
           "from posemesh.mesh import pauses\n"
           "pauses.start()\n"
           "print('ready', flush=True)\n"
           "time.sleep(60)\n")


def test_a_process_stopped_for_a_while_logs_the_pause_when_it_runs_again():
    proc = subprocess.Popen([sys.executable, "-c", WATCHED], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.5)
        proc.send_signal(signal.SIGSTOP)
        time.sleep(3.0)
        proc.send_signal(signal.SIGCONT)
        time.sleep(1.5)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=10)
    paused = [float(s) for s in re.findall(r" WARNING paused for ([0-9.]+) s: nothing of this process ran", err)]
    # Stopped 3 s, a part of its 1 s sleep still to go: late by 2-3 s (more on a loaded machine, never less).
    assert any(1.9 < p < 4.5 for p in paused), err


def stamp(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S,%f")[:23]


def test_a_logged_pause_of_a_mesh_process_explains_as_much_lag(tmp_path):
    mesh = Mesh.__new__(Mesh)  # its logs only: no process is started
    mesh.logs = tmp_path
    started = time.time() - 100
    (tmp_path / "gateway.log").write_text(
        f"{stamp(started + 10)} gateway WARNING paused for 3.00 s: nothing of this process ran (...)\n"
        f"{stamp(started + 20)} gateway INFO something else\n")
    readings = [(9.0, 4.9), (11.0, 5.6), (11.5, 5.0), (12.4, 4.0), (12.8, 4.0), (13.0, 2.9), (13.5, 2.4), (30.0, 2.6)]
    # The pause ran 7-10 s. Until the bound (2 s) after it, 2 + 0.5 + 3 s are allowed (9 and 11.5 s), not more (11 s).
    # Later, a frame in flight during it (it arrived by 10 s, its lag before it was read) is allowed as long as it was
    # in flight then: 12.4 s (arrived at 8.4 s: 1.6 s of the pause, 4.1 s allowed) is under, 12.8 s (8.8 s: 1.2 s,
    # 3.7 s allowed) over. A frame that arrived after it (13 s: at 10.1 s), and any away from it (30 s), is allowed the
    # bound + slack (13.5 s is under).
    assert mesh.lags_over_bound(readings, started, 2.0) == [(11.0, 5.6), (12.8, 4.0), (13.0, 2.9), (30.0, 2.6)]


def test_a_lag_read_again_from_an_unchanged_status_counts_when_it_was_first_seen(tmp_path):
    """A watch snapshot carries the live reader's last status until the reader publishes again: a lag read again
    later, with the same frames received, was measured when it was first seen (CI run 121), and a new measurement
    (more frames received) counts at its own time."""
    mesh = Mesh.__new__(Mesh)
    mesh.logs = tmp_path
    started = time.time() - 100
    (tmp_path / "gateway.log").write_text(
        f"{stamp(started + 10)} gateway WARNING paused for 1.00 s: nothing of this process ran (...)\n")
    # The pause ran 9-10 s: the 3.4 s lag first seen at 11 s (its frame arrived by 7.6 s) is allowed at 14 s too,
    # where counted at its own time (outside the pause's window, its frame arriving after the pause) it would be over;
    # 2.9 s with more frames received, at 14 s, is a new measurement of a frame that arrived after the pause, over.
    readings = [(11.0, 3.4, 95), (12.5, 3.4, 95), (14.0, 3.4, 95), (14.0, 2.9, 96), (15.0, 0.3, 111)]
    assert mesh.lags_over_bound(readings, started, 2.0) == [(14.0, 2.9, 96)]


def test_a_wait_does_not_count_a_pause_of_the_tests_own_process(monkeypatch):
    """tests/helpers.py wait_for: time the test's process stood still (a sleep that overran by more than
    HOST_PAUSE_S) is not counted against the timeout; ordinary waiting is. On a clock of the test's own: a pause of
    the whole host cannot be made here."""
    now = [0.0]
    pauses = {3: 30.0}  # the 3rd sleep overruns by 30 s

    def sleep(seconds: float) -> None:
        sleep.calls += 1
        now[0] += seconds + pauses.get(sleep.calls, 0.0)
    sleep.calls = 0
    monkeypatch.setattr(helpers, "_clock", lambda: now[0])
    monkeypatch.setattr(helpers, "_sleep", sleep)
    # True 35 s after the start: within a 10 s timeout only because 30 s of it were a pause.
    assert helpers.wait_for(lambda: now[0] >= 35.0, timeout=10.0, interval=1.0) is True
    now[0], sleep.calls = 0.0, 0
    with pytest.raises(AssertionError, match=r"timed out after 10.0s waiting for x \(30.0 s of pauses"):
        helpers.wait_for(lambda: now[0] >= 45.0, timeout=10.0, interval=1.0, what="x")
    now[0], sleep.calls, pauses = 0.0, 0, {}
    with pytest.raises(AssertionError, match=r"timed out after 10.0s waiting for x$"):
        helpers.wait_for(lambda: now[0] >= 35.0, timeout=10.0, interval=1.0, what="x")
