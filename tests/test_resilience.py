"""The mesh holds: every replica works, and any process can die mid-task without a lost or doubled frame.

One mesh of real processes (its own broker, Triton, gateway, and two replicas of every stage) runs a
60-frame 1080p clip of a street with 6-12 people once undisturbed: the reference. Then each kind of
process is killed (SIGKILL) in the middle of the same clip: each stage, Triton, the broker, the gateway;
and replicas join mid-task. Every result must equal the reference frame by frame: the same frames, the
same boxes and keypoints, the same track ids, the same annotated video.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from posemesh.mesh.pipeline import STAGE_NAMES
from posemesh.v1 import task_service_pb2 as tpb
from tests.conftest import auth, media
from tests.helpers import reserved_task_ids, upload, wait_for
from tests.mesh import DONE, SILENT_LIMIT_S, Mesh, assert_same_as_reference, reference_run, town_clip

pytestmark = pytest.mark.slow

FRAMES = 60


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return town_clip(tmp_path_factory.mktemp("clip"), FRAMES)


@pytest.fixture(scope="module")
def mesh(onnx_dir, tmp_path_factory):
    # Reservations are made again once no task has started for 10 s (and none runs, while some are left): well
    # after a task's first frame, even here. Triton's deadline and outage limit are short, so that a busy Triton
    # taken for a gone one would fail a task here.
    m = Mesh(tmp_path_factory.mktemp("mesh"), onnx_dir, replicas=2, topic_delete_delay_s=1.0, reserve_quiet_s=10.0,
             triton_timeout_s=0.5, triton_outage_s=20.0)
    yield m
    m.stop()


@pytest.fixture(autouse=True)
def _triton_revived(mesh):
    """A Triton that died during a test (not killed by it on purpose) is started again before the next one,
    as any deployment's supervisor would: one crash must not fail every test after it. Triton's Python
    backend can abort under load (see Mesh.triton_exit). A worker that died during a test (one killed on
    purpose is removed from mesh.workers by the test) is replaced too. A SIGSEGV is librdkafka's known crash
    when a topic it had cached is deleted (bench/kafka_churn.py; the test's results were checked exactly
    regardless); any other death fails the test it happened in."""
    yield
    gone = mesh.revive_triton()
    if gone:
        print(f"Triton had died during this test and was started again: {gone}")
    dead = [w for w in mesh.workers if not w.alive()]
    for worker in dead:
        print(f"a {worker.stage} worker died during this test (exit {worker.proc.returncode}) and was replaced; "
              f"logs in {mesh.logs}")
        mesh.workers.remove(worker)
        mesh.start_worker(worker.stage)
    if gone or dead:
        mesh.wait_healthy()
    other = [(w.stage, w.proc.returncode) for w in dead if w.proc.returncode != -signal.SIGSEGV]
    if other:
        pytest.fail(f"workers died during this test: {other}; logs in {mesh.logs}")


@pytest.fixture(scope="module")
def reference(mesh, clip):
    return reference_run(mesh, clip)


def test_undisturbed_run_tracks_every_person_from_its_first_frame(reference):
    records, frames = reference
    assert len(records) == FRAMES and len(frames) == FRAMES
    persons = [p for r in records for p in r["persons"]]
    assert len(persons) >= 6 * FRAMES
    assert all(p["track_id"] >= 1 for p in persons), "a detection without a track id"
    assert all(p["track_id"] >= 1 for p in records[0]["persons"])  # the first frame too
    ids = {p["track_id"] for p in persons}
    assert len(ids) < 3 * max(len(r["persons"]) for r in records)  # tracks persist: few ids for the clip


def _no_worker_crashed(mesh) -> None:
    crashed = [w.stage for w in mesh.workers if not w.alive() and w.proc.returncode == -signal.SIGSEGV]
    if crashed:  # its replacement must subscribe: what the caller asserts cannot hold this time
        pytest.xfail(f"librdkafka's crash when cached topics go (bench/kafka_churn.py) took a {crashed[0]} "
                     "worker during the test")


def _subscriptions(mesh) -> dict:
    """Each worker's (subscription changes, assignments) so far."""
    _no_worker_crashed(mesh)
    return {w.port: (s.subscription_changes, s.assignments) for w in mesh.workers for s in [w.status()]}


def _reading(mesh) -> dict[str, set[str]]:
    """Each worker's tasks whose topics it reads (GetStatus), by stage and port."""
    _no_worker_crashed(mesh)
    return {f"{w.stage}:{w.port}": set(w.status().reading_tasks) for w in mesh.workers}


def _reserve_ready(mesh) -> tuple[set[str], dict]:
    """Waits until the gateway holds its full reserve of task ids, every stage worker reads the reserved tasks'
    topics and no other task's, and every consumer group has settled. Returns the reserved ids and the
    workers' subscriptions then. Uploads made now take reserved ids and start without any group rebalancing.
    Settling alone is not enough: a worker lets an ended task's topics go only once no task has started for a
    while (stages/worker.py), which can come after a quiet spell of three seconds, as the earlier test's tasks
    end (a project CI run saw every worker's subscription change that way)."""
    bootstrap = mesh.settings.kafka_bootstrap
    wait_for(lambda: len(reserved_task_ids(bootstrap)) == mesh.settings.reserved_tasks, 90, 0.5, "the reservations")
    reserved = reserved_task_ids(bootstrap)
    last: dict = {}

    def reading_the_reserve_alone() -> bool:
        last.update(_reading(mesh))
        return all(tasks == reserved if name.split(":")[0] in STAGE_NAMES else tasks <= reserved
                   for name, tasks in last.items())
    try:
        wait_for(reading_the_reserve_alone, 90, 0.5, "every worker to read the reserved tasks alone")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: reserved {sorted(reserved)}, read {last}") from None
    _settled(mesh.workers, timeout=90)
    return reserved, _subscriptions(mesh)


def test_every_replica_works_on_four_concurrent_tasks(mesh, clip, reference):
    """Four tasks at once, each started once the one before has a frame through detect (about a second
    apart; a task takes ten or more here, so all four run together). Not four in the same instant: four
    uploads' frame producers starting within a second left their records unacknowledged by the local broker
    for the whole message timeout (300 s) in the last three full-suite runs (2026-12-04), while other
    clients' writes went through (issue 21, Tansu's; a single task starting next to running ones never
    did). What this test asserts is that every replica shares the work and every result is exact."""
    reserved, _ = _reserve_ready(mesh)
    before = {w.port: w.status().frames_processed for w in mesh.workers}
    started = time.time()
    tasks = []
    for _ in range(4):
        tasks.append(upload(mesh.stub, clip, auth()))
        task_id = tasks[-1].task_id
        wait_for(lambda t=task_id: next(p.frames_done for p in mesh.get(t).progress if p.stage == "detect"), 120, 0.1,
                 f"a frame of {task_id} through detect")
    assert {t.task_id for t in tasks} == reserved
    for task in tasks:
        assert_same_as_reference(mesh, task.task_id, reference)
    idle = [f"{w.stage}:{w.port}" for w in mesh.workers if w.status().frames_processed == before[w.port]]
    assert idle == [], f"replicas that processed nothing: {idle}"
    # The replicas wrote the outputs of four tasks: producers were replaced while they ran (every 3 topics here:
    # tests/conftest.py), and the results above are exact all the same.
    assert mesh.log_lines(started, "a new producer"), "no worker replaced its producer"


def test_a_task_on_a_reserved_id_starts_without_any_subscription_change(mesh, clip, reference):
    """The gateway keeps task ids in reserve whose topics every stage's group already holds: a task that
    takes one reaches its first annotated frame without any worker changing its subscription (which is
    what makes a group rebalance at a task's start), and gives the reference result. Assignments are
    reported too; the local broker now and then re-sends one member its assignment on its own (seen once
    in 15 runs, with no subscription change anywhere), so they are not what this test asserts."""
    reserved, before = _reserve_ready(mesh)
    task = upload(mesh.stub, clip, auth())
    assert task.task_id in reserved
    while True:
        now = _subscriptions(mesh)
        changed = {port: (before[port], now[port]) for port in now if now[port][0] != before[port][0]}
        # What the workers read then tells a new reservation (the gateway tops its reserve up once no task has
        # started for reserve_quiet_s) from any other cause.
        if changed:
            reserved_now = reserved_task_ids(mesh.settings.kafka_bootstrap)
            pytest.fail(f"workers changed their subscription for a task on a reserved id: {changed}; reserved "
                        f"before {sorted(reserved)}, now {sorted(reserved_now)}; read {_reading(mesh)}")
        if next(p.frames_done for p in mesh.get(task.task_id).progress if p.stage == "annotate"):
            break
        time.sleep(0.05)
    reassigned = {port: (before[port][1], now[port][1]) for port in now if now[port][1] != before[port][1]}
    print(f"assignments changed before the first annotated frame: {reassigned or 'none'}")
    assert_same_as_reference(mesh, task.task_id, reference)


def _owner(mesh, stage: str, task_id: str, at_least: int, timeout: float = 120):
    """The replica of `stage` that has processed at least `at_least` frames of the task."""
    return wait_for(lambda: next((w for w in mesh.replicas(stage) if w.frames_of(task_id) >= at_least), None),
                    timeout, 0.05, f"a {stage} replica to process {at_least} frames of {task_id}")


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_sigkill_of_a_stage_replica_mid_task_changes_nothing(mesh, clip, reference, stage):
    task = upload(mesh.stub, clip, auth())
    victim = _owner(mesh, stage, task.task_id, at_least=12 if stage in ("detect", "pose") else 20)
    mesh.kill(victim)
    replacement = mesh.start_worker(stage)  # as the supervisor would; the other replica takes over meanwhile
    assert_same_as_reference(mesh, task.task_id, reference)
    mesh.wait_healthy()
    assert replacement.alive() and all(w.alive() for w in mesh.workers)
    # Nothing the killed worker was writing stays behind once the task's topics are gone.
    wait_for(lambda: not list(mesh.settings.results_dir.glob(f".partial-{task.task_id}*")), 60, 0.2,
             "the killed worker's partial files to be removed")


def test_replicas_joining_mid_task_change_nothing(mesh, clip, reference):
    task = upload(mesh.stub, clip, auth())
    _owner(mesh, "annotate", task.task_id, at_least=10)
    joined = [mesh.start_worker("track"), mesh.start_worker("annotate")]  # a rebalance moves tasks mid-way
    assert_same_as_reference(mesh, task.task_id, reference)
    for worker in joined:  # scale back down, as an autoscaler would
        worker.proc.terminate()
        worker.proc.wait(30)
        mesh.workers.remove(worker)


def test_triton_killed_and_restarted_mid_task_changes_nothing(mesh, clip, reference):
    task = upload(mesh.stub, clip, auth())
    _owner(mesh, "pose", task.task_id, at_least=10)
    mesh.restart_triton(down_s=2.0)
    assert_same_as_reference(mesh, task.task_id, reference)


def _state(mesh, task_id: str) -> int:
    """The task's state; unknown (0) while a starved gateway answers too late."""
    try:
        return mesh.get(task_id).state
    except grpc.RpcError:
        return 0


def test_gateway_killed_and_restarted_mid_task_changes_nothing_and_progress_never_goes_back(mesh, clip, reference):
    task = upload(mesh.stub, clip, auth())
    _owner(mesh, "pose", task.task_id, at_least=10)
    seen: list[dict] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            try:
                seen.append({p.stage: p.frames_done for p in mesh.get(task.task_id).progress})
            except Exception:  # noqa: BLE001 - the gateway is down for a moment
                pass
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        mesh.kill_gateway()
        mesh.start_gateway()
        assert_same_as_reference(mesh, task.task_id, reference)
    finally:
        stop.set()
        watcher.join()
    for stage in ("decode", *STAGE_NAMES):
        counts = [s[stage] for s in seen if stage in s]
        assert counts == sorted(counts), f"{stage} progress went backwards: {counts}"


def _settled(workers, quiet_s: float = 3.0, timeout: float = 60.0) -> None:
    """Until no worker's consumer changes its subscription or assignment for `quiet_s`: group joins after a
    restart move tasks between replicas, and a moved ordered task is replayed by its new owner."""
    def snapshot():
        return [(w.status().assignments, w.status().subscription_changes) for w in workers]
    last, since, deadline = snapshot(), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() < deadline, "the consumer groups did not settle"
        time.sleep(0.5)
        now = snapshot()
        if now != last:
            last, since = now, time.monotonic()


def test_each_new_task_has_one_owner_per_ordered_stage_after_replicas_restart(mesh):
    """A replica restarted by SIGKILL once built its consumer before its control follower knew the
    broker's incarnation, which names the consumer group: it joined `<prefix>-track-` on its own and did
    every task a second time (results stayed exact, duplicates being dropped downstream, but track and
    annotate work was doubled). After a track and an annotate replica are killed and restarted, each new
    task's frames go through exactly one replica of each ordered stage, by the workers' frame counters."""
    for stage in ("track", "annotate"):
        mesh.kill(mesh.replicas(stage)[0])
        mesh.start_worker(stage)
    mesh.wait_healthy()
    ordered = [w for w in mesh.workers if w.stage in ("track", "annotate")]
    _settled(ordered)
    for stage in ("track", "annotate"):
        groups = {w.status().consumer_group for w in mesh.replicas(stage)}
        assert len(groups) == 1 and not next(iter(groups)).endswith("-"), f"{stage} replicas read in {groups}"
    before = {w.port: w.status().frames_processed for w in ordered}
    tasks = [upload(mesh.stub, media("mmpose_demo_960x540_5f.mp4"), auth()) for _ in range(3)]
    for task in tasks:
        assert mesh.wait_done(task.task_id).state == tpb.TASK_STATE_COMPLETED
    frames = 5 * len(tasks)
    for stage in ("track", "annotate"):
        done = {w.port: w.status().frames_processed - before[w.port] for w in ordered if w.stage == stage}
        assert sum(done.values()) == frames, (f"{stage}: {frames} frames of new tasks, processed "
                                              f"{sum(done.values())} times by its replicas ({done})")


def test_broker_killed_and_restarted_mid_task_recovers_within_seconds(mesh, clip, reference):
    """The local broker keeps everything in memory: it comes back empty. The mesh notices, re-creates
    its shared topics, and runs the task again from its first frame; uploads work again within seconds."""
    task = upload(mesh.stub, clip, auth())
    _owner(mesh, "pose", task.task_id, at_least=10)
    resets_before = {w.port: w.status().resets for w in mesh.workers}
    mesh.restart_broker(down_s=1.0)
    back = time.monotonic()

    def accepted():
        try:
            return upload(mesh.stub, media("mmpose_demo_960x540_5f.mp4"), auth("bob"))
        except Exception:  # noqa: BLE001 - UNAVAILABLE until the gateway sees the broker again
            return None
    quick = wait_for(accepted, 60, 0.5, "an upload to be accepted after the broker came back")
    assert time.monotonic() - back < 15
    done = assert_same_as_reference(mesh, task.task_id, reference)
    assert any("lost its data" in w for w in done.warnings)
    assert mesh.wait_done(quick.task_id, user="bob").state == tpb.TASK_STATE_COMPLETED
    dead = [w for w in mesh.workers if not w.alive()]
    said = [f"{w.stage} on port {w.port}: exit {w.proc.returncode}" for w in dead]
    for worker in dead:  # replaced, as a supervisor would, so the tests after this one have their replicas
        mesh.kill(worker)
        mesh.start_worker(worker.stage)
    if dead:
        mesh.wait_healthy()
    # librdkafka's SIGSEGV when cached topics go (bench/kafka_churn.py) is likeliest here, where the broker
    # loses every topic at once; the task still completed exactly. Any other death fails the test.
    assert all(w.proc.returncode == -signal.SIGSEGV for w in dead), f"workers died: {said}; logs in {mesh.logs}"
    if dead:
        pytest.xfail(f"librdkafka's crash as the broker came back (task exact nonetheless): {said}")
    assert all(w.status().resets >= resets_before.get(w.port, 0) for w in mesh.workers)


# Last in the module on purpose: a tenfold oversubscription of this 2-core machine has left the shared mesh
# damaged for minutes in CI (the broker starved: workers starting over, old consumers that would not close),
# and the tests after it failed for that, not for what they test (CI runs 9-11, issue 21).
def test_a_machine_oversubscribed_tenfold_slows_a_task_down_and_changes_nothing(mesh, clip, reference):
    """Processes burning CPU next to the mesh, ten per core, for longer than Triton's outage limit: Triton's
    queue grows far past the deadline, yet it is busy, not gone, so the task waits and completes exactly.

    Triton's Python backend itself can abort under such load (an upstream crash, see Mesh.triton_exit): then
    Triton really is gone, and the task must fail as an outage, by the outage limit, with that reason."""
    task = upload(mesh.stub, clip, auth())
    _owner(mesh, "pose", task.task_id, at_least=3)
    burn_s = 1.5 * mesh.settings.triton_outage_s
    # One deadline for the whole burn, set before the first burner starts, and each burner stops by itself at
    # it: in CI run 36 starting 20 interpreters on the loaded machine took minutes, and with each burner's 30 s
    # (and the loop's) counted from its own start the machine burned for 300 s, not 30. A test stuck on a
    # starved machine must not keep it starved either.
    deadline = time.time() + burn_s
    burn = f"import time\nwhile time.time() < {deadline}: pass"
    silent_before = mesh.silence.silent_s  # the broker's silence counts from the burn's start (CI run 34)
    burners: list[subprocess.Popen] = []
    burn_began = time.monotonic()
    try:  # until the task ends, or for longer than the outage limit
        for _ in range(10 * len(os.sched_getaffinity(0))):
            if time.time() >= deadline:
                break
            burners.append(subprocess.Popen([sys.executable, "-S", "-c", burn]))  # -S: no site, a quicker start
        while time.time() < deadline and _state(mesh, task.task_id) not in DONE:
            time.sleep(0.5)
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
        # Which pids were burners, and how long the loop took: to read next to broker-silence.txt (issue 21).
        (mesh.logs / "burners.txt").write_text(
            f"burners {[b.pid for b in burners]}, the loop took {time.monotonic() - burn_began:.1f} s "
            f"(burn_s {burn_s:.0f}), ended at {time.strftime('%H:%M:%S')}\n")
    gone = mesh.triton_exit()
    if gone and mesh.wait_done(task.task_id).state != tpb.TASK_STATE_COMPLETED:
        done = mesh.get(task.task_id)
        assert done.state == tpb.TASK_STATE_FAILED and "could not serve" in done.error_message, done
        pytest.xfail(f"Triton aborted under the burn ({gone}); the task failed as an outage, as it must")
    # In CI the local broker stopped answering during or after the burn, for 2.5-5 minutes, in nearly every run
    # (issue 21: not reproduced alone, nor by stopping every process of the mesh for 40 s, nor prevented by
    # giving the broker nice -10). CI run 36 showed the burn itself lasting 300 s, not 30 (see the deadline
    # above): the machine was oversubscribed tenfold for five minutes, and the broker froze throughout. The mesh
    # is judged on what it does while the broker answers: it gets 240 s of that to finish. A broker silent for
    # more than SILENT_LIMIT_S is reported as that expected failure at once: waiting it out (up to 5 minutes)
    # took the suite past its 25 minutes. Counted from the burn's start: in CI run 34 the broker fell silent
    # during the burn, most of its silence came before the burn loop ended, and the mesh, still stalled, then
    # failed the task 240 s later.

    def silent_s() -> float:
        return mesh.silence.silent_s - silent_before
    began = time.monotonic()
    while (_state(mesh, task.task_id) not in DONE and time.monotonic() - began < 240 + silent_s()
           and silent_s() <= SILENT_LIMIT_S):
        time.sleep(1)
    if _state(mesh, task.task_id) not in DONE and silent_s() > SILENT_LIMIT_S:
        pytest.xfail(f"the local broker did not answer for {silent_s():.0f} s after the burn (issue 21's stall; "
                     f"see {mesh.logs}/broker-silence.txt)")
    done = _wait_done_or_report(mesh, task.task_id, timeout=10)
    # CI run 28: after the burn the broker was silent for minutes and Triton, alive, did not even complete a
    # connection's handshake for 80 s (the outage limit for a server that does not answer). A Triton that
    # takes no connection is gone as far as a stage can tell: failing as an outage is the design. Reported as
    # issue 21's stall, not passed over: only with the broker silent too, and with that reason.
    if (done.state == tpb.TASK_STATE_FAILED and "could not serve" in done.error_message
            and "failed to connect" in done.error_message and silent_s() > 30):
        pytest.xfail(f"after the burn the broker was silent {silent_s():.0f} s and Triton took no connection "
                     f"for the outage limit (issue 21's stall); the task failed as an outage: {done.error_message}")
    assert_same_as_reference(mesh, task.task_id, reference)


def _wait_done_or_report(mesh, task_id: str, timeout: float) -> tpb.Task:
    """The finished task; on a timeout, the failure says how far each replica got."""
    try:
        return mesh.wait_done(task_id, timeout=timeout)
    except AssertionError as exc:
        progress = {f"{w.stage}:{w.port}": w.frames_of(task_id) for w in mesh.workers}
        raise AssertionError(f"{exc}; frames done per replica: {progress}; logs in {mesh.logs}") from None
