"""Small helpers for tests: uploading, waiting, reading topics."""

from __future__ import annotations

import hashlib
import io
import time
from pathlib import Path

from confluent_kafka import Consumer, TopicPartition

from posemesh.mesh import kafka
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb


def upload_requests(data: bytes, file_name: str = "clip.mp4", chunk: int = 256 * 1024, options=None, key=""):
    yield tpb.UploadRequest(metadata=tpb.UploadMetadata(file_name=file_name, options=options or tpb.TaskOptions(),
                                                        idempotency_key=key))
    for i in range(0, len(data), chunk):
        yield tpb.UploadRequest(chunk=data[i:i + chunk])


def upload(stub, path: Path, metadata, **kw) -> tpb.Task:
    return stub.Upload(upload_requests(path.read_bytes(), path.name, **kw), metadata=metadata).task


# A sleep of wait_for's that overran by more than this: the test's process (on a shared CI host, the whole VM) stood
# still meanwhile, and so, most likely, did the mesh it waits on (CI run 135: every process of the mesh and the tests
# paused twice for 60 s at once, and a 120 s wait for a task's first frame ran out in it).
HOST_PAUSE_S = 1.0
_clock, _sleep = time.monotonic, time.sleep  # tests/test_pauses.py gives wait_for a clock of its own


def wait_for(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    """The predicate's first true value, asked every `interval` for `timeout` seconds of time that the test's process
    ran: a pause of it (its host stood still) does not count against the timeout."""
    deadline, paused = _clock() + timeout, 0.0
    while True:
        value = predicate()
        if value:
            return value
        if _clock() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f" ({paused:.1f} s of pauses of this process not counted)" if paused else ""))
        before = _clock()
        _sleep(interval)
        late = _clock() - before - interval
        if late > HOST_PAUSE_S:
            deadline, paused = deadline + late, paused + late


def wait_state(stub, task_id: str, metadata, states, timeout: float = 120.0) -> tpb.Task:
    def check():
        task = stub.GetTask(tpb.GetTaskRequest(task_id=task_id), metadata=metadata).task
        return task if task.state in states else None
    return wait_for(check, timeout, what=f"task {task_id} to reach {states}")


def topics(bootstrap: str) -> set[str]:
    from confluent_kafka.admin import AdminClient

    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics)


def control_events(bootstrap: str) -> list[pb.ControlEvent]:
    """Every control event on posemesh.control, in order (tombstones left out: kafka.control_records)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-control", "enable.auto.commit": False})
    events: list[pb.ControlEvent] = []
    try:
        _low, high = consumer.get_watermark_offsets(TopicPartition(kafka.CONTROL_TOPIC, 0), timeout=10)
        consumer.assign([TopicPartition(kafka.CONTROL_TOPIC, 0, 0)])
        deadline, last = time.monotonic() + 20, -1
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                if last >= high - 1:  # the local broker's high mark points at the last batch's start
                    break
                continue
            if msg.error():
                continue
            last = msg.offset()
            if msg.value() is not None:
                events.append(pb.ControlEvent.FromString(msg.value()))
    finally:
        consumer.close()
    return events


def reserved_task_ids(bootstrap: str) -> set[str]:
    """Task ids the gateway holds in reserve (TaskReserved on posemesh.control, not started or ended since):
    their topics exist before any task does (gateway/reservations.py)."""
    reserved: set[str] = set()
    for event in control_events(bootstrap):
        if event.HasField("reserved"):
            reserved.add(event.task_id)
        elif event.HasField("started") or event.HasField("ended"):
            reserved.discard(event.task_id)
    return reserved


def ended_task_ids(bootstrap: str) -> set[str]:
    """Task ids whose TaskEnded is on posemesh.control."""
    return {event.task_id for event in control_events(bootstrap) if event.HasField("ended")}


def reserved_topics(bootstrap: str) -> set[str]:
    return {t for task_id in reserved_task_ids(bootstrap) for t in kafka.task_topics(task_id)}


def read_topic(bootstrap: str, topic: str, until_eos: bool = True, timeout: float = 60.0) -> list[pb.StageRecord]:
    """Every record of a topic, read without a consumer group (assign), in partition order."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-reader", "enable.auto.commit": False,
                         "fetch.message.max.bytes": kafka.MAX_MESSAGE_BYTES})
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    records: list[pb.StageRecord] = []
    deadline = time.monotonic() + timeout
    total = None
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                if total is not None and sum(r.HasField("frame") for r in records) >= total:
                    break
                if not until_eos and records:
                    break
                continue
            if msg.error():
                continue
            record = pb.StageRecord.FromString(msg.value())
            records.append(record)
            if record.HasField("end_of_stream"):
                total = record.end_of_stream.total_frames
    finally:
        consumer.close()
    return records


def make_clip(src: Path, dst: Path, frames: int, fps: int | None = None, rotation: int = 0) -> Path:
    """The first `frames` frames of a real clip, re-encoded as H.264 (a shorter real video for a test);
    `rotation` (degrees counter-clockwise) is written as the container's display matrix, as phones do."""
    import av

    with av.open(str(src)) as inp, av.open(str(dst), "w") as out:
        stream_in = inp.streams.video[0]
        stream = out.add_stream("libx264", rate=fps or int(round(float(stream_in.average_rate))))
        stream.width, stream.height, stream.pix_fmt = stream_in.width, stream_in.height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        if rotation:
            stream.set_display_rotation(rotation)
        for i, frame in enumerate(inp.decode(stream_in)):
            if i == frames:
                break
            new = av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")
            new.pts = i
            for packet in stream.encode(new):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return dst


def files_holding(root: Path, needle: str) -> list[str]:
    """Every file under `root` whose bytes contain `needle`, as paths relative to it: what is left on disk."""
    return [str(p.relative_to(root)) for p in sorted(root.rglob("*"))
            if p.is_file() and needle.encode() in p.read_bytes()]


# A player set for live viewing, as `ffplay -fflags nobuffer -probesize 32 -analyzeduration 1 URL`: it takes
# the stream's parameters from the SDP and shows the first keyframe. With FFmpeg's default probing a player
# first reads about 20 frames of an RTSP H.264 stream to guess its frame rate (8 s at 2.5 frames a second,
# whatever the keyframes): the player's choice, not the stream's (README, Live tasks).
LIVE_PLAYER = {"rtsp_transport": "tcp", "probesize": "32", "analyzeduration": "1", "fflags": "nobuffer"}


def rtsp_describe(url: str, timeout: float = 30.0) -> tuple[int, float]:
    """An RTSP DESCRIBE of `url`, as every player starts: (status code, seconds the answer took)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    t0 = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as conn:
        conn.sendall(f"DESCRIBE {url} RTSP/1.0\r\nCSeq: 1\r\nAccept: application/sdp\r\n\r\n".encode())
        status = conn.recv(4096).split(b"\r\n", 1)[0].decode()
    return int(status.split()[1]), time.monotonic() - t0


def first_picture_s(url: str, size: tuple[int, int] | None = None) -> float:
    """Seconds from a live player's start to its first decoded picture (of `size`, when given)."""
    import av

    t0 = time.monotonic()
    with av.open(url, options=LIVE_PLAYER, timeout=(10, 10)) as player:
        for picture in player.decode(video=0):
            assert size is None or (picture.width, picture.height) == size
            return time.monotonic() - t0
    raise AssertionError(f"{url} ended without a picture")


class PublishingCamera:
    """A camera that publishes a clip to an RTSP server (RTSP RECORD, packets copied, in real time, the clip
    `loops` times or over and over) as cameras publish to MediaMTX: readers play it from the server's /live/
    side, which refuses the path while the camera is away. `stop()` takes it away; `start()` brings it back;
    `go_quiet(s)` has it send nothing for `s` seconds, then go on where it was (a network that hiccups)."""

    def __init__(self, clip: Path, publish_url: str, loops: int | None = None):
        import av

        self.url, self.loops = publish_url, loops
        with av.open(str(clip)) as src:
            stream = src.streams.video[0]
            self.packets = sorted((p for p in src.demux(stream) if p.size and p.pts is not None), key=lambda p: p.pts)
            self.time_base = stream.time_base
            step = (self.packets[1].pts - self.packets[0].pts) if len(self.packets) > 1 else 1
            self.span = self.packets[-1].pts - self.packets[0].pts + step
        self.clip = clip
        self.thread = None
        self.stopping = None
        self.published = 0  # packets sent since the last start()
        self.error = ""  # why publishing stopped early (the server closed the connection, say): "" when it did not
        self.quiet_s = 0.0
        self.quiet_spans: list[tuple[float, float]] = []  # (start, end) in time.time() of each quiet spell
        # How far the camera itself fell behind at once, in seconds, each time it fell more than half a second
        # behind (its thread got no CPU, or the server took no packets): silences that are the camera's, not the mesh's.
        self.stalls: list[float] = []

    def start(self) -> PublishingCamera:
        import threading

        self.stopping = threading.Event()
        self.published, self.error, self.stalls = 0, "", []
        self.thread = threading.Thread(target=self._publish_or_say_why, args=(self.stopping,), daemon=True)
        self.thread.start()
        return self

    def _publish_or_say_why(self, stopping) -> None:
        try:
            self._publish(stopping)
        except Exception as exc:  # noqa: BLE001 - said by `error`: a test that finds no frames can tell why
            self.error = f"the camera stopped publishing after {self.published} packets: {exc!r}"

    def _publish(self, stopping) -> None:
        import av

        with av.open(str(self.clip)) as src, av.open(self.url, "w", format="rtsp",
                                                     options={"rtsp_transport": "tcp"}) as out:
            stream = out.add_stream_from_template(src.streams.video[0])
            t0, first, loop, behind = time.monotonic(), self.packets[0].pts, 0, 0.0
            while not stopping.is_set() and (self.loops is None or loop < self.loops):
                for packet in self.packets:
                    pts = packet.pts - first + loop * self.span
                    delay = t0 + float(pts * self.time_base) - time.monotonic()
                    if -delay - behind > 0.5:
                        self.stalls.append(round(-delay - behind, 2))
                    behind = max(-delay, 0.0)
                    if stopping.wait(max(delay, 0.0)):
                        return
                    if self.quiet_s:
                        quiet, self.quiet_s, start = self.quiet_s, 0.0, time.time()
                        if stopping.wait(quiet):
                            return
                        t0 += quiet
                        self.quiet_spans.append((start, time.time()))
                    copy = av.Packet(bytes(packet))
                    copy.pts = copy.dts = pts
                    copy.time_base, copy.is_keyframe, copy.stream = self.time_base, packet.is_keyframe, stream
                    out.mux(copy)
                    self.published += 1
                loop += 1

    def go_quiet(self, seconds: float) -> None:
        self.quiet_s = seconds

    @property
    def sending(self) -> bool:
        """Whether the camera has not finished publishing (a quiet spell included). A live task's lag is measured as
        its frames come out; once the camera has sent its last packet the task drains, and its status repeats the
        last lag measured until it completes (CI run 94: 2.73 s, measured just after a rebalance, repeated for 4 s
        after the camera's end), which says nothing of the lag any more."""
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        if self.thread is not None:
            self.stopping.set()
            self.thread.join(10)
            self.thread = None


def completed_results(stub, task_id: str, metadata, timeout: float = 240.0) -> tuple[tpb.Task, bytes, bytes]:
    """Wait for the task to end, require COMPLETED, and download (task, annotated MP4, keypoints JSONL)."""
    done = wait_state(stub, task_id, metadata, {tpb.TASK_STATE_COMPLETED, tpb.TASK_STATE_FAILED,
                                                tpb.TASK_STATE_CANCELLED}, timeout=timeout)
    assert done.state == tpb.TASK_STATE_COMPLETED, done.error_message
    got = {}
    for kind in (tpb.ARTIFACT_KIND_ANNOTATED_VIDEO, tpb.ARTIFACT_KIND_KEYPOINTS):
        got[kind] = b"".join(c.chunk for c in stub.DownloadResult(
            tpb.DownloadResultRequest(task_id=task_id, kind=kind), metadata=metadata, timeout=60))
    return done, got[tpb.ARTIFACT_KIND_ANNOTATED_VIDEO], got[tpb.ARTIFACT_KIND_KEYPOINTS]


def decoded_pictures(video: bytes) -> list[tuple[float, str]]:
    """Each decoded picture of an MP4 as (time, md5 of its RGB pixels): videos compared picture by picture."""
    import av

    with av.open(io.BytesIO(video)) as mp4:
        return [(round(f.time, 4), hashlib.md5(f.to_ndarray(format="rgb24").tobytes()).hexdigest())
                for f in mp4.decode(video=0)]


# Boxes given for 3 of the 5 frames of mmpose_demo_960x540_5f.mp4 (960x540), by frame index, as
# Client.submit(given_boxes=...) takes them, and the persons the results must then hold: frame 2's box is
# clipped to the frame, frame 4's lies outside it and is dropped, frames 1 and 3 have none, frame 9 is past the
# video's end. No detector finds these boxes, nor gives every person the score 1.
GIVEN_BOXES = {0: [(100, 50, 260, 500), (600.5, 80, 700, 400)], 2: [(900, 100, 1100, 300)], 4: [(2000, 10, 2100, 90)],
               9: [(1, 1, 50, 50)]}
GIVEN_BOXES_KEPT = {0: [[100, 50, 260, 500], [600.5, 80, 700, 400]], 1: [], 2: [[900, 100, 960, 300]], 3: [], 4: []}


def assert_given_boxes_kept(done: tpb.Task, records: list[dict]) -> None:
    """The results hold exactly the given boxes (score 1, each posed), and the task records what was given."""
    assert {r["index"]: [p["box"] for p in r["persons"]] for r in records} == GIVEN_BOXES_KEPT
    assert all(p["score"] == 1.0 and len(p["keypoints"]) == 17 for r in records for p in r["persons"])
    assert not done.options.given_boxes  # kept with the upload, not on the task
    given = done.options.boxes_given
    assert (given.boxes, given.frames, len(given.sha256)) == (5, 4, 64)
    assert any(w.startswith("boxes were given for 1 frame past the last of the 5 analysed") for w in done.warnings), \
        done.warnings
