"""The flows (stages/flows.py) as pure logic: what an ordered and an unordered stage do with frames, failures,
ends of stream and commits, with a stand-in stage and reader (the worker's Kafka side is tested on the real
broker in tests/test_runtime.py and end to end in tests/test_pipeline.py)."""

from __future__ import annotations

import pytest

from posemesh.stages.base import FrameItem, Recovery, ServiceUnavailable, Stage, StageError, TaskInfo
from posemesh.stages.flows import OrderedFlow, ResumeFlow, UnorderedFlow, flow_for
from posemesh.stages.pools import Pooled
from posemesh.stages.triton import TritonUnavailable
from posemesh.v1 import pipeline_pb2 as pb

A, B = "a" * 32, "b" * 32


class FakeStage(Stage):
    """Fails a frame whose index is in `bad` (per task), or every call while `unavailable` is set."""

    def __init__(self, name: str):
        self.name = name
        self.calls: list[list[tuple[str, int]]] = []
        self.bad: set[tuple[str, int]] = set()
        self.unavailable = ""
        self.durable: dict[str, int] = {}
        self.resume_at = 0
        self.finished: list[str] = []

    def process(self, items: list[FrameItem]) -> None:
        self.calls.append([(i.task_id, i.frame.index) for i in items])
        if self.unavailable:
            raise ServiceUnavailable(self.unavailable)
        for item in items:
            if (item.task_id, item.frame.index) in self.bad:
                raise StageError(f"bad frame {item.frame.index}")

    def finish_task(self, task: TaskInfo) -> pb.TaskResult:
        self.finished.append(task.task_id)
        return pb.TaskResult(task_id=task.task_id)

    def resume_index(self, task: TaskInfo) -> int:
        return self.resume_at

    def durable_index(self, task_id: str) -> int:
        return self.durable.get(task_id, -1)


class FakeReader:
    def __init__(self) -> None:
        self.marked: list[tuple[tuple[str, int], int]] = []
        self.commits = 0
        self.flow_controlled: list = []
        self.owned: set[tuple[str, int]] = set()
        self.positions: dict[tuple[str, int], int] = {}
        self.polled_only: list[set] = []

    def poll(self, max_messages: int, timeout: float) -> list:
        return []

    def poll_only(self, tps: set, max_messages: int, timeout: float) -> list:
        self.polled_only.append(set(tps))
        return []

    def done(self, tp, offset: int) -> None:
        self.marked.append((tp, offset))

    def commit(self) -> None:
        self.commits += 1

    def flow_control(self, waiting, cap: int) -> None:
        self.flow_controlled.append((dict(waiting), cap))


class Harness:
    def __init__(self, name: str, batch: int = 8):
        self.stage = FakeStage(name)
        self.failures: dict[str, str] = {}
        self.sent: list[pb.StageRecord] = []
        self.tasks: dict[str, TaskInfo] = {}
        self.reader = FakeReader()
        self.flow = flow_for(self.stage, batch, self.fail, self.sent.append, lambda _t: True)

    def fail(self, task_id: str, message: str) -> None:  # as the worker's _fail: report, then drop
        self.failures.setdefault(task_id, message)
        self.flow.task_failed(task_id, self.reader)
        self.tasks.pop(task_id, None)
        self.flow.drop_task(task_id)

    def task(self, task_id: str) -> TaskInfo:
        return self.tasks.setdefault(task_id, TaskInfo(task_id, epoch=1))

    def entry(self, task_id: str, index: int, partition: int = 0) -> Pooled:
        return Pooled(FrameItem(self.task(task_id), pb.Frame(index=index)), (f"yolox_{task_id}", partition),
                      100 + index)

    def end_of_stream(self, task_id: str, total: int, offset: int = 999) -> None:
        task = self.task(task_id)
        task.total = total
        record = pb.StageRecord(task_id=task_id, epoch=1, end_of_stream=pb.EndOfStream(total_frames=total))
        self.flow.end_of_stream(record, (f"yolox_{task_id}", 0), offset)

    def step(self) -> list[Pooled]:
        """The worker's step, less Kafka: take, run, note what is done, end the step, commit."""
        ready = self.flow.take()
        done = self.flow.run(ready) if ready else []
        for entry in done:
            self.flow.processed(entry)
        self.results = self.flow.end_step(self.tasks)
        self.flow.commit(self.reader)
        return done


def test_each_stage_gets_the_flow_of_its_pipeline_entry():
    assert type(Harness("detect").flow) is UnorderedFlow
    assert type(Harness("pose").flow) is UnorderedFlow
    assert type(Harness("track").flow) is OrderedFlow
    assert type(Harness("annotate").flow) is ResumeFlow


def test_triton_unavailable_is_the_runtime_s_service_unavailable():
    assert issubclass(TritonUnavailable, ServiceUnavailable) and issubclass(ServiceUnavailable, StageError)


def test_unordered_failure_is_narrowed_down_to_a_task_and_frame():
    h = Harness("detect")
    h.stage.bad = {(A, 2)}
    for i in range(4):
        for task_id in (A, B):
            assert h.flow.add(h.entry(task_id, i))
    assert [e.index for e in h.step()] == [0, 0]  # a new task's first frame goes alone
    h.reader.marked.clear()
    h.stage.calls.clear()
    done = h.step()
    assert h.failures == {A: "frame 2: bad frame 2"}
    assert sorted((e.item.task_id, e.index) for e in done) == [(A, 1), (B, 1), (B, 2), (B, 3)]
    assert h.stage.calls[0] == [(A, 1), (B, 1), (A, 2), (B, 2), (A, 3), (B, 3)]  # the whole batch first
    assert h.reader.marked == [(e.tp, e.offset) for e in done]  # what is done, after the flush
    assert h.reader.commits == 2 and h.reader.flow_controlled[-1] == ({}, 2)


def test_unordered_service_unavailable_fails_every_task_of_the_batch_without_retries():
    h = Harness("pose")
    h.stage.unavailable = "Triton gone"
    for task_id in (A, B):
        h.flow.add(h.entry(task_id, 0))
    assert h.step() == []
    assert h.failures == {A: "Triton gone", B: "Triton gone"}
    assert len(h.stage.calls) == 1


def test_unordered_end_of_stream_is_passed_on_with_the_step_and_done_after_the_flush():
    h = Harness("detect")
    h.end_of_stream(A, total=10, offset=55)
    assert h.sent == [] and h.flow.to_mark == []
    results = h.flow.end_step(h.tasks)
    assert results == [] and [r.end_of_stream.total_frames for r in h.sent] == [10]
    assert h.reader.marked == []  # not before the flush
    h.flow.commit(h.reader)
    assert h.reader.marked == [((f"yolox_{A}", 0), 55)]


def test_unordered_revocation_drops_only_the_partitions_waiting_frames():
    h = Harness("detect")
    h.flow.add(h.entry(A, 1, partition=0))
    h.flow.add(h.entry(A, 2, partition=1))
    assert h.flow.revoked({(f"yolox_{A}", 1)}) == set()
    assert h.flow.pool.pooled() == 1
    assert h.flow.add(h.entry(A, 2, partition=1))  # not a duplicate should it come back
    assert h.flow.raw_partitions(1, 4) == [1]


def test_unordered_reads_a_started_task_s_silent_partitions_first_with_small_batches():
    h = Harness("detect", batch=8)
    new, flowing = (f"raw_frames_{A}", 0), (f"raw_frames_{B}", 0)
    h.reader.owned, h.reader.positions = {new, flowing}, {flowing: 5}
    h.flow.poll(h.reader)
    assert h.reader.polled_only == [{new}] and h.flow.batch_now == 2
    h.reader.positions[new] = 1  # its first frame came
    h.flow.poll(h.reader)
    assert h.reader.polled_only == [{new}] and h.flow.batch_now == 8


def test_ordered_frames_run_one_by_one_and_a_failing_frame_stops_its_task_only():
    h = Harness("track")
    h.stage.bad = {(A, 1)}
    for task_id in (A, B):
        h.flow.task_started(h.task(task_id))
        for i in range(3):
            h.flow.add(h.entry(task_id, i))
    done = h.step()
    assert all(len(call) == 1 for call in h.stage.calls)
    assert (A, 2) not in [c[0] for c in h.stage.calls]  # skipped after its task failed
    assert sorted((e.item.task_id, e.index) for e in done) == [(A, 0), (B, 0), (B, 1), (B, 2)]
    assert h.failures == {A: "frame 1: bad frame 1"}


def test_ordered_service_unavailable_names_no_frame():
    h = Harness("track")
    h.stage.unavailable = "Triton gone"
    h.flow.task_started(h.task(A))
    h.flow.add(h.entry(A, 0))
    h.step()
    assert h.failures == {A: "Triton gone"}


def test_ordered_end_of_stream_is_held_until_the_task_finishes():
    h = Harness("track")
    h.flow.task_started(h.task(A))
    h.end_of_stream(A, total=2, offset=77)
    h.flow.add(h.entry(A, 0))
    h.step()
    assert h.stage.finished == [] and h.sent == []
    assert ((f"yolox_{A}", 0), 77) not in h.reader.marked
    h.flow.add(h.entry(A, 1))
    h.step()
    assert h.stage.finished == [A] and [r.task_id for r in h.results] == [A] and h.results[0].epoch == 1
    assert [(r.end_of_stream.total_frames, r.epoch) for r in h.sent] == [(2, 1)]  # the stage's own end of stream
    assert ((f"yolox_{A}", 0), 77) in h.reader.marked
    assert not h.flow.add(h.entry(A, 1))  # a redelivered frame of a finished task is a duplicate
    h.step()
    assert h.stage.finished == [A]  # finished once


def test_ordered_task_state_goes_when_its_partition_moves_either_way():
    h = Harness("track")
    tp = (f"rtmpose_{A}", 0)
    assert h.flow.revoked({tp, ("posemesh.idle", 0)}) == {A}
    assert h.flow.assigned({tp}) == {A}
    assert h.flow.raw_partitions(0, 3) == [0, 1, 2]


def test_resume_holds_inputs_until_the_checkpoint_covers_them():
    h = Harness("annotate")
    h.stage.resume_at = 5
    h.flow.task_started(h.task(A))
    assert not h.flow.add(h.entry(A, 4))  # before the checkpoint
    for i in (5, 6, 7):
        h.flow.add(h.entry(A, i))
    h.step()
    assert h.reader.marked == []  # processed, not durable yet
    h.stage.durable[A] = 6
    h.flow.commit(h.reader)
    assert [offset for _tp, offset in h.reader.marked] == [105, 106]
    h.end_of_stream(A, total=8, offset=88)
    h.step()
    assert h.stage.finished == [A] and h.sent == []  # annotate writes no topic
    assert [offset for _tp, offset in h.reader.marked] == [105, 106, 107, 88]


def test_resume_a_failed_task_s_held_inputs_are_done_at_once():
    h = Harness("annotate")
    h.flow.task_started(h.task(A))
    h.flow.processed(h.entry(A, 0))
    h.fail(A, "disk full")  # a failed task is not redone
    assert h.reader.marked == [((f"yolox_{A}", 0), 100)]


def test_an_unordered_stage_cannot_resume():
    class Odd(FakeStage):
        @property
        def recovery(self) -> Recovery:
            return Recovery.RESUME

    with pytest.raises(ValueError):
        flow_for(Odd("detect"), 4, lambda *_: None, lambda _r: None, lambda _t: True)
