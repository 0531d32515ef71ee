"""A live task's frames: read from the camera, thinned to what the mesh keeps up with, published.

A reader thread per live task (never one per frame, and a follower beside it: `FinishedClock`), in the gateway
(POSEMESH_INGEST=gateway) or in the ingest replica that holds the task's job (stage, stages/ingest.py). It reads
the RTSP source with PyAV and publishes each frame it keeps to raw_frames_<task>, as the upload producer does,
with dense indices.

Bounded lag. The lag is how old the newest annotated frame is when it comes out: from its arrival from the
camera to when the count of finished frames was first seen to include it (`FinishedClock`, looked at by a
thread of its own while frames are in flight: a camera that goes quiet for a while delays the reader's next
look, not the frames). To keep it under `max_lag_s` when the mesh is slower than the camera, frames are
dropped here, at the source, and counted. What goes in is governed like a TCP congestion window, on the
latency of each frame through the mesh (arrival here -> annotated): a window of frames may be in flight;
it grows while frames come out close to the fastest latency seen (the mesh has room), and shrinks by a
quarter, at most once per latency, when they come out later (frames are queueing in the mesh), never
letting the latency climb past half the bound. Admissions are paced at window / latency on the stream's
own clock (presentation times; a camera sends its first second in a burst, and the mesh finishes frames
in batches), so kept frames and drops are spread evenly over the stream. A frame that has waited past the
bound stops every admission until the mesh catches up. A window (rather than pacing at the measured
rate) matters: the mesh's rate is only what it was given, so a rate-based pace never finds the room the
mesh has, while a window fills a pipeline whose frames take 0.4 s each with enough frames to keep every
stage busy.

Its reader's death. A live task whose reader died (its gateway, or its ingest replica) is continued by
the one that takes it over: it reads back from raw_frames_<task> where the stream stopped (`stream_so_far`:
the next index, the last frame's time) and opens the camera again, so indices stay dense and times keep
growing across the gap, which counts as an outage of the camera (it is one, for the task).

Outages. Whatever interrupts the stream is tried again with back-off (an end of stream included: a
camera behind a relay that drops out for a while looks to FFmpeg like one whose stream ended, and the
relay goes on answering), until no frame has come for `outage_s`. Then the server is asked (a TCP
connect): still answering means the stream ended (the task COMPLETES, saying so); gone means an outage
(FAILED, with the reason). Either way, the frames processed so far become its results (the end-of-stream
record closes the task's files).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import av

from posemesh.mesh import kafka, media, records
from posemesh.mesh.at_rest import redact
from posemesh.mesh.frames import FINISHED_EVERY_S, StreamSoFar
from posemesh.mesh.settings import JPEG_QUALITY
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb

log = logging.getLogger("posemesh.live")

RTSP_PORTS = {"rtsp": 554, "rtsps": 322}  # the schemes of a live source, and their default ports
PROTOCOLS = "rtsp,rtsps,rtp,srtp,udp,tcp,tls,crypto"  # what a live source may open, nothing on disk
STATUS_EVERY_S = 0.5
DETACH_FLUSH_S = 5.0
# FFmpeg reads up to 5 s of a stream before it hands out the first frame (stream probing): at 5 fps that
# is the whole lag bound gone before the task starts. RTSP's SDP already names the codec, and the decoder
# takes the size from the first key frame, so half a second of probing is enough. (Not `fflags nobuffer`:
# it throws away the frames read while probing, all of a short stream's.)
LIVE_OPTIONS = {"protocol_whitelist": PROTOCOLS, "analyzeduration": "500000", "probesize": "500000"}


@dataclass(frozen=True)
class Source:
    """A URL the server connects to (a camera; a webhook's target)."""

    url: str  # as given, credentials included: what the server connects to
    scheme: str
    host: str
    port: int

    @property
    def shown(self) -> str:
        """The URL without credentials (user, password, credential-looking query values): what users and
        logs see."""
        return redact(self.url)

    @classmethod
    def of(cls, url: str) -> Source:
        """A URL that was checked when its task started (gateway/sources.py's policy), read again."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        return cls(url, scheme, (parts.hostname or "").lower(), parts.port or RTSP_PORTS.get(scheme, 554))


@dataclass
class LiveConfig:
    max_lag_s: float = 2.0
    outage_s: float = 20.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 5.0
    jpeg_quality: int = JPEG_QUALITY
    partitions: int = 4
    limits: media.Limits = field(default_factory=media.Limits)

    @classmethod
    def from_settings(cls, settings, max_lag_s: float = 0.0) -> LiveConfig:
        """The settings' (POSEMESH_LIVE_*), with a task's own lag bound when it asked for one."""
        return cls(max_lag_s=max_lag_s or settings.live_max_lag_s, outage_s=settings.live_outage_s,
                   jpeg_quality=settings.jpeg_quality, partitions=kafka.partitions_for(kafka.RAW_FRAMES, settings),
                   limits=media.Limits.from_settings(settings))


class FinishedClock:
    """When each frame of a live task was first seen finished by the annotate stage. The count of finished
    frames (`annotated()`) is looked at by the reader as each camera frame arrives and, while frames are in
    flight and the reader has not looked for FINISHED_EVERY_S, by a thread of its own: otherwise a camera that
    sends nothing for three seconds would make the frames finished meanwhile look three seconds late when the
    next one arrives (a lag that is not the mesh's, and a window cut for nothing)."""

    def __init__(self, annotated):
        self.annotated = annotated
        self.lock = threading.Lock()
        self.count = 0
        self.looked_at = time.monotonic()
        self.seen: deque[tuple[int, float]] = deque()  # (count, when first seen), counts rising

    def look(self) -> int:
        """The count of finished frames now, stamped with when it was first seen."""
        count = self.annotated()
        with self.lock:
            self.looked_at = now = time.monotonic()
            if count > self.count:
                self.count = count
                self.seen.append((count, now))
            return self.count

    def finished_at(self, index: int) -> float:
        """When frame `index` (below the last `look()`'s count) was first seen finished. Asked in index order:
        the stamps of earlier counts are forgotten."""
        with self.lock:
            assert index < self.count, f"frame {index} is not finished ({self.count} are)"
            while self.seen[0][0] <= index:
                self.seen.popleft()
            return self.seen[0][1]

    def follow(self, waiting_for, stop: threading.Event, looked=None) -> None:
        """Until `stop` is set (on a thread beside the reader's): look whenever the reader has not looked for
        FINISHED_EVERY_S while frames are in flight (`waiting_for()`: the newest index sent, or None), then call
        `looked()` when given."""
        while not stop.wait(FINISHED_EVERY_S):
            newest = waiting_for()
            if newest is None or newest < self.count or time.monotonic() - self.looked_at < FINISHED_EVERY_S:
                continue
            try:
                self.look()
            except Exception:  # noqa: BLE001 - the reader's own look says what is wrong
                log.debug("looking at the finished frames failed", exc_info=True)
                continue
            if looked is not None:
                try:
                    looked()
                except Exception:  # noqa: BLE001 - a status not published: the next look tries again
                    log.warning("following the finished frames failed", exc_info=True)


class LiveSource(threading.Thread):
    def __init__(self, task: tpb.Task, source: Source, transport: int, producer_config: dict, epoch: int,
                 config: LiveConfig, annotated, on_status, on_end, so_far: StreamSoFar | None = None,
                 client: str = "gateway", on_closing=None):
        """annotated(): frames the annotate stage has finished; on_status(LiveStatus, published); on_end(state,
        message, total) once the end-of-stream record is out; on_closing(state, message, total), when given,
        just before it goes out (raising keeps the stream open). `so_far`: the stream an earlier reader (one
        that died) published, to go on from. `client`: who reads (the Kafka client id's prefix)."""
        super().__init__(name=f"live-{task.task_id[:12]}", daemon=True)
        self.task, self.source, self.config, self.epoch = task, source, config, epoch
        self.transport = "udp" if transport == tpb.RTSP_TRANSPORT_UDP else "tcp"
        self.finished = FinishedClock(annotated)
        self.on_status, self.on_end, self.on_closing = on_status, on_end, on_closing
        # Made ahead (kafka.SpareProducer: a new one's first record waited 0.5 s), so its client id names no task.
        self.producer = kafka.SPARE_PRODUCERS.take(self.kafka_config(producer_config, client))
        self.topic = kafka.task_topic(kafka.RAW_FRAMES, task.task_id)
        self.stop_requested = threading.Event()
        self.detached = threading.Event()
        self.stop_reason = "stopped by the user"
        self.stop_state = tpb.TASK_STATE_CANCELLED
        self.status = tpb.LiveStatus(source=source.shown, max_lag_s=config.max_lag_s)
        self.index = 0
        self.time_base = 0.0  # the first frame's timestamp_s: 0, or after what an earlier reader published
        if so_far is not None:
            self.status.CopyFrom(task.live)  # the counts go on
            self.status.connected, self.status.reconnects = False, task.live.reconnects + 1
            self.index = so_far.frames
        self.so_far = so_far  # the time base is set at the first frame: the gap lasts until then
        # Frames allowed in flight (sent, not yet annotated). The first window is half the bound's worth of
        # the camera's frames (4 to 8), spread over the bound: the mesh takes a while to take a task on.
        self.window = float(max(4, min(8, int((task.video.fps or 25.0) * config.max_lag_s * 0.5))))
        self.latency: float | None = None  # arrival -> annotated, smoothed
        self.fastest: deque[tuple[float, float]] = deque()  # (when, latency): the fastest of the last seconds
        self.last_cut = 0.0
        self.last_admitted = -1e9  # stream time of the last frame that went in
        self.stream_time = 0.0
        self.arrivals: deque[tuple[int, float]] = deque()  # (index, arrival) of frames not yet annotated
        self.done = 0
        self.first_arrival: float | None = None
        self.last_arrival = time.monotonic()  # the camera's last frame, kept or not
        self.sender = kafka.Sender(self.producer)
        # The reader's thread follows the mesh at each camera frame, the follower's while the camera is quiet
        # (`_follow_between_frames`: an outage, the tries after its stream ended): one at a time changes the
        # window, the latency and the lag, and publishes the status. Once the stream is closed or handed on
        # (`closed`), the follower publishes nothing more.
        self.lock = threading.RLock()
        self.closed = False

    @staticmethod
    def kafka_config(producer_config: dict, client: str) -> dict:
        """The configuration of a camera reader's Kafka producer (its client id names the process, not the task)."""
        return {**producer_config, "client.id": f"{client}-live"}

    @staticmethod
    def make_ready(producer_config: dict, client: str) -> None:
        """Make a producer ahead for the first camera this process will read: without it a process's first live
        task's first frame reached the broker 0.5 s late (kafka.SpareProducer); each one taken makes the next."""
        kafka.SPARE_PRODUCERS.stock(LiveSource.kafka_config(producer_config, client), 1)

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        state, message = tpb.TASK_STATE_FAILED, ""
        read = threading.Event()
        try:
            threading.Thread(target=self.finished.follow,
                             args=(self._newest_in_flight, read, self._follow_between_frames),
                             name=f"finished-{self.task.task_id[:12]}", daemon=True).start()
            state, message = self._read()
        except Exception as exc:  # the task ends with the reason; its reader's process goes on
            log.exception("live source of %s failed", self.task.task_id)
            state, message = tpb.TASK_STATE_FAILED, f"reading the live source failed: {exc.__class__.__name__}"
        finally:
            read.set()
        self._connected(False)
        if self.detached.is_set():
            with self.lock:
                self.closed = True
            self.producer.flush(DETACH_FLUSH_S)  # the frames read so far go in; the stream stays open
            return
        self._end(state, message)

    def stop(self, reason: str = "", state: int = tpb.TASK_STATE_CANCELLED) -> None:
        """CancelTask (or the gateway's word that the camera is not allowed any more: `state` FAILED): stop
        reading; the frames so far are still processed into results, and the task ends in `state`."""
        if reason:
            self.stop_reason = reason
        self.stop_state = state if state == tpb.TASK_STATE_FAILED else tpb.TASK_STATE_CANCELLED
        self.stop_requested.set()

    def detach(self) -> None:
        """Stop reading and leave the stream open, for another reader (another gateway or ingest replica, or this
        one once it starts again) to go on with: no end of stream, and the task does not end."""
        self.detached.set()
        self.stop_requested.set()

    def _read(self) -> tuple[int, str]:
        """Frames until the user stops the task or no frame came for `outage_s`: whatever interrupts the
        stream (an end of stream, a broken connection, a server that refuses or does not answer) is tried
        again with back-off until then, since a camera behind a relay (MediaMTX, the local one) that drops
        out for a while looks like one whose stream ended, to the point of the relay answering."""
        last_frame = time.monotonic()
        backoff = 0.5
        reason = "no connection yet"
        while not self.stop_requested.is_set():
            left = self.config.outage_s - (time.monotonic() - last_frame)
            if left < 0:
                return self._gone(reason)
            try:
                container = av.open(self.source.url, format="rtsp", timeout=(self.config.connect_timeout_s,
                                                                             self.config.read_timeout_s),
                                    options={"rtsp_transport": self.transport, **LIVE_OPTIONS})
            except av.FFmpegError as exc:
                reason = getattr(exc, "strerror", None) or exc.__class__.__name__
                self._publish_status(force=True)
                self.stop_requested.wait(min(backoff, max(left, 0.0) + 0.05))
                backoff = min(backoff * 2, 5.0)
                self._connected(False, tried_again=True)
                continue
            self._connected(True)
            try:
                with container:
                    stream = container.streams.video[0]
                    stream.thread_type = "AUTO"
                    for frame in container.decode(stream):
                        last_frame = time.monotonic()
                        backoff = 0.5
                        self._frame(frame, last_frame)
                        if self.stop_requested.is_set():
                            break
                reason = "its stream ended"
            except av.FFmpegError as exc:
                reason = f"its stream broke off: {getattr(exc, 'strerror', None) or exc.__class__.__name__}"
            except media.NotAVideo as exc:
                return tpb.TASK_STATE_FAILED, f"the live source's frames: {exc}"
            self._connected(False)
            if not self.stop_requested.is_set():
                log.info("live source of %s: %s; reconnecting", self.task.task_id, reason)
        return self.stop_state, self.stop_reason

    def _connected(self, connected: bool, tried_again: bool = False) -> None:
        """The status's connection fields change under the lock the follower publishes under."""
        with self.lock:
            self.status.connected = connected
            self.status.reconnects += int(tried_again)

    def _gone(self, reason: str) -> tuple[int, str]:
        """No frame for `outage_s`. A server that still answers has no stream for us (it ended: COMPLETED);
        one that does not is an outage (FAILED). Either way the frames before are in the results."""
        waited = f"no frame for {self.config.outage_s:.0f} s"
        if self._server_answers():
            return tpb.TASK_STATE_COMPLETED, (f"the live stream ended: {waited} and its server, which still "
                                              f"answers, serves none ({reason}); the frames before that are in "
                                              "the results")
        return tpb.TASK_STATE_FAILED, (f"the live source sent {waited} ({reason}); the frames before that are "
                                       "in the results")

    def _server_answers(self) -> bool:
        try:
            with socket.create_connection((self.source.host, self.source.port), timeout=2):
                return True
        except OSError:
            return False

    # ------------------------------------------------------------------ one frame

    def _frame(self, frame: av.VideoFrame, arrived: float) -> None:
        with self.lock:
            self._take(frame, arrived)

    def _take(self, frame: av.VideoFrame, arrived: float) -> None:
        self.status.frames_received += 1
        self.last_arrival = arrived
        if frame.width * frame.height > self.config.limits.max_frame_pixels:
            self.config.limits.check_size(frame.width, frame.height)
        self._follow_the_mesh(arrived, self.finished.look())
        step = 1.0 / (self.task.video.fps or 25.0)
        t = frame.time  # RTSP gives no time to the first frames sometimes: count on from the last
        self.stream_time = t if t is not None and t > self.stream_time else self.stream_time + step
        if not self._keep(arrived, self.stream_time):
            self.status.frames_dropped += 1
            self._publish_status()
            return
        if self.stop_requested.is_set():  # stopped or detached while it asked the store (a call that hung)
            return
        if self.first_arrival is None:
            self.first_arrival = arrived
            if self.so_far is not None:
                self.time_base = self.so_far.start_time_s(time.time())
        data, w, h = media.frame_jpeg(frame, self.config.jpeg_quality)
        self._send(records.frame_record(self.task.task_id, self.task.options, self.epoch, pb.Frame(
            index=self.index, timestamp_s=self.time_base + arrived - self.first_arrival, width=w, height=h,
            jpeg=data)))
        self.arrivals.append((self.index, arrived))
        self.index += 1
        self.producer.poll(0)
        self._publish_status()

    def _newest_in_flight(self) -> int | None:
        """The newest frame sent that the reader has not seen finished yet (None: none), asked from the follower's
        thread."""
        try:
            return self.arrivals[-1][0]
        except IndexError:
            return None

    def _follow_between_frames(self) -> None:
        """After the follower's look while the camera sends nothing: the frames finished meanwhile
        count in the lag and the window now, and the status says so: every STATUS_EVERY_S, as the reader's
        frames do, and at once when none is left in flight and the camera has been quiet that long (the last
        word until its next frame; a slow camera's status is not written more often for it). Skipped when the
        lock is not free soon (a reader's call that hangs)."""
        if not self.lock.acquire(timeout=FINISHED_EVERY_S):
            return
        try:
            if not self.closed:
                now = time.monotonic()
                self._follow_the_mesh(now, self.finished.count)  # the highest count seen, by either thread
                self._publish_status(force=not self.arrivals and now - self.last_arrival >= STATUS_EVERY_S)
        finally:
            self.lock.release()

    def _follow_the_mesh(self, now: float, done: int) -> None:
        """What the annotate stage has finished (`done` frames), each frame's latency, and the window that follows."""
        bound = self.config.max_lag_s
        while self.arrivals and self.arrivals[0][0] < done:
            index, arrived = self.arrivals.popleft()
            latency = max(0.0, self.finished.finished_at(index) - arrived)
            self.status.lag_s = latency  # the newest annotated frame's age
            self.latency = latency if self.latency is None else 0.8 * self.latency + 0.2 * latency
            while self.fastest and (self.fastest[-1][1] >= latency or now - self.fastest[0][0] > 10.0):
                self.fastest.pop() if self.fastest[-1][1] >= latency else self.fastest.popleft()
            self.fastest.append((now, latency))
            # Room while frames come out near the fastest latency seen; queueing (or half the bound) beyond.
            room = min(0.5 * bound, 1.5 * self.fastest[0][1] + 0.15)
            if latency <= room:
                self.window = min(self.window + 0.5, max(4.0, (self.task.video.fps or 25.0) * bound))
            elif now - self.last_cut > latency:
                self.window, self.last_cut = max(1.0, self.window * 0.75), now
        self.done = done
        if self.arrivals and done == 0 and self.first_arrival is not None:
            self.status.lag_s = now - self.first_arrival  # nothing annotated yet: the first frame's wait

    def _keep(self, now: float, stream_time: float) -> bool:
        if self.arrivals and now - self.arrivals[0][1] > self.config.max_lag_s:
            return False  # the oldest frame in flight waited past the bound: none more until it is out
        if self.index - self.done >= int(self.window):
            return False
        # Spread what goes in evenly: window / latency frames a second; before any frame came out, the
        # first window spread over the bound (the mesh may take that long to take a new task on).
        latency = self.latency if self.latency is not None else self.config.max_lag_s
        pace = self.window / max(latency, 0.05)
        if stream_time - self.last_admitted < 0.999 / pace:
            return False
        self.last_admitted = stream_time
        return True

    def _send(self, record: pb.StageRecord) -> None:
        self.sender.send(self.topic, record.SerializeToString(), records.partition_of(record, self.config.partitions))

    def _publish_status(self, force: bool = False) -> None:
        with self.lock:
            now = time.monotonic()
            if force or now - getattr(self, "_status_at", 0.0) >= STATUS_EVERY_S:
                self._status_at = now
                self.on_status(self.status, self.index)

    # ------------------------------------------------------------------ the end

    def _end(self, state: int, message: str) -> None:
        """Close the stream for the stages (end-of-stream with the count of frames that went in); the task
        ends with `state` once annotate reports its results. An ingest replica tells the gateway how the task
        ends first (`on_closing`): its results, which the end of stream lets annotate make, come after that."""
        with self.lock:
            self._publish_status(force=True)
            self.closed = True  # the follower's looks publish nothing more
        if self.on_closing is not None:
            self.on_closing(state, message, self.index)
        record = records.end_of_stream_record(self.task.task_id, self.task.options, self.epoch, self.index,
                                              self.task.video.fps)
        try:
            self._send(record)
            self.producer.flush(30)
        except Exception:  # the broker is away: the task ends without results after LIVE_RESULTS_WAIT_S
            log.exception("could not close the live stream of %s", self.task.task_id)
        self.on_end(state, message, self.index)


def probe_source(source: Source, transport: int, timeout_s: float) -> tpb.VideoInfo:
    """Open the source once: it must answer and carry video. Raises ValueError saying why not."""
    try:
        container = av.open(source.url, format="rtsp", timeout=(timeout_s, timeout_s),
                            options={"rtsp_transport": "udp" if transport == tpb.RTSP_TRANSPORT_UDP else "tcp",
                                     **LIVE_OPTIONS})
    except av.FFmpegError as exc:
        raise ValueError(
            f"the live source does not answer ({getattr(exc, 'strerror', None) or 'no connection'})") from None
    with container:
        if not container.streams.video:
            raise ValueError("the live source has no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        for frame in container.decode(stream):
            return tpb.VideoInfo(width=frame.width, height=frame.height, fps=fps, codec=ctx.name)
    raise ValueError("the live source sent no frame")
