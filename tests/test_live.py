"""Live tasks against a real RTSP server (GStreamer's, serving clips as cameras and relaying published
streams), a real mesh of processes, and real clients: cameras become tasks, outages and ends are told
apart, lag stays bounded by counted drops, annotated frames reach watchers in order, the annotated video
can be played from the RTSP server, stopping keeps the results, and nothing leaks."""

from __future__ import annotations

import io
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import av
import cv2
import grpc
import numpy as np
import pytest

from posemesh.client import Client
from posemesh.devstack import rtsp
from posemesh.mesh import kafka
from posemesh.mesh.pipeline import STAGE_NAMES
from posemesh.stages import worker
from posemesh.v1 import task_service_pb2 as tpb
from tests import clips
from tests.conftest import USERS, media
from tests.helpers import (
    PublishingCamera,
    ended_task_ids,
    first_picture_s,
    reserved_task_ids,
    reserved_topics,
    rtsp_describe,
    topics,
    wait_for,
)
from tests.mesh import LagReadings, Mesh

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(rtsp.available()), reason=rtsp.available() or "")]

MAX_LAG_S = 2.0
OUTAGE_S = 4.0


@pytest.fixture(scope="module")
def cameras(tmp_path_factory):
    root = tmp_path_factory.mktemp("cameras")
    cams = {"long": clips.repeat(media("mmpose_demo_960x540_5f.mp4"), root / "long.mp4", 80),  # 80 s at 5 fps
            "crowd": clips.repeat(media("towncentre_1080p_302f.mp4"), root / "crowd.mp4", 6)}  # 60 s of 1080p30
    with rtsp.RtspServer(cams, log_path=root / "rtsp.log") as server:
        yield server


@pytest.fixture(scope="module")
def mesh(onnx_dir, tmp_path_factory, cameras):
    m = Mesh(tmp_path_factory.mktemp("livemesh"), onnx_dir, replicas=1, topic_delete_delay_s=1.0,
             live_sources="rtsp://127.0.0.1:*", live_max_lag_s=MAX_LAG_S, live_outage_s=OUTAGE_S,
             live_publish_url=cameras.url("publish/{task}"), live_stream_url=cameras.url("live/{task}"))
    yield m
    m.stop()


@pytest.fixture
def client(mesh):
    with Client(f"127.0.0.1:{mesh.gateway_port}", USERS["alice"]) as c:
        yield c


def stages_settled(mesh: Mesh, since: float, task_id: str) -> bool:
    """Whether every stage worker reads only `task_id`, the reserved ids and ended tasks (whose topics a worker keeps,
    held, while other tasks run: stages/worker.py), with no rebalance it began since `since` (time.time()) under way."""
    allowed = reserved_task_ids(mesh.settings.kafka_bootstrap) | {task_id}
    readers = [w for w in mesh.workers if w.stage in STAGE_NAMES]
    if any(not set(w.status().reading_tasks) <= allowed for w in readers):
        allowed |= ended_task_ids(mesh.settings.kafka_bootstrap)
        if any(not set(w.status().reading_tasks) <= allowed for w in readers):
            return False
    joins: dict[str, int] = {}  # by worker: subscriptions since `since` whose rebalance has not ended
    for line in mesh.log_lines(since, "task topics", "rebalanced in"):  # in time order
        name = line.split()[1]
        joins[name] = max(0, joins.get(name, 0) + (1 if "task topics" in line else -1))
    return not any(joins.values())


def results(client: Client, task_id: str) -> tuple[list[dict], bytes]:
    keypoints, video = io.BytesIO(), io.BytesIO()
    client.download(task_id, "keypoints", keypoints)
    client.download(task_id, "video", video)
    return [json.loads(line) for line in keypoints.getvalue().decode().splitlines()], video.getvalue()


def frame_count(video: bytes) -> int:
    with av.open(io.BytesIO(video)) as c:
        return sum(1 for _ in c.decode(video=0))


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_a_camera_becomes_a_live_task_that_completes_when_its_stream_ends(client, cameras, transport):
    """A camera publishing through the relay, as cameras publish to MediaMTX, stops: its stream is tried
    again for LIVE_OUTAGE_S (the relay answers, refusing the path), then the task completes, saying so."""
    source = cameras.url(f"live/mall-{transport}")
    camera = PublishingCamera(media("mmpose_demo_960x540_5f.mp4"), cameras.url(f"publish/mall-{transport}")).start()
    try:
        wait_for(lambda: rtsp_describe(source)[0] == 200, 20, 0.1, "the camera to publish")
        task = client.start_live(source, name="mall camera", transport=transport)
        assert task.HasField("live") and task.live.source == source
        assert (task.video.width, task.video.height) == (960, 540) and task.file_name == "mall camera"
        wait_for(lambda: client.get(task.task_id).live.frames_received >= 5, 60, 0.1, "frames from the camera")
    finally:
        camera.stop()  # the camera's stream ends
    stopped = time.monotonic()
    done = client.wait(task.task_id, timeout_s=120)
    assert done.state == tpb.TASK_STATE_COMPLETED and "ended" in done.error_message, done.error_message
    assert time.monotonic() - stopped >= OUTAGE_S  # tried again first: it might have been a drop-out
    records, video = results(client, task.task_id)
    assert [r["index"] for r in records] == list(range(len(records))) and len(records) >= 3
    assert all(len(p["keypoints"]) == 17 and p["track_id"] >= 1 for r in records for p in r["persons"])
    assert frame_count(video) == len(records)
    assert done.live.frames_received >= 5 and done.live.frames_dropped == done.live.frames_received - len(records)


def test_a_camera_faster_than_the_mesh_is_thinned_evenly_and_the_lag_stays_bounded(mesh, client, cameras):
    source = cameras.url("live/town")
    camera = PublishingCamera(media("towncentre_1080p_302f.mp4"), cameras.url("publish/town"), loops=1).start()
    wait_for(lambda: rtsp_describe(source)[0] == 200, 20, 0.1, "the camera to publish")
    started = time.time()
    task = client.start_live(source)
    lags, snapshot = LagReadings(started, camera), None
    for snapshot in client.watch(task.task_id):
        lags.see(snapshot)
    camera.stop()
    assert snapshot.state == tpb.TASK_STATE_COMPLETED, snapshot.error_message
    live = snapshot.live
    assert live.frames_dropped > 0, "a 1080p camera at 30 fps outruns two cores: frames must be dropped"
    # A rebalance of the stages (the workers letting go of an earlier test's ended tasks; the gateway making its
    # reserved task ids again, should none be left) stops the mesh for a second or more: the lag grows by that
    # long (CI run 84 saw 3.07 s among readings near 1 s, which needs at least 0.57 s of it). Over the bound by
    # more than that, it says when (seconds after the start, lag, frames received and packets sent by then) and
    # what the processes did meanwhile. An idle machine gives about 70 readings, a loaded CI machine once gave 7
    # (none for 3.5 s, then 5 s): at least 5.
    over = mesh.lags_over_bound(lags, started, MAX_LAG_S)
    assert len(lags) >= 5 and not over, mesh.lag_report(lags, over, started, camera, "reading", "rebalanced", "took",
                                                        "reserv", "WARNING", "ERROR")
    records, _video = results(client, task.task_id)
    assert [r["index"] for r in records] == list(range(len(records)))  # dense for the frames that went in
    assert len(records) == live.frames_received - live.frames_dropped
    times = [r["timestamp_s"] for r in records]
    gaps = np.diff(times)
    # Spread, not bursts. While the mesh takes the task on (consumer-group joins; seconds on a loaded
    # machine) nothing more goes in once the first window is in flight: a gap, but within the lag bound.
    # Once frames come out, admissions follow them evenly.
    # A camera that fell behind (the test's own thread got no CPU for a while) sent nothing meanwhile: a gap
    # no admission made, as long as the camera's stall.
    stalls = sorted(camera.stalls)
    assert gaps.max() < MAX_LAG_S + 0.5 + max(stalls, default=0.0), f"a gap of {gaps.max():.2f} s; stalls {stalls}"
    # Two pauses are allowed, and one for each stall of the camera: a rebalance, which stops every consumer group
    # for about a second (the workers letting go of an earlier test's ended tasks, or the gateway making its
    # reserved task ids again should none be left: gateway/reservations.py); and one hiccup of a loaded 2-core
    # machine (a CI run saw gaps of 1.02 and 1.53 s among 0.2 s ones). Bunching (frames kept in runs, then long
    # gaps) would show as many long gaps.
    steady = np.sort(gaps[np.asarray(times[1:]) > 2 * MAX_LAG_S])
    allowed = 2 + len(stalls)
    assert len(steady) > 8 + allowed and steady[-allowed - 1] < 1.0, (
        f"drops bunched together: gaps of {steady[-allowed - 2:]} s; the camera's stalls {stalls}")


def test_a_camera_that_goes_quiet_for_a_while_does_not_read_as_lag(mesh, client, cameras):
    """A camera that sends nothing for 3 s (a network hiccup, shorter than the outage limit) holds no frame up in
    the mesh: the frames finished meanwhile do not count as 3 s late when the next one arrives (the lag would
    read 3 s over a mesh that kept up, and the admission window would be cut for nothing)."""
    quiet_s = 3.0
    source = cameras.url("live/quiet")
    camera = PublishingCamera(media("mmpose_demo_960x540_5f.mp4"), cameras.url("publish/quiet")).start()
    try:
        wait_for(lambda: rtsp_describe(source)[0] == 200, 20, 0.1, "the camera to publish")
        started = time.time()
        task = client.start_live(source)
        readings = []  # (time.time(), lag)

        def watch():
            for snapshot in client.watch(task.task_id):
                readings.append((time.time(), snapshot.live.lag_s))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()

        # A rebalance of the stages holds every frame up for a second or more: the camera goes quiet once none is
        # due. The workers keep an earlier test's ended tasks while this one runs (stages/worker.py), and the
        # gateway makes no reservations while a task runs and some are left.
        wait_for(lambda: stages_settled(mesh, started, task.task_id), 30, 0.2,
                 "the stages to read this task, the reserved ones and ended ones alone, rebalanced")
        time.sleep(1.0)
        camera.go_quiet(quiet_s)
        wait_for(lambda: camera.quiet_spans, quiet_s + 10, 0.1, "the camera's quiet spell")
        time.sleep(5.0)
        client.cancel(task.task_id)
        watcher.join(60)
    finally:
        camera.stop()
    (quiet, spoke), = camera.quiet_spans
    # Counted from the camera's next frame, the frames finished meanwhile would read as late by the quiet spell.
    after = [(round(t - started, 1), round(lag, 2)) for t, lag in readings if spoke < t < spoke + 5.0]
    assert after and max(lag for _t, lag in after) < quiet_s - 0.5, (
        f"the camera was quiet from {quiet - started:.1f} s to {spoke - started:.1f} s; the lag afterwards: {after}; "
        f"rebalances then: {[(round(a - started, 1), round(b - started, 1)) for a, b in mesh.rebalances(quiet)]}")


def test_an_upload_that_ends_beside_a_camera_costs_it_no_rebalance(mesh, client, cameras):
    """Letting go of an ended task's topics is a rebalance that stops every stage for a second (a camera's lag grows
    by it): while a camera runs, the workers keep the topics of an upload that ended beside it, held (nothing
    fetched), and let go of both once the camera's task ends too; then both tasks' topics are deleted."""
    bootstrap = mesh.settings.kafka_bootstrap
    # The camera and the upload each take a reserved id: neither makes a join at its start, and some are left (with
    # none left the gateway would make more, a join, while the camera runs).
    wait_for(lambda: len(reserved_task_ids(bootstrap)) == mesh.settings.reserved_tasks, 60, 0.5,
             "the gateway's full reserve of task ids")
    started = time.time()
    task = client.start_live(cameras.url("cam/long"))
    wait_for(lambda: client.get(task.task_id).live.frames_received >= 3, 60, 0.1, "frames from the camera")
    wait_for(lambda: stages_settled(mesh, started, task.task_id), 30, 0.2, "the stages to settle")
    since = time.time()
    upload = client.submit(media("mmpose_demo_960x540_5f.mp4"))
    assert client.wait(upload.task_id, timeout_s=120).state == tpb.TASK_STATE_COMPLETED
    # Letting go used to come REMOVAL_BATCH_S after an ending, once RESERVE_QUIET_S + 1 s had passed since the last
    # start, whatever ran: wait past that, and more.
    time.sleep(max(since + mesh.settings.reserve_quiet_s + 1, time.time() + worker.REMOVAL_BATCH_S) + 3 - time.time())
    assert client.get(task.task_id).state == tpb.TASK_STATE_RUNNING
    assert not mesh.rebalances(since), f"rebalances beside the camera: {mesh.log_lines(since, 'task topics')}"
    readers = [w for w in mesh.workers if w.stage in STAGE_NAMES]
    assert all(upload.task_id in w.status().reading_tasks for w in readers), "an ended upload let go of"
    client.cancel(task.task_id)
    assert client.wait(task.task_id, timeout_s=120).state == tpb.TASK_STATE_CANCELLED
    both = set(kafka.task_topics(upload.task_id)) | set(kafka.task_topics(task.task_id))
    wait_for(lambda: not both & topics(bootstrap), 60, 0.5, "both tasks' topics to be deleted")


def test_annotated_frames_reach_watchers_in_order_and_a_slow_watcher_loses_the_oldest(client, cameras):
    task = client.start_live(cameras.url("cam/long"))
    fast, slow, errors = [], [], []

    def watch(into: list, delay: float):
        try:
            for response in client.frames(task.task_id):
                into.append((response.frame.index, response.dropped, response.frame))
                time.sleep(delay)
        except grpc.RpcError as exc:
            errors.append(exc)

    watchers = [threading.Thread(target=watch, args=(fast, 0.0)), threading.Thread(target=watch, args=(slow, 1.0))]
    for w in watchers:
        w.start()
    wait_for(lambda: len(fast) >= 25, 120, 0.2, "25 annotated frames to reach the fast watcher")
    client.cancel(task.task_id)
    for w in watchers:
        w.join(120)
    assert not errors, errors
    indices = [i for i, _d, _f in fast]
    assert indices == sorted(indices) and len(set(indices)) == len(indices)
    assert fast[-1][1] == 0  # the fast watcher lost nothing
    _index, _dropped, frame = fast[-1]
    image = cv2.imdecode(np.frombuffer(frame.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image.shape[:2] == (540, 960) and frame.persons and all(p.track_id >= 1 for p in frame.persons)
    slow_indices = [i for i, _d, _f in slow]
    assert slow_indices == sorted(slow_indices) and slow[-1][1] > 0, "the slow watcher should have lost frames"


def test_the_annotated_video_is_published_and_plays_from_the_rtsp_server(client, cameras):
    task = client.start_live(cameras.url("cam/long"))
    assert len(task.stream_token) >= 22 and task.stream_url == cameras.url(f"live/{task.task_id}/{task.stream_token}")
    wait_for(lambda: client.get(task.task_id).progress[-1].frames_done >= 3, 120, 0.2, "annotated frames")
    sizes = []
    with av.open(task.stream_url, options={"rtsp_transport": "tcp"}, timeout=(15, 15)) as player:
        for picture in player.decode(video=0):
            sizes.append((picture.width, picture.height))
            if len(sizes) == 5:
                break
    client.cancel(task.task_id)
    assert sizes == [(960, 540)] * 5
    client.wait(task.task_id, timeout_s=120)


def test_a_thinned_live_stream_plays_at_once_for_its_token_holders_only_and_is_refused_once_the_task_ends(
        client, cameras):
    """A 1080p camera at 30 fps outruns the mesh, so most frames are dropped at the source; whoever joins
    its annotated stream sees a picture within the keyframe interval (2 s) + 1.5 s. Its URL without the
    task's secret token is refused at once; after a cancel the URL is refused once the task has ended."""
    task = client.start_live(cameras.url("cam/crowd"))
    try:
        wait_for(lambda: client.get(task.task_id).progress[-1].frames_done >= 3, 120, 0.2, "annotated frames")
        for guess in (cameras.url(f"live/{task.task_id}"), task.stream_url[:-1] + ("A" if task.stream_url[-1] != "A"
                                                                                   else "B")):
            code, took = rtsp_describe(guess)
            assert code == 404 and took < 1.0, (guess, code, took)
        waits = []
        for pause in (0.0, 1.1, 0.6, 1.5):  # joins spread over the keyframe interval
            time.sleep(pause)
            waits.append(first_picture_s(task.stream_url, (1920, 1080)))
        live = client.get(task.task_id).live
        print(f"first picture after {[round(w, 2) for w in waits]} s; {live.frames_dropped} of "
              f"{live.frames_received} camera frames dropped")
        assert live.frames_dropped >= 0.5 * live.frames_received, "the mesh kept most frames: nothing was thinned"
        # The keyframe interval (2 s) and the player's own start-up (RTSP session, first decode), which took up
        # to 1.36 s on CI's two saturated cores (runs 18 and 21: 3.36 and 3.24 s). Keyframes counted in kept
        # frames, the bug this guards against, kept players waiting 87-170 s.
        assert max(waits) <= 2.0 + 1.5, waits
        answered = client.cancel(task.task_id)
        assert (answered.state, answered.ending) == (tpb.TASK_STATE_RUNNING, tpb.TASK_STATE_CANCELLED)
        done = client.wait(task.task_id, timeout_s=120)
        ended = time.monotonic()
        assert done.state == done.ending == tpb.TASK_STATE_CANCELLED and done.artifacts
        while rtsp_describe(task.stream_url)[0] != 404:
            assert time.monotonic() - ended < 1.0, "the stream of an ended task is still served"
            time.sleep(0.05)
    finally:  # a failure above must not leave the live task running into the next tests (seen in CI)
        if client.get(task.task_id).state in (tpb.TASK_STATE_QUEUED, tpb.TASK_STATE_RUNNING):
            client.cancel(task.task_id)
            client.wait(task.task_id, timeout_s=120)


def test_stopping_a_live_task_with_ctrl_c_in_the_cli_keeps_its_results(mesh, client, cameras, tmp_path):
    """`posemesh live URL --wait`, then Ctrl-C: the CLI cancels the task, waits for its results and writes them."""
    out = tmp_path / "out"
    cli = subprocess.Popen([sys.executable, "-m", "posemesh.cli", "--address", f"127.0.0.1:{mesh.gateway_port}",
                            "--api-key", USERS["alice"], "live", cameras.url("cam/long"), "--wait", "--quiet",
                            "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           # As at a terminal: a shell's background job (CI's) starts with SIGINT ignored.
                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    task_id = cli.stdout.readline().strip()
    try:
        wait_for(lambda: client.get(task_id).progress[-1].frames_done >= 8, 120, 0.2, "8 annotated frames")
        cli.send_signal(signal.SIGINT)
        stdout, stderr = cli.communicate(timeout=120)
    except (subprocess.TimeoutExpired, AssertionError):
        cli.kill()
        client.cancel(task_id)  # the module's other tests start from no running task
        raise
    assert cli.returncode == 0, stdout + stderr
    assert "stopping; the results of what was processed follow" in stderr
    done = client.get(task_id)
    assert done.state == tpb.TASK_STATE_CANCELLED and done.artifacts
    records, video = results(client, task_id)
    assert len(records) >= 8 and [r["index"] for r in records] == list(range(len(records)))
    assert frame_count(video) == len(records)
    written = sorted(out.iterdir())
    assert len(written) == len(done.artifacts), written
    assert all(any(p.name.endswith("." + a.file_name) for p in written) for a in done.artifacts), written
    assert next(p for p in written if p.suffix == ".mp4").read_bytes() == video


def test_a_camera_that_dies_and_comes_back_is_reconnected(client, tmp_path):
    camera = rtsp.RtspServer({"cam": clips.repeat(media("mmpose_demo_960x540_5f.mp4"), tmp_path / "c.mp4", 40)},
                             log_path=tmp_path / "rtsp.log").start()
    try:
        task = client.start_live(camera.url("cam/cam"))
        wait_for(lambda: client.get(task.task_id).live.frames_received >= 6, 60, 0.2, "frames from the camera")
        camera.kill()
        wait_for(lambda: not client.get(task.task_id).live.connected, 30, 0.2, "the outage to show")
        # Counted once the outage shows: the frames the reader still had when the camera died come in after the
        # kill (CI run 98: 6 of them, which passed for frames after the camera came back).
        live = client.get(task.task_id).live
        before, let_in = live.frames_received, live.frames_received - live.frames_dropped
        # Back at once: the reader tries again after 0.5, 1 and 2 s, and gives up at the live mesh's outage limit
        # (4 s); a camera that took a second more to start was refused at every try in CI run 98.
        camera.start()
        wait_for(lambda: client.get(task.task_id).live.frames_received >= before + 6, 60, 0.2, "frames again")
        live = client.get(task.task_id).live
        assert live.reconnects >= 1 and live.connected
        client.cancel(task.task_id)
        done = client.wait(task.task_id, timeout_s=120)
        assert done.state == tpb.TASK_STATE_CANCELLED
        records, _video = results(client, task.task_id)
        # Every frame let in before the outage is in the results (and those after it: dense indices).
        assert [r["index"] for r in records] == list(range(len(records))) and len(records) >= let_in
    finally:
        camera.stop()


def test_a_live_task_goes_on_after_its_gateway_is_killed_and_started_again(mesh, client, cameras):
    """SIGKILL of the one gateway while it reads a camera: started again, it reads from the broker where the
    stream stopped and opens the camera again. One result with every frame of both runs: indices dense,
    times growing across the gap, the video as long as the keypoints."""
    task = client.start_live(cameras.url("cam/long"))
    wait_for(lambda: client.get(task.task_id).progress[-1].frames_done >= 8, 120, 0.2, "8 annotated frames")
    before = client.get(task.task_id)
    mesh.kill_gateway()
    mesh.start_gateway()
    read_before = client.get(task.task_id).progress[0].frames_done  # as far as the killed gateway got to say
    going_on = wait_for(lambda: (t := client.get(task.task_id)).live.reconnects > before.live.reconnects and
                        t.progress[-1].frames_done >= read_before + 8 and t, 120, 0.2, "8 more annotated frames")
    assert going_on.state == tpb.TASK_STATE_RUNNING and not going_on.ending
    client.cancel(task.task_id)
    done = client.wait(task.task_id, timeout_s=120)
    assert done.state == tpb.TASK_STATE_CANCELLED, done.error_message
    records, video = results(client, task.task_id)
    assert [r["index"] for r in records] == list(range(len(records))) and len(records) >= read_before + 8
    times = [r["timestamp_s"] for r in records]
    assert all(t1 > t0 for t0, t1 in zip(times, times[1:])), "times grow across the gateway's restart"
    assert frame_count(video) == len(records)


def test_a_camera_gone_longer_than_the_outage_limit_fails_the_task_keeping_its_results(client, tmp_path):
    camera = rtsp.RtspServer({"cam": clips.repeat(media("mmpose_demo_960x540_5f.mp4"), tmp_path / "c.mp4", 40)},
                             log_path=tmp_path / "rtsp.log").start()
    task = client.start_live(camera.url("cam/cam"))
    wait_for(lambda: client.get(task.task_id).progress[-1].frames_done >= 3, 60, 0.2, "annotated frames")
    camera.kill()
    t0 = time.monotonic()
    done = client.wait(task.task_id, timeout_s=90)
    assert done.state == tpb.TASK_STATE_FAILED and f"no frame for {OUTAGE_S:.0f} s" in done.error_message
    assert time.monotonic() - t0 < OUTAGE_S + 30
    records, _video = results(client, task.task_id)
    assert len(records) >= 3


def test_sources_outside_the_allow_list_are_refused_and_leave_nothing(mesh, client):
    """The gateway's own answers, through the generated stub, and the SDK's for the camera that does not answer."""
    before = topics(mesh.settings.kafka_bootstrap)
    for url, code in (("rtsp://10.1.2.3:554/stream", grpc.StatusCode.PERMISSION_DENIED),
                      ("rtsp://example.com/cam", grpc.StatusCode.PERMISSION_DENIED),
                      ("file:///etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
                      ("/etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
                      ("http://127.0.0.1:8080/stream.m3u8", grpc.StatusCode.INVALID_ARGUMENT),
                      ("rtsp://127.0.0.1:1/nothing-listens", grpc.StatusCode.UNAVAILABLE)):
        request = tpb.StartLiveTaskRequest(source=tpb.LiveSource(url=url))
        with pytest.raises(grpc.RpcError) as err:
            client.stub.StartLiveTask(request, metadata=client.metadata, timeout=30)
        assert err.value.code() == code, (url, err.value.details())
        assert "passwd" not in err.value.details() or code == grpc.StatusCode.INVALID_ARGUMENT
        if code == grpc.StatusCode.UNAVAILABLE:
            assert "nothing-listens: the live source does not answer" in err.value.details(), err.value.details()
            assert ("posemesh-unavailable", "source") in err.value.trailing_metadata()
            # The SDK does not retry the gateway's word about a camera (it would for 90 s, as for a gateway).
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as sdk:
                client.start_live(url)
            assert sdk.value.code() == code and time.monotonic() - t0 < 15
    assert not [t for t in client.list() if t.state in (tpb.TASK_STATE_QUEUED, tpb.TASK_STATE_RUNNING)]
    assert topics(mesh.settings.kafka_bootstrap) - before - reserved_topics(mesh.settings.kafka_bootstrap) == set()


def _threads_and_rss(pid: int) -> tuple[int, float]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in status if ":" in line)
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) / 1024


def test_fifty_live_tasks_started_and_stopped_leave_nothing_behind(mesh, client, cameras):
    """Threads, memory and topics of the gateway come back to where they were."""
    def settled():
        left = (set(kafka.list_task_topics(kafka.admin(mesh.settings)))
                - reserved_task_ids(mesh.settings.kafka_bootstrap))
        running = [t for t in client.list() if t.state in (tpb.TASK_STATE_QUEUED, tpb.TASK_STATE_RUNNING)]
        return not left and not running
    wait_for(settled, 120, 0.5, "earlier tasks and topics to be gone")

    def one(results_list):
        task = client.start_live(cameras.url("cam/long"))
        wait_for(lambda: client.get(task.task_id).live.frames_received >= 1, 60, 0.1, "a frame")
        client.cancel(task.task_id)
        results_list.append(client.wait(task.task_id, timeout_s=120).state)

    def batch_of_five(states: list) -> None:
        batch = [threading.Thread(target=one, args=(states,)) for _ in range(5)]
        for t in batch:
            t.start()
        for t in batch:
            t.join()

    # A first batch fills the gateway's bounded pools (asyncio's executor for source probes, gRPC's):
    # threads that are reused, not leaked. The baseline is taken after it.
    batch_of_five([])
    wait_for(settled, 120, 0.5, "the warm-up tasks' topics to be deleted")
    threads0, _ = _threads_and_rss(mesh.gateway.pid)
    states: list = []
    rss_after_round = []
    for _round in range(10):
        batch_of_five(states)
        rss_after_round.append(_threads_and_rss(mesh.gateway.pid)[1])
    assert states == [tpb.TASK_STATE_CANCELLED] * 50
    wait_for(settled, 120, 0.5, "every task's topics to be deleted")
    time.sleep(2)
    threads1, _ = _threads_and_rss(mesh.gateway.pid)
    assert threads1 <= threads0 + 2, (threads0, threads1)
    # Memory is judged by its trend, not by one reading against another: a single reading swings
    # by +-50 MB with the decoders' buffers and malloc's arenas (measured 144-201 MB over 100 tasks,
    # with no upward trend). A leak of 0.8 MB per task moves the median of the last five rounds
    # 20 MB above the first five's; the noise moved it by 7 MB.
    first, last = statistics.median(rss_after_round[:5]), statistics.median(rss_after_round[5:])
    assert last - first < 20, f"the gateway grew by {last - first:.0f} MB over 25 live tasks: {rss_after_round}"
