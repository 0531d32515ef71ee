"""raw_frames_<task>, the topic that carries a task's pixels: written by the frame producer (an upload's frames,
decoded with PyAV, one JPEG frame record each, in index order, spread over the topic's partitions by index,
then the end of stream), and read back to learn how far an earlier writer got (`stream_so_far`: a writer
that takes over from one that died goes on after it).

The ingest stage (posemesh.stages.ingest) runs the frame producer for uploads; the gateway runs it itself
when the mesh has no ingest stage (POSEMESH_INGEST=gateway, one machine) and reads back live streams."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, Consumer, KafkaError, KafkaException, TopicPartition

from posemesh.mesh import given_boxes, kafka, media, records, tracing
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb

log = logging.getLogger("posemesh.frames")

READ_BACK_S = 5.0  # the longest a take-over reads back where a stream stopped (stream_so_far)
UNKNOWN_GAP_S = 0.04  # the gap a resumed stream shows when the broker did not time its last frame
PROGRESS_EVERY = 10
# Decoding runs ahead of the models by up to MAX_FRAMES_AHEAD frames a task. Right after a burst of uploads
# that is seconds of CPU per task, taken exactly when the tasks' first frames need the models: at the same
# priority, four uploads' read-ahead doubled the first frames' model time (pose: 0.3 -> 1.4 s for a frame).
# The decode threads therefore yield the CPU to everything else (Linux: per-thread nice value).
DECODE_NICE = 10
FINISHED_EVERY_S = 0.1  # how often a producer ahead of the pipeline asks how far the last stage got
PACED_EVERY = 8  # the frames sent between two looks at that count
STUCK_S = 30.0  # how long that count may stand still before the producer stops waiting for it


class FrameTooLarge(Exception):
    """A frame's record is more than the producer may send (message.max.bytes): a noisy 4K picture at a high
    JPEG quality, or a resolution the operator allowed past the default caps."""


@dataclass(frozen=True)
class Decoded:
    """What decoding an upload found, for its task: from then on VideoInfo says what decoded (the probe counted
    packets), and frames that did not decode are a warning."""

    frame_count: int  # the frames every stage gets
    duration_s: float | None  # measured on them (None: not known)
    warning: str = ""

    @classmethod
    def of(cls, reader: media.FrameReader, counted: int) -> Decoded:
        """`counted`: the frames the probe counted."""
        count = reader.decoded
        if counted > reader.read:
            kept = f"; {count} of them sampled" if count < reader.read else ""
            warning = (f"{counted - reader.read} of the {counted} frames of the upload could not be decoded "
                       f"and were skipped; the {reader.read} that decoded are processed{kept}")
        elif reader.skipped:
            warning = f"{reader.skipped} damaged packets of the video could not be decoded and were skipped"
        else:
            warning = ""
        return cls(count, reader.duration_s(), warning)

    def apply(self, task: tpb.Task) -> None:
        task.video.frame_count = self.frame_count
        if self.duration_s is not None:
            task.video.duration_s = round(self.duration_s, 6)
        if self.warning and self.warning not in task.warnings:
            task.warnings.append(self.warning)


class FrameProducer(threading.Thread):
    """One task's frames onto its raw_frames topic, from a thread with a Kafka producer of its own: a
    producer's delivery callbacks must be served by one thread, and a cancelled task's producer (the broker
    lost its data) is thrown away with whatever it still holds."""

    def __init__(self, task: tpb.Task, path: Path, producer_config: dict, partitions: int, jpeg_quality: int,
                 on_progress, on_done, on_error, frames_finished=None, max_ahead: int = 0,
                 limits: media.Limits = media.DEFAULT_LIMITS, epoch: int = 0, on_decoded=None, trace=None,
                 start_at: int = 0, client: str = "gateway", given: dict[int, list[tpb.Box]] | None = None,
                 ready_producers: int = 1):
        super().__init__(name=f"frames-{task.task_id}", daemon=True)
        # Frames below `start_at` are on the topic already (an earlier writer's, read back with
        # stream_so_far): they are decoded, to get to the next one, but neither encoded nor sent again.
        self.start_at = start_at
        # The boxes the client gave instead of running the detector, by frame index (posemesh.mesh.given_boxes):
        # each frame's go on its record, as its persons. None: the detector runs.
        self.given = given
        # Back-pressure: frames_finished() says how many frames the last stage has finished. It must not raise:
        # the caller decides what a count it cannot read means (the gateway keeps the last one it read).
        self.frames_finished, self.max_ahead = frames_finished, max_ahead
        self.finished, self.moved = -1, time.monotonic()  # its last value, and when it last changed
        self.stuck_said = False  # the warning that it stands still is given once until it moves again
        self.task, self.path = task, path
        # Made ahead (kafka.SpareProducer: a new one's first record waited 0.5 s), so its client id names no task;
        # `ready_producers` wait made ahead for the next tasks: as many as the gateway reserves task ids (a burst).
        self.producer = kafka.SPARE_PRODUCERS.take(self.kafka_config(producer_config, client), ready=ready_producers)
        self.partitions, self.quality = partitions, jpeg_quality
        self.on_progress, self.on_done, self.on_error = on_progress, on_done, on_error
        # on_decoded(Decoded) once every frame is read, before the end of stream goes out (so before any stage
        # can finish the task): what was decoded, not what the probe counted, is what the task then says.
        self.on_decoded = on_decoded
        self.limits, self.epoch = limits, epoch
        self.trace = trace  # the run's trace context: decoding is a span of it (posemesh.mesh.tracing)
        self.cancelled = threading.Event()
        self.sender = kafka.Sender(self.producer)
        self.producer_limit = int(producer_config.get("message.max.bytes", kafka.MAX_MESSAGE_BYTES))
        self.topic = kafka.task_topic(kafka.RAW_FRAMES, task.task_id)

    @staticmethod
    def kafka_config(producer_config: dict, client: str) -> dict:
        """The configuration of a frame producer's Kafka producer (its client id names the process, not the task)."""
        return {**producer_config, "client.id": f"{client}-frames"}

    @staticmethod
    def make_ready(producer_config: dict, client: str, count: int) -> None:
        """Make `count` producers ahead for the frame producers this process will start: without them its first
        task's first frame reached the broker 0.5 s late (kafka.SpareProducer)."""
        kafka.SPARE_PRODUCERS.stock(FrameProducer.kafka_config(producer_config, client), count)

    def _send(self, record: pb.StageRecord) -> None:
        data = record.SerializeToString()
        try:
            self.sender.send(self.topic, data, records.partition_of(record, self.partitions))
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if not isinstance(error, KafkaError) or error.code() != KafkaError.MSG_SIZE_TOO_LARGE:
                raise
            # The same frame is as large on every try: the task fails now, saying what the user can change.
            raise FrameTooLarge(f"frame {record.frame.index} takes {len(data) / 2**20:.2f} MiB as a JPEG record, more "
                                f"than the {self.producer_limit / 2**20:.2f} MiB the message broker takes for one "
                                f"frame: scale the video down (or the operator lowers POSEMESH_JPEG_QUALITY, "
                                f"{self.quality} now)") from None

    def _wait_for_the_pipeline(self, index: int) -> None:
        """Back-pressure: wait while frame `index` would be more than max_ahead ahead of the last stage, asking
        its count every FINISHED_EVERY_S. A count that has not moved for STUCK_S stops the waiting until it
        moves again: back-pressure paces a task, it must not stop one whose progress reports are lost (the
        stall limit is for tasks that really do not move)."""
        while not self.cancelled.is_set():
            now = self.frames_finished()
            if now != self.finished:
                self.finished, self.moved, self.stuck_said = now, time.monotonic(), False
            if index - self.finished <= self.max_ahead:
                return
            if time.monotonic() - self.moved > STUCK_S:
                if not self.stuck_said:
                    log.warning("task %s: the last stage reported no progress for %.0f s; decoding goes on "
                                "without waiting for it", self.task.task_id, STUCK_S)
                    self.stuck_said = True
                return
            self.producer.poll(FINISHED_EVERY_S)

    def run(self) -> None:
        with tracing.child_span("posemesh.decode", self.trace, {"posemesh.task_id": self.task.task_id}):
            self._run()

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), DECODE_NICE)
        except (OSError, AttributeError):  # not Linux: decode at the normal priority
            pass
        task_id, count, reported = self.task.task_id, 0, 0
        reader = media.FrameReader(self.path, self.task.video.fps, self.limits, self.task.options.sample_fps)
        try:
            for frame in reader:
                if self.cancelled.is_set():
                    return
                if frame.index < self.start_at:
                    count = frame.index + 1
                    continue
                if self.max_ahead and self.frames_finished and frame.index % PACED_EVERY == 0:
                    self._wait_for_the_pipeline(frame.index)
                if self.cancelled.is_set():
                    return
                data, w, h = frame.jpeg(self.quality)
                record = records.frame_record(task_id, self.task.options, self.epoch, pb.Frame(
                    index=frame.index, timestamp_s=frame.timestamp_s, width=w, height=h, jpeg=data))
                if self.given is not None:
                    for box in self.given.get(frame.index, ()):
                        record.frame.persons.add(box=box, score=1.0)
                self._send(record)
                count = frame.index + 1
                if count % PROGRESS_EVERY == 0:
                    self.producer.poll(0)
                    self.on_progress(reported, count - 1)
                    reported = count
            if self.cancelled.is_set():
                return
            if self.on_decoded is not None:
                decoded = Decoded.of(reader, self.task.video.frame_count)
                unused = given_boxes.beyond(self.given, decoded.frame_count) if self.given else ""
                if unused:
                    decoded = dataclasses.replace(decoded, warning="; ".join(filter(None, [decoded.warning, unused])))
                self.on_decoded(decoded)
                if self.cancelled.is_set():
                    return
            self._send(records.end_of_stream_record(task_id, self.task.options, self.epoch, count, self.task.video.fps))
            wait_s = kafka.MESSAGE_TIMEOUT_S + kafka.DELIVERY_MARGIN_S
            if not self.sender.delivered(wait_s, give_up=self.cancelled.is_set):
                if not self.cancelled.is_set():  # not a decoding failure: say what it is
                    why = self.sender.errors[0] if self.sender.errors else f"not acknowledged within {wait_s:.0f} s"
                    log.warning("frames of %s not delivered: %s", task_id, why)
                    self.on_error(f"the upload's frames could not be written to the message broker ({why})")
                return
            if count > reported:
                self.on_progress(reported, count - 1)
            self.on_done(count)
        except media.NotAVideo as exc:  # e.g. the resolution grows past the caps mid-stream
            if not self.cancelled.is_set():
                self.on_error(f"frame {count} of the upload: {exc}")
        except FrameTooLarge as exc:  # like NotAVideo: the user's input; the task's end logs the message
            if not self.cancelled.is_set():
                self.on_error(str(exc))
        except Exception:  # the task fails; the gateway and every other task go on
            if self.cancelled.is_set():
                return  # stopped on purpose: whatever failed after that does not matter
            log.exception("frame producer of %s failed", task_id)
            self.on_error(f"decoding the upload failed after {count} frames")
        finally:
            if self.cancelled.is_set():
                self.producer.purge()


@dataclass(frozen=True)
class StreamSoFar:
    """What a live task's earlier reader published before it stopped with its gateway (`stream_so_far`)."""

    frames: int  # indices 0..frames-1 are on the topic, every one of them (closed: the end of stream's count)
    last_timestamp_s: float  # the newest frame's time in the task's stream
    last_written_s: float  # when it was written (wall clock, the record's broker timestamp; 0: not known)
    closed: bool  # an end-of-stream record is out: the stream cannot go on
    newest: int  # the newest index on the topic + 1: more than `frames` when a frame below it is lost

    @property
    def hole(self) -> bool:
        """Frames after a lost one are on the topic (see stream_so_far): going on would contradict them."""
        return self.newest > self.frames

    def start_time_s(self, now_s: float) -> float:
        """The time of the first frame read after the gap: the gap shows in the stream as long as it was."""
        if not self.frames:
            return 0.0
        gap = now_s - self.last_written_s if self.last_written_s > 0 else UNKNOWN_GAP_S
        return self.last_timestamp_s + max(0.001, gap)


def stream_so_far(consumer_config: dict, task_id: str, epoch: int, partitions: int,
                  timeout_s: float = READ_BACK_S) -> StreamSoFar:
    """Read back where a task's live stream stopped: the last record of each raw_frames partition (frames
    go to partition index % P, in index order within each), read up to the partition's end from just before
    it (the local broker's high watermark names the last record batch, not the last record). A producer
    that died may have had frames of several partitions in flight, and a later one may have landed while an
    earlier one did not (another broker leads its partition); the stream then has a hole, and cannot go on
    without times going back (the caller closes it instead). `timeout_s` bounds the whole read: it runs on
    the thread that renews the gateway's leases (take_over)."""
    topic = kafka.task_topic(kafka.RAW_FRAMES, task_id)
    consumer = Consumer({**consumer_config, "enable.auto.commit": False, "enable.partition.eof": True})
    last: dict[int, tuple[int, float, float]] = {}  # partition -> (index, timestamp_s, written_s)
    closed_total: int | None = None
    deadline = time.monotonic() + timeout_s

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"the end of {topic} could not be read within {timeout_s:.0f} s")
        return remaining

    try:
        tails = []
        for p in range(partitions):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=left())
            if high > low:
                tails.append(TopicPartition(topic, p, high - 1))
        if tails:
            consumer.assign(tails)
            waiting = {tp.partition for tp in tails}
            while waiting and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is None:
                    continue
                if msg.error():
                    if msg.error().code() == KafkaError._PARTITION_EOF:
                        waiting.discard(msg.partition())
                        continue
                    raise KafkaException(msg.error())
                record = pb.StageRecord.FromString(msg.value())
                if record.epoch != epoch:
                    continue
                if record.HasField("end_of_stream"):
                    closed_total = record.end_of_stream.total_frames
                else:
                    kind, written_ms = msg.timestamp()
                    written = written_ms / 1000.0 if kind != TIMESTAMP_NOT_AVAILABLE else 0.0
                    last[msg.partition()] = (record.frame.index, record.frame.timestamp_s, written)
            if waiting:
                left()  # raises: not every partition's end was reached
    finally:
        consumer.close()
    newest = max(last.values(), default=(-1, 0.0, 0.0))
    if closed_total is not None:  # its last frame may sit before the end of stream in partition 0: not read
        return StreamSoFar(frames=closed_total, last_timestamp_s=newest[1], last_written_s=newest[2],
                           closed=True, newest=closed_total)
    # Partition p holds p, p+P, ... up to its last index: the first index missing is the least of last+P.
    frames = min((last[p][0] + partitions if p in last else p) for p in range(partitions))
    return StreamSoFar(frames=frames, last_timestamp_s=newest[1], last_written_s=newest[2], closed=False,
                       newest=newest[0] + 1)
