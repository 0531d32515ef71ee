"""What the benchmarks measure with: CPU seconds of process trees, Prometheus counters of the workers,
the bytes a task left on the broker, the broker's memory, and uploads timed through the SDK."""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from posemesh.client import Client
from posemesh.mesh import kafka
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb

TICK = os.sysconf("SC_CLK_TCK")
DONE = {tpb.TASK_STATE_COMPLETED, tpb.TASK_STATE_FAILED, tpb.TASK_STATE_CANCELLED}


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree[ppid].append(int(entry.name))
    return tree


def _cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def descendants(pid: int) -> list[int]:
    """Every live process below pid (not pid itself)."""
    tree = _children()
    found, todo = [], list(tree.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo += tree.get(p, [])
    return found


def process_cpu(pid: int) -> float:
    """CPU seconds used so far by one process (its threads, not its children)."""
    return _cpu(pid)


def _tree_sum(pid: int, measure) -> float:
    return sum(measure(p) for p in [pid, *descendants(pid)])


def tree_cpu(pid: int) -> float:
    """CPU seconds used so far by a process and every live descendant (Triton's Python-backend stubs)."""
    return _tree_sum(pid, _cpu)


def wakeups(pid: int) -> int:
    """Context switches so far of every thread of one process: how often it was put on a CPU. Each costs the
    kernel (and, in a VM, the host) a fixed price that varies with the host's load, so an idle process's CPU
    follows its wake-ups, and wake-ups compare across hours where CPU does not (bench/README.md, idle.py). Only
    live threads count: a thread that ends between two readings takes its switches with it (none on an idle stack)."""
    total = 0
    try:
        threads = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0
    for thread in threads:
        try:
            for line in (thread / "status").read_text().splitlines():
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
        except OSError:  # the thread ended meanwhile
            continue
    return total


def tree_wakeups(pid: int) -> float:
    """Context switches so far of a process and every live descendant (see wakeups)."""
    return _tree_sum(pid, wakeups)


def tree_rss(pid: int) -> float:
    """Resident MB of a process and every live descendant."""
    return _tree_sum(pid, rss_mb)


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def counters(url: str, name: str) -> dict[str, float]:
    """Samples of one Prometheus counter: {label text: value}."""
    out: dict[str, float] = {}
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key[len(name):] or "_"] = float(value)
    return out


def topic_bytes(bootstrap: str, topic: str, idle_s: float = 1.0) -> tuple[int, int, int]:
    """(records, bytes of record values, bytes of frame JPEGs) on a topic, read to its end."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{time.monotonic_ns()}",
                         "enable.auto.commit": False, "fetch.message.max.bytes": kafka.MAX_MESSAGE_BYTES})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return 0, 0, 0
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        records = size = jpeg = 0
        last = time.monotonic()
        while time.monotonic() - last < idle_s:
            for msg in consumer.consume(500, 0.2):
                if msg.error():
                    continue
                last = time.monotonic()
                records += 1
                size += len(msg.value())
                record = pb.StageRecord.FromString(msg.value())
                jpeg += len(record.frame.jpeg)
        return records, size, jpeg
    finally:
        consumer.close()


class Upload:
    """One upload through the SDK, timed: upload done, first annotated frame, end."""

    def __init__(self, client: Client, clip: Path, pose_model: str, outputs: list[str] | None = None):
        self.client, self.clip, self.pose_model, self.outputs = client, clip, pose_model, outputs
        self.t: dict[str, float] = {}
        self.step_first: dict[str, float] = {}
        self.task: tpb.Task | None = None
        self.error = ""  # why the upload or its watch failed, when it did
        self.thread = threading.Thread(target=self._record_failure)

    def _record_failure(self) -> None:
        try:
            self._run()
        except Exception as exc:  # noqa: BLE001 - reported by run_uploads with the others
            self.error = f"{exc.__class__.__name__}: {exc}"

    def _run(self) -> None:
        self.t["start"] = time.perf_counter()
        task = self.client.submit(self.clip, pose_model=self.pose_model, outputs=self.outputs)
        self.t["uploaded"] = time.perf_counter()
        for snapshot in self.client.watch(task.task_id):
            now = time.perf_counter()
            for step in snapshot.progress:  # when each step (decode, every stage) had its first frame
                if step.frames_done and step.stage not in self.step_first:
                    self.step_first[step.stage] = now
            if "annotate" in self.step_first and "first" not in self.t:
                self.t["first"] = self.step_first["annotate"]
            self.task = snapshot
            if snapshot.state in DONE:
                self.t["done"] = time.perf_counter()

    @property
    def frames(self) -> int:
        return max(p.frames_total for p in self.task.progress) if self.task else 0

    @property
    def first_latency(self) -> float:
        return self.t["first"] - self.t["uploaded"]

    @property
    def duration(self) -> float:
        return self.t["done"] - self.t["uploaded"]


def idle_between_bursts() -> None:
    """Wait as a stack between bursts of uploads does: the gateway makes its reserved task ids again once
    no task has started for a while and none runs (gateway/reservations.py), and the workers let go of ended
    tasks in the same join."""
    from posemesh.mesh.settings import Settings

    time.sleep(Settings().reserve_quiet_s + 3.0)


def run_uploads(client: Client, clip: Path, n: int, pose_model: str,
                outputs: list[str] | None = None) -> tuple[list[Upload], float]:
    """n uploads at once (`outputs`: the artifacts asked for, all by default); returns them and the wall
    time from the first start to the last end."""
    uploads = [Upload(client, clip, pose_model, outputs) for _ in range(n)]
    for u in uploads:
        u.thread.start()
    for u in uploads:
        u.thread.join()
    bad = [u.task.error_message if u.task else (u.error or "no task") for u in uploads
           if not u.task or u.task.state != tpb.TASK_STATE_COMPLETED]
    if bad:
        raise RuntimeError(f"uploads failed: {bad}")
    return uploads, max(u.t["done"] for u in uploads) - min(u.t["start"] for u in uploads)
