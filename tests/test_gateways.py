"""Several gateways serve one mesh (gateway/duties.py): two gateway processes, each on its own data
directory and port, share a PostgreSQL task store and an S3 bucket, and nothing else. Every call may go to
either; one of them holds the mesh duties; a gateway killed mid-task leaves its tasks to the other."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from cryptography.fernet import Fernet

from posemesh.client import Client
from posemesh.devstack import rtsp
from posemesh.devstack.processes import free_port, stop_process
from posemesh.gateway.duties import DUTIES_LEASE, GATEWAY_LEASE, LEASE_TTL_S
from posemesh.gateway.store import TaskStore
from posemesh.mesh.at_rest import SecretBox
from posemesh.mesh.settings import REPO_ROOT
from posemesh.v1 import task_service_pb2 as tpb
from posemesh.v1 import task_service_pb2_grpc as tpb_grpc
from tests import clips
from tests.conftest import USERS, Workers, auth, make_settings, media, settings_env
from tests.helpers import completed_results, decoded_pictures, upload, wait_for, wait_state
from tests.mesh import _healthy


class GatewayProcess:
    """`python -m posemesh.gateway` on its own data directory and port, as a deployment runs each replica."""

    def __init__(self, env: dict, data_dir: Path, logs: Path):
        self.env, self.data_dir, self.logs = dict(env), data_dir, logs
        self.port = free_port()
        self.env.update({"POSEMESH_DATA_DIR": str(data_dir), "POSEMESH_GATEWAY_LISTEN": f"127.0.0.1:{self.port}"})
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = open(self.logs / f"gateway-{self.port}.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "posemesh.gateway"], cwd=REPO_ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: _healthy(self.address), 60, 0.1, f"the gateway on {self.address} to serve")
        self.channel = grpc.insecure_channel(self.address)
        self.stub = tpb_grpc.TaskServiceStub(self.channel)

    @property
    def id(self) -> str:
        return (self.data_dir / "gateway-id").read_text().strip()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.channel.close()

    def stop(self) -> None:
        self.channel.close()
        if self.proc is not None:
            stop_process(self.proc, grace=10)


class HAProxy:
    """Debian's HAProxy in HTTP/2 mode in front of the gateways, balancing each call (gRPC is HTTP/2 end to
    end: h2 to the clients, h2c to the gateways)."""

    def __init__(self, backends: list[str], root: Path):
        self.port = free_port()
        config = root / "haproxy.cfg"
        servers = "\n".join(f"    server gw{i} {address} proto h2 check" for i, address in enumerate(backends))
        config.write_text(f"""global
    maxconn 256
    log stdout format raw local0
defaults
    mode http
    log global
    option httplog
    timeout connect 5s
    timeout client 300s
    timeout server 300s
frontend grpc
    bind 127.0.0.1:{self.port} proto h2
    default_backend gateways
backend gateways
    balance roundrobin
{servers}
""")
        self.proc = subprocess.Popen(["haproxy", "-f", str(config), "-db"], stdout=open(root / "haproxy.log", "ab"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: _healthy(self.address), 30, 0.1, "HAProxy to pass calls to a gateway")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        stop_process(self.proc, grace=5)


@pytest.fixture(scope="module")
def mesh(broker, triton, postgres, s3, tmp_path_factory):
    """Two gateways and one worker of each stage, meeting only in Kafka, PostgreSQL and the bucket."""
    root = tmp_path_factory.mktemp("gateways")
    (root / "secrets.key").write_text(Fernet.generate_key().decode())
    settings = make_settings(broker, root / "workers", triton_url=triton.url, group_prefix=f"gw{time.monotonic_ns()}",
                             blob_url=s3.blob_url("gw"), s3_endpoint_url=s3.endpoint_url)
    env = settings_env(settings)
    env.update({"POSEMESH_STORE_URL": postgres.create_database(f"gateways{time.monotonic_ns()}"),
                "POSEMESH_SECRETS_KEY_FILE": str(root / "secrets.key"),
                "POSEMESH_MAX_FRAMES_AHEAD": "16",  # decoding stays a few frames ahead: a kill lands mid-file
                "POSEMESH_LIVE_SOURCES": "rtsp://127.0.0.1:*"})
    gateways = [GatewayProcess(env, root / f"gateway{i}", root) for i in range(2)]
    workers = Workers(settings, root)
    try:
        for stage in ("detect", "pose", "track", "annotate"):
            workers.start(stage)
        workers.wait_healthy()
        store = TaskStore(env["POSEMESH_STORE_URL"], SecretBox.from_file(root / "secrets.key"))
        yield gateways, store, root
        store.close()
    finally:
        workers.stop()
        for gw in gateways:
            gw.stop()


def test_two_gateways_serve_every_call_on_either_and_one_holds_the_duties(mesh, tmp_path):
    """Round-robin over both addresses (grpc's client-side load balancing) for the upload and the reads;
    then each call on a chosen gateway: the upload on one, WatchTask on both (each sees the task through to
    COMPLETED, in order), downloads from both (equal), delete on the other."""
    (a, b), store, _root = mesh
    assert store.lease_holder(DUTIES_LEASE) in (a.id, b.id)
    assert {store.lease_holder(GATEWAY_LEASE + g.id) for g in (a, b)} == {a.id, b.id}
    clip = clips.synth(tmp_path / "clip.mp4", 40, fps=10)
    both = grpc.insecure_channel(f"ipv4:{a.address},{b.address}", options=[("grpc.lb_policy_name", "round_robin")])
    rr = tpb_grpc.TaskServiceStub(both)
    first = upload(rr, clip, auth())
    done_rr, video_rr, keypoints_rr = completed_results(rr, first.task_id, auth())

    task = upload(a.stub, clip, auth())
    seen: dict[str, list[tpb.Task]] = {"a": [], "b": []}

    def watch(name: str, stub) -> None:
        for response in stub.WatchTask(tpb.WatchTaskRequest(task_id=task.task_id), metadata=auth(), timeout=240):
            seen[name].append(response.task)

    watchers = [threading.Thread(target=watch, args=(n, g.stub)) for n, g in (("a", a), ("b", b))]
    for w in watchers:
        w.start()
    for w in watchers:
        w.join(240)
    for name, snapshots in seen.items():
        assert snapshots and snapshots[-1].state == tpb.TASK_STATE_COMPLETED, name
        detected = [s.progress[1].frames_done for s in snapshots if len(s.progress) > 1]
        assert detected == sorted(detected) and detected[-1] == 40, (name, detected)
    done_a, video_a, keypoints_a = completed_results(a.stub, task.task_id, auth())
    done_b, video_b, keypoints_b = completed_results(b.stub, task.task_id, auth())
    assert keypoints_a == keypoints_b == keypoints_rr and video_a == video_b
    assert decoded_pictures(video_a) == decoded_pictures(video_rr)
    listed = {t.task_id for t in b.stub.ListTasks(tpb.ListTasksRequest(), metadata=auth(), timeout=10).tasks}
    assert {first.task_id, task.task_id} <= listed
    b.stub.DeleteTask(tpb.DeleteTaskRequest(task_id=task.task_id), metadata=auth(), timeout=10)
    with pytest.raises(grpc.RpcError) as gone:
        a.stub.GetTask(tpb.GetTaskRequest(task_id=task.task_id), metadata=auth(), timeout=10)
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND
    both.close()


def test_every_call_through_a_load_balancer_in_front_of_both(mesh, tmp_path):
    """HAProxy (HTTP/2) in front of the two gateways: upload, watch, download and delete through it, each call
    on whichever gateway it chose; the results equal those downloaded from a gateway directly."""
    (a, b), _store, root = mesh
    proxy = HAProxy([a.address, b.address], root)
    try:
        with grpc.insecure_channel(proxy.address) as channel:
            stub = tpb_grpc.TaskServiceStub(channel)
            task = upload(stub, clips.synth(tmp_path / "clip.mp4", 20, fps=10), auth())
            last = None
            for response in stub.WatchTask(tpb.WatchTaskRequest(task_id=task.task_id), metadata=auth(), timeout=240):
                last = response.task
            assert last.state == tpb.TASK_STATE_COMPLETED, last.error_message
            _done, video, keypoints = completed_results(stub, task.task_id, auth())
            _done, direct_video, direct_keypoints = completed_results(b.stub, task.task_id, auth())
            assert (video, keypoints) == (direct_video, direct_keypoints)
            stub.DeleteTask(tpb.DeleteTaskRequest(task_id=task.task_id), metadata=auth(), timeout=10)
    finally:
        proxy.stop()
    log = (root / "haproxy.log").read_text()
    assert "gateways/gw0" in log and "gateways/gw1" in log, "HAProxy passed calls to both gateways"


@pytest.mark.slow
def test_a_gateway_killed_mid_upload_leaves_its_task_to_the_other_frame_exact(mesh, tmp_path):
    """SIGKILL of the gateway decoding a task (and, if it held them, the mesh duties): once its lease lapses
    the other takes the duties and the task, publishes its frames again from the upload in the bucket, and
    the results equal an undisturbed run's. A watcher of the SDK given both addresses goes on through the
    kill. The killed gateway then starts again and serves."""
    (a, b), store, _root = mesh
    clip = clips.synth(tmp_path / "long.mp4", 120, fps=10)
    _ref, ref_video, ref_keypoints = completed_results(b.stub, upload(b.stub, clip, auth()).task_id, auth())
    task = upload(a.stub, clip, auth())
    watched: list[tpb.Task] = []
    with Client(f"{a.address},{b.address}", USERS["alice"], retry_s=60) as client:
        watcher = threading.Thread(target=lambda: watched.append(client.wait(task.task_id, timeout_s=240)))
        watcher.start()
        wait_for(lambda: 20 <= b.stub.GetTask(tpb.GetTaskRequest(task_id=task.task_id), metadata=auth(),
                                              timeout=10).task.progress[0].frames_done < 120,
                 120, 0.05, "the owner to decode part of the upload")
        a.kill()
        killed_at = time.monotonic()
        done, video, keypoints = completed_results(b.stub, task.task_id, auth())
        watcher.join(60)
    assert watched and watched[0].state == tpb.TASK_STATE_COMPLETED, "the SDK's watch went on on the other gateway"
    assert time.monotonic() - killed_at > LEASE_TTL_S / 2, "taken over before the lease could lapse"
    assert keypoints == ref_keypoints
    assert decoded_pictures(video) == decoded_pictures(ref_video)
    assert done.video.frame_count == 120
    assert store.lease_holder(DUTIES_LEASE) == b.id
    a.start()
    assert a.stub.GetTask(tpb.GetTaskRequest(task_id=task.task_id), metadata=auth(), timeout=10).task.state == \
        tpb.TASK_STATE_COMPLETED


class _SlowFile(io.BytesIO):
    """An upload that arrives slowly (16 KB every 50 ms), so a gateway can be killed in the middle of it."""

    def read(self, n: int = -1) -> bytes:
        time.sleep(0.05)
        return super().read(16 * 1024 if n < 0 else min(n, 16 * 1024))


@pytest.mark.slow
def test_an_upload_cut_off_by_its_gateways_death_is_retried_on_the_other_and_leaves_nothing(mesh, tmp_path):
    """The SDK, given both addresses, uploads slowly; the gateway receiving it is SIGKILLed mid-stream. The SDK
    sends the whole upload again, with the same idempotency key, to the other gateway: one task, completed,
    with the same results as the file uploaded undisturbed. The killed gateway starts again and removes the
    partial upload it had on its disk."""
    (a, b), _store, _root = mesh
    clip = clips.synth(tmp_path / "clip.mp4", 60, size=(640, 360), fps=10)
    _ref, ref_video, ref_keypoints = completed_results(b.stub, upload(b.stub, clip, auth()).task_id, auth())
    before = {t.task_id for t in b.stub.ListTasks(tpb.ListTasksRequest(), metadata=auth(), timeout=10).tasks}

    def receiving() -> GatewayProcess | None:  # the gateway with a partial upload on its disk
        for gw in (a, b):
            if any(p.stat().st_size > 32 * 1024 for p in (gw.data_dir / "jobs").glob("*/*") if p.is_file()):
                return gw
        return None

    submitted: list[tpb.Task] = []
    with Client(f"{a.address},{b.address}", USERS["alice"], retry_s=60) as client:
        sender = threading.Thread(target=lambda: submitted.append(
            client.submit(_SlowFile(clip.read_bytes()), file_name="clip.mp4", idempotency_key="cut-off-once")))
        sender.start()
        victim = wait_for(receiving, 60, 0.02, "a gateway to receive part of the upload")
        assert clip.stat().st_size > 64 * 1024, "the clip is long enough to be cut off"
        victim.kill()
        sender.join(120)
    survivor = b if victim is a else a
    assert submitted, "the SDK's upload went through on the other gateway"
    task = submitted[0]
    _done, video, keypoints = completed_results(survivor.stub, task.task_id, auth())
    assert keypoints == ref_keypoints and decoded_pictures(video) == decoded_pictures(ref_video)
    after = {t.task_id for t in survivor.stub.ListTasks(tpb.ListTasksRequest(), metadata=auth(), timeout=10).tasks}
    assert after - before == {task.task_id}, "one task for the upload, however many attempts"
    assert list((victim.data_dir / "jobs").iterdir()), "the killed gateway left its partial upload"
    victim.start()
    assert not list((victim.data_dir / "jobs").iterdir()), "removed when the gateway started again"


@pytest.fixture(scope="module")
def camera(tmp_path_factory):
    if rtsp.available():
        pytest.skip(rtsp.available())
    root = tmp_path_factory.mktemp("camera")
    long = clips.repeat(media("mmpose_demo_960x540_5f.mp4"), root / "long.mp4", 80)  # 80 s at 5 fps
    with rtsp.RtspServer({"long": long}, log_path=root / "rtsp.log") as server:
        yield server


def _seen(gw: GatewayProcess, task_id: str) -> tpb.Task:
    return gw.stub.GetTask(tpb.GetTaskRequest(task_id=task_id), metadata=auth(), timeout=10).task


@pytest.mark.slow
def test_a_live_task_goes_on_with_its_camera_on_the_other_gateway_when_its_gateway_is_killed(mesh, camera):
    """SIGKILL of the gateway reading a camera: once its lease lapses the other gateway opens the camera
    again and the stream goes on after the frames that went in (read back from the broker), as after an
    outage of the camera. Stopped later, the task keeps one result with every frame of both readers: indices
    dense, times growing across the gap, the video as long as the keypoints."""
    (a, b), _store, _root = mesh
    task = a.stub.StartLiveTask(tpb.StartLiveTaskRequest(source=tpb.LiveSource(url=camera.url("cam/long"))),
                                metadata=auth(), timeout=60).task
    wait_for(lambda: _seen(b, task.task_id).progress[-1].frames_done >= 8, 120, 0.2, "8 annotated frames")
    a.kill()
    killed_at = time.monotonic()
    before = _seen(b, task.task_id)
    read_before = before.progress[0].frames_done
    going_on = wait_for(lambda: (t := _seen(b, task.task_id)).live.reconnects > before.live.reconnects and
                        t.progress[-1].frames_done >= read_before + 8 and t, 120, 0.2,
                        "the other gateway to read the camera again and 8 more frames to be annotated")
    gap_s = time.monotonic() - killed_at
    assert going_on.state == tpb.TASK_STATE_RUNNING and not going_on.ending
    assert going_on.live.frames_received > before.live.frames_received, "the counts went on"
    b.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth(), timeout=10)
    done = wait_state(b.stub, task.task_id, auth(), {tpb.TASK_STATE_COMPLETED, tpb.TASK_STATE_FAILED,
                                                    tpb.TASK_STATE_CANCELLED}, timeout=120)
    assert done.state == tpb.TASK_STATE_CANCELLED, done.error_message
    times = _one_stream(b, task.task_id, done, read_before + 8)
    # The gap shows in the stream: the frames either side of it are further apart than the camera's frames.
    assert max(t1 - t0 for t0, t1 in zip(times, times[1:])) > LEASE_TTL_S / 2, (gap_s, times)
    a.start()
    assert _seen(a, task.task_id).state == tpb.TASK_STATE_CANCELLED


def _one_stream(gw: GatewayProcess, task_id: str, done: tpb.Task, at_least: int) -> list[float]:
    """The task's results are one stream, whoever read its camera: every frame once, in order, times growing,
    the video as long as the keypoints. Returns the frames' times."""
    got = {kind: b"".join(c.chunk for c in gw.stub.DownloadResult(
        tpb.DownloadResultRequest(task_id=task_id, kind=kind), metadata=auth(), timeout=60))
        for kind in (tpb.ARTIFACT_KIND_ANNOTATED_VIDEO, tpb.ARTIFACT_KIND_KEYPOINTS)}
    records = [json.loads(line) for line in got[tpb.ARTIFACT_KIND_KEYPOINTS].decode().splitlines()]
    assert [r["index"] for r in records] == list(range(len(records))), "every frame once, in order"
    assert len(records) >= at_least and len(records) == done.progress[0].frames_done
    times = [r["timestamp_s"] for r in records]
    assert all(t1 > t0 for t0, t1 in zip(times, times[1:])), "times grow across the readers"
    assert len(decoded_pictures(got[tpb.ARTIFACT_KIND_ANNOTATED_VIDEO])) == len(records)
    return times


class CuttableProxy:
    """A TCP relay to `upstream` that can be cut: every connection through it closed and new ones refused, the
    network between one gateway and the store failing (its calls fail at once), not the store going away for
    everyone."""

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.cut = threading.Event()
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.cut.is_set():
                client.close()
                continue
            server = socket.create_connection(self.upstream)
            with self.lock:
                self.sockets |= {client, server}
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _close(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with self.lock:
                self.sockets.discard(sock)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def cut_off(self) -> None:
        self.cut.set()
        with self.lock:
            sockets = list(self.sockets)
        self._close(*sockets)

    def stop(self) -> None:
        self.cut_off()
        self.listener.close()


@pytest.mark.slow
def test_a_live_task_goes_on_when_its_gateway_is_cut_off_from_the_store(mesh, camera):
    """A third gateway reads a camera; then its connections to PostgreSQL are cut (its store calls fail; the
    broker and the camera still answer it). The task must not end for that (it did: the first failed status
    write closed the stream). Its lease lapses, another gateway opens the camera again, and the result is one
    stream: the cut-off reader publishes nothing the other contradicts (its window closes while it hears of no
    annotated frame), and once it reaches the store again the task is the other gateway's."""
    (a, b), _store, root = mesh
    url = a.env["POSEMESH_STORE_URL"]
    host_port = url.split("@", 1)[1].split("/", 1)[0]
    proxy = CuttableProxy((host_port.rsplit(":", 1)[0], int(host_port.rsplit(":", 1)[1])))
    c = GatewayProcess({**a.env, "POSEMESH_STORE_URL": url.replace(host_port, f"127.0.0.1:{proxy.port}")},
                       root / "gateway-cut", root)
    try:
        task = c.stub.StartLiveTask(tpb.StartLiveTaskRequest(source=tpb.LiveSource(url=camera.url("cam/long"))),
                                    metadata=auth(), timeout=60).task
        wait_for(lambda: _seen(b, task.task_id).progress[-1].frames_done >= 8, 120, 0.2, "8 annotated frames")
        before = _seen(b, task.task_id)
        proxy.cut_off()
        going_on = wait_for(lambda: (t := _seen(b, task.task_id)).live.reconnects > before.live.reconnects and
                            t.progress[-1].frames_done >= before.progress[0].frames_done + 8 and t, 120, 0.2,
                            "another gateway to read the camera again and 8 more frames to be annotated")
        assert going_on.state == tpb.TASK_STATE_RUNNING
        proxy.cut.clear()  # the cut gateway reaches the store again: the task is not its own any more
        time.sleep(2 * LEASE_TTL_S / 5)
        b.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth(), timeout=10)
        done = wait_state(b.stub, task.task_id, auth(), {tpb.TASK_STATE_COMPLETED, tpb.TASK_STATE_FAILED,
                                                        tpb.TASK_STATE_CANCELLED}, timeout=120)
        assert done.state == tpb.TASK_STATE_CANCELLED, done.error_message
        _one_stream(b, task.task_id, done, before.progress[0].frames_done + 8)
        log = (root / f"gateway-{c.port}.log").read_text()
        assert "the task store does not answer; the camera is read on" in log
        assert "another gateway took it over; its frames stop here" in log
    finally:
        c.stop()
        proxy.stop()
