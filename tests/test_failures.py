"""Failures stay with their task, and nothing hangs: a worker is not ready before its consumer group answers; a
poison frame fails its task only; a hung Triton turns the workers' health NOT_SERVING and back; Triton gone for
longer than the outage limit fails the waiting task with a clear message; a task that stops moving is failed by
the stall timeout; an upload while the broker is down is refused at once and leaves nothing; the SDK's waits keep
their deadline. All against real processes."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from confluent_kafka import Producer

from posemesh.client import Client
from posemesh.devstack.processes import stop_process
from posemesh.mesh import kafka
from posemesh.mesh.health import LIVENESS, grpc_healthy
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb
from tests.conftest import USERS, auth, media
from tests.helpers import make_clip, upload, upload_requests, wait_for, wait_state
from tests.mesh import Mesh

pytestmark = pytest.mark.slow

DONE = {tpb.TASK_STATE_COMPLETED, tpb.TASK_STATE_FAILED, tpb.TASK_STATE_CANCELLED}


@pytest.fixture(scope="module")
def mesh(onnx_dir, tmp_path_factory):
    m = Mesh(tmp_path_factory.mktemp("failmesh"), onnx_dir, replicas=1, topic_delete_delay_s=1.0,
             triton_timeout_s=2.0, triton_outage_s=8.0)
    yield m
    m.stop()


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory):
    return make_clip(media("towncentre_1080p_302f.mp4"), tmp_path_factory.mktemp("clip") / "town90.mp4", 90)


def health(worker, service: str = "") -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{worker.port}") as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=3).status


def test_a_new_worker_is_serving_only_once_its_consumer_group_has_answered(mesh):
    """Ready (Kubernetes' readiness, `posemesh up`) means the worker reads its partitions: until its group first
    answers (a second at least on the local broker) its health says NOT_SERVING and its status why."""
    worker = mesh.start_worker("track")
    seen = []  # (health, status.serving, status.assignments, status.problem), health asked first

    def serving() -> bool:
        try:
            said = health(worker)
            status = worker.status(timeout=3)
        except grpc.RpcError:
            return False  # not listening yet
        seen.append((said, status.serving, status.assignments, status.problem))
        return said == 1 and status.serving

    try:
        wait_for(serving, 60, 0.02, "the new track worker to serve")
    finally:
        stop_process(worker.proc, grace=15)
        mesh.workers.remove(worker)
    assert any(problem.startswith("joining consumer group") and said == 2 for said, _s, _a, problem in seen), seen
    # Assignments never go back to 0: once either says SERVING, the group had answered.
    assert all(assignments > 0 for said, serving, assignments, _p in seen if said == 1 or serving), seen


def test_a_poison_frame_fails_its_task_and_nothing_else(mesh, long_clip):
    """A record the detector cannot decode fails that task, naming the stage and frame; the other task in
    the same batches completes; the worker lives; the poison is not retried."""
    healthy = upload(mesh.stub, media("mmpose_demo_960x540_5f.mp4"), auth())
    doomed = upload(mesh.stub, long_clip, auth())
    poison = pb.StageRecord(task_id=doomed.task_id, options=doomed.options, frame=pb.Frame(
        index=5000, timestamp_s=200.0, width=1920, height=1080, jpeg=b"\xff\xd8 not really a JPEG"))
    producer = Producer({"bootstrap.servers": mesh.settings.kafka_bootstrap})
    producer.produce(kafka.task_topic(kafka.RAW_FRAMES, doomed.task_id), poison.SerializeToString(), partition=0)
    producer.flush(10)
    failed = mesh.wait_done(doomed.task_id)
    assert failed.state == tpb.TASK_STATE_FAILED
    assert failed.error_message.startswith("detect failed: frame 5000:") and "JPEG" in failed.error_message
    assert mesh.wait_done(healthy.task_id).state == tpb.TASK_STATE_COMPLETED
    [detect] = mesh.replicas("detect")
    assert detect.alive()
    failures = [t for t in detect.status().tasks if t.failure]
    assert [t.task_id for t in failures] in ([doomed.task_id], [])  # reported once (forgotten once ended)
    assert all(w.alive() for w in mesh.workers)


def test_a_hung_triton_turns_health_not_serving_and_back(mesh, long_clip):
    """SIGSTOP: Triton accepts connections but answers nothing. Calls hit their deadline, the workers say
    so in their health, and once Triton wakes the task completes."""
    task = upload(mesh.stub, long_clip, auth())
    wait_for(lambda: mesh.replicas("pose")[0].frames_of(task.task_id) >= 5, 120, 0.05, "pose under way")
    mesh.triton.proc.send_signal(signal.SIGSTOP)
    try:
        [detect] = mesh.replicas("detect")
        wait_for(lambda: health(detect) == 2, 30, 0.2, "detect's health to be NOT_SERVING")
        assert "Triton" in detect.status().problem
        assert health(detect, LIVENESS) == 1  # alive: Kubernetes must not restart it, which would not mend Triton
    finally:
        mesh.triton.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: health(detect) == 1, 30, 0.2, "detect's health to be SERVING again")
    done = mesh.wait_done(task.task_id)
    assert done.state == tpb.TASK_STATE_COMPLETED, done.error_message
    assert {p.stage: p.frames_done for p in done.progress}["annotate"] == 90


def test_triton_gone_longer_than_the_outage_limit_fails_the_task_with_a_clear_message(mesh, long_clip):
    task = upload(mesh.stub, long_clip, auth())
    wait_for(lambda: mesh.replicas("detect")[0].frames_of(task.task_id) >= 3, 120, 0.05, "detect under way")
    # One a stub (CPU_INSTANCES a model), in the host's /dev/shm, named with this server's prefix.
    regions = mesh.triton.shm_regions()
    assert len(regions) >= 2 and all(r.name.startswith(mesh.triton.shm_prefix) for r in regions), regions
    mesh.triton.kill()  # tritonserver and its backend stubs, as a crashed container
    t0 = time.monotonic()
    try:
        assert not [r for r in regions if r.exists()], "the killed Triton's shared-memory regions were left behind"
        failed = mesh.wait_done(task.task_id, timeout=60)
        assert failed.state == tpb.TASK_STATE_FAILED
        assert "Triton" in failed.error_message and "8 s" in failed.error_message, failed.error_message
        assert time.monotonic() - t0 < 40
        assert all(w.alive() for w in mesh.workers)
    finally:
        mesh.triton.start()
    wait_for(lambda: all(health(w) == 1 for w in mesh.workers), 60, 0.5, "every worker SERVING again")
    after = upload(mesh.stub, media("mmpose_demo_960x540_5f.mp4"), auth())
    assert mesh.wait_done(after.task_id).state == tpb.TASK_STATE_COMPLETED


def test_a_task_that_stops_moving_is_failed_by_the_stall_timeout(gateway_factory):
    """No worker runs here: the frames are published, then nothing moves. The stall timeout fires."""
    gw = gateway_factory(stall_timeout_s=3.0)
    task = upload(gw.stub, media("mmpose_demo_960x540_5f.mp4"), auth())
    t0 = time.monotonic()
    failed = wait_state(gw.stub, task.task_id, auth(), {tpb.TASK_STATE_FAILED}, timeout=30)
    assert "no frame made progress" in failed.error_message and "3 s" in failed.error_message
    assert time.monotonic() - t0 < 15


def test_an_upload_waiting_for_a_decoding_slot_is_not_stalled(gateway_factory):
    """POSEMESH_INGEST=stage: an ingest replica whose slots are all busy queues the next upload and lists it
    in its heartbeats (stages/reporting.py's Reporter, as the replica sends them); the gateway's stall limit
    starts again while it is listed, and runs once no live replica lists it."""
    from posemesh.mesh.pipeline import INGEST
    from posemesh.stages.reporting import Reporter

    gw = gateway_factory(stall_timeout_s=3.0, ingest="stage")
    task = upload(gw.stub, media("mmpose_demo_960x540_5f.mp4"), auth())  # its job is read by no replica here
    reporter = Reporter("ingest-test", INGEST)
    producer = Producer(kafka.producer_config(gw.settings, "ingest-test"))
    reporter.attach(producer)
    reporter.waiting_tasks([task.task_id])
    reporter.start()
    try:
        time.sleep(8.0)  # well past the stall limit
        got = gw.stub.GetTask(tpb.GetTaskRequest(task_id=task.task_id), metadata=auth()).task
        assert got.state == tpb.TASK_STATE_RUNNING, got.error_message
        reporter.waiting_tasks([])  # it got a slot (and then, here, nothing moved)
        t0 = time.monotonic()
        failed = wait_state(gw.stub, task.task_id, auth(), {tpb.TASK_STATE_FAILED}, timeout=30)
        assert "no frame made progress" in failed.error_message
        assert time.monotonic() - t0 > 2.0, "the wait in the queue counted"
    finally:
        reporter.stop()
        producer.flush(5)


def test_the_stall_limit_counts_from_when_a_silent_broker_answers_again(tmp_path):
    """A broker that stops answering stops every task; the stall limit must not fail them the moment it is
    back (CI: the broker was silent for 5 minutes, and the task failed as it answered again)."""
    from posemesh.devstack.broker import LocalBroker
    from tests.conftest import RunningGateway, make_settings

    broker = LocalBroker().start()
    gw = RunningGateway(make_settings(broker, tmp_path / "data", stall_timeout_s=6.0))
    try:
        task = upload(gw.stub, media("mmpose_demo_960x540_5f.mp4"), auth())

        def published() -> bool:  # the gateway's last progress: no worker runs here
            got = gw.stub.GetTask(tpb.GetTaskRequest(task_id=task.task_id), metadata=auth()).task
            return any(p.stage == "decode" and p.frames_done == 5 for p in got.progress)
        wait_for(published, 20, 0.1, "every frame published")
        broker.proc.send_signal(signal.SIGSTOP)  # silent, not gone: connections stay open, nothing answers
        try:
            wait_for(lambda: not gw.gateway.broker_available(), 20, 0.1, "the gateway to find the broker silent")
            time.sleep(7)  # longer than the stall limit
        finally:
            broker.proc.send_signal(signal.SIGCONT)
        wait_for(gw.gateway.broker_available, 20, 0.1, "the gateway to hear the broker again")
        back = time.monotonic()
        failed = wait_state(gw.stub, task.task_id, auth(), {tpb.TASK_STATE_FAILED}, timeout=30)
        assert "no frame made progress" in failed.error_message
        # The silence (from the first check that went unanswered, at most 1 s after the SIGSTOP) does not count:
        # the limit is reached about 5 s after the broker was heard again. Counted from the upload, it fired at once.
        assert time.monotonic() - back > 3.0, "failed for a stall the broker's silence made"
    finally:
        gw.stop()
        broker.stop()


def test_an_upload_while_the_broker_is_down_is_refused_at_once_and_leaves_nothing(tmp_path):
    from posemesh.devstack.broker import LocalBroker
    from tests.conftest import RunningGateway, make_settings

    broker = LocalBroker().start()
    gw = RunningGateway(make_settings(broker, tmp_path / "data"))
    try:
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait()
        wait_for(lambda: not gw.gateway.broker_available(), 15, 0.1, "the gateway to see the broker gone")
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            gw.stub.Upload(upload_requests(media("mmpose_demo_960x540_5f.mp4").read_bytes()), metadata=auth())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "broker" in err.value.details()
        assert time.monotonic() - t0 < 3
        assert gw.stub.ListTasks(tpb.ListTasksRequest(), metadata=auth()).tasks == []
        assert [p for p in gw.settings.jobs_dir.rglob("*") if p.is_file()] == []
        from grpc_health.v1 import health_pb2, health_pb2_grpc
        status = health_pb2_grpc.HealthStub(gw.channel).Check(health_pb2.HealthCheckRequest(), timeout=3).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert grpc_healthy(gw.address, service=LIVENESS)  # alive: a restart would not bring the broker back
        # The broker comes back (empty): uploads work again within seconds.
        broker = LocalBroker(broker.port).start()
        wait_for(lambda: gw.gateway.broker_available(), 15, 0.1, "the gateway to see the broker again")
        task = upload(gw.stub, media("mmpose_demo_960x540_5f.mp4"), auth())
        assert task.state == tpb.TASK_STATE_RUNNING
    finally:
        gw.stop()
        broker.stop()


def test_sdk_wait_keeps_its_deadline_without_updates_and_returns_a_terminal_task(gateway):
    with Client(gateway.address, USERS["alice"]) as client:
        task = client.submit(media("mmpose_demo_960x540_5f.mp4"))  # no workers: it will not move
        t0 = time.monotonic()
        with pytest.raises(TimeoutError) as err:
            client.wait(task.task_id, timeout_s=2.0)
        assert 1.9 < time.monotonic() - t0 < 4.5 and "still running" in str(err.value)
        client.cancel(task.task_id)
        done = client.wait(task.task_id, timeout_s=2.0)  # terminal already: returned, not a timeout
        assert done.state == tpb.TASK_STATE_CANCELLED
