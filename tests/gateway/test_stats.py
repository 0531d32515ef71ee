"""GetStats (gateway/stats.py): the arithmetic of MeshActivity on its own, then the RPC and `posemesh stats`
on a real gateway, broker, Triton and one worker of each stage."""

from __future__ import annotations

import subprocess
import sys

import pytest

from posemesh.gateway.stats import STEPS, MeshActivity
from posemesh.v1 import task_service_pb2 as tpb
from tests import clips
from tests.conftest import USERS, auth
from tests.helpers import upload, wait_state

DONE = {tpb.TASK_STATE_COMPLETED, tpb.TASK_STATE_FAILED, tpb.TASK_STATE_CANCELLED}


def test_rates_count_the_last_window_and_alive_means_a_recent_heartbeat():
    now = 1_000_000.0
    activity = MeshActivity(window_s=60, alive_s=5, clock=lambda: now)
    activity.finished("pose", 30, now - 90)  # older than the window: not counted
    activity.finished("pose", 60, now - 30)
    activity.finished("pose", 60, now - 1)
    activity.heartbeat("pose", "pose-a", now - 1)
    activity.heartbeat("pose", "pose-b", now - 20)  # gone quiet
    activity.heartbeat("pose", "pose-a", now - 3)  # an older heartbeat read late changes nothing
    snapshot = activity.snapshot(now)
    assert list(snapshot) == STEPS
    assert snapshot["pose"] == (1, 2.0)
    assert snapshot["detect"] == (0, 0.0)


def test_events_read_again_after_a_restart_count_no_work():
    """A restarted gateway reads old events again: their send times are long past, so no rate moves."""
    activity = MeshActivity(window_s=60, clock=lambda: 5_000.0)
    activity.finished("track", 500, 100.0)
    assert not activity.frames["track"] and activity.snapshot()["track"] == (0, 0.0)


@pytest.mark.slow
def test_stats_show_own_tasks_every_stage_working_and_an_admin_sees_everyone(shared_pipeline, tmp_path):
    gw, _workers = shared_pipeline
    for user in ("alice", "bob"):
        task = upload(gw.stub, clips.synth(tmp_path / f"{user}.mp4", 20), auth(user))
        assert wait_state(gw.stub, task.task_id, auth(user), DONE, timeout=180).state == tpb.TASK_STATE_COMPLETED
    stats = gw.stub.GetStats(tpb.GetStatsRequest(), metadata=auth("alice"), timeout=10)
    assert [(t.user, t.completed) for t in stats.tasks] == [("alice", 1)]  # bob's are not alice's business
    stages = {s.stage: s for s in stats.stages}
    assert list(stages) == STEPS
    for step, s in stages.items():
        assert s.workers_alive >= 1, step
        # 2 x 20 frames, all within the last minute unless the machine was very slow
        assert 0 < s.frames_per_second <= 40 / stats.window_s + 1e-3, step
        assert s.frames_waiting == 0, step
    gw.settings.admin_users = "bob"
    everyone = gw.stub.GetStats(tpb.GetStatsRequest(), metadata=auth("bob"), timeout=10)
    assert [(t.user, t.completed) for t in everyone.tasks] == [("alice", 1), ("bob", 1)]
    cli = subprocess.run([sys.executable, "-m", "posemesh.cli", "--address", gw.address, "--api-key",
                          USERS["alice"], "stats"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert "alice" in cli.stdout and "annotate" in cli.stdout and "bob" not in cli.stdout
