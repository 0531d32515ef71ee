"""The frame producer: decode an upload with PyAV and publish one JPEG frame record per frame to
raw_frames_<task>, in index order (spread over the topic's partitions by index), then end-of-stream."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from confluent_kafka import Producer

from posemesh.mesh import jpeg, kafka, media, records, tracing
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb

log = logging.getLogger("posemesh.gateway")

PROGRESS_EVERY = 10
# Decoding runs ahead of the models by up to MAX_FRAMES_AHEAD frames a task. Right after a burst of uploads
# that is seconds of CPU per task, taken exactly when the tasks' first frames need the models: at the same
# priority, four uploads' read-ahead doubled the first frames' model time (pose: 0.3 -> 1.4 s for a frame).
# The decode threads therefore yield the CPU to everything else (Linux: per-thread nice value).
DECODE_NICE = 10


class FrameProducer(threading.Thread):
    """One task's frames onto its raw_frames topic, from a thread with a Kafka producer of its own: a
    producer's delivery callbacks must be served by one thread, and a cancelled task's producer (the broker
    lost its data) is thrown away with whatever it still holds."""

    def __init__(self, task: tpb.Task, path: Path, producer_config: dict, partitions: int, jpeg_quality: int,
                 on_progress, on_done, on_error, frames_consumed=None, max_ahead: int = 0,
                 limits: media.Limits = media.DEFAULT_LIMITS, epoch: int = 0, on_decoded=None, trace=None):
        super().__init__(name=f"frames-{task.task_id}", daemon=True)
        # Backpressure: frames_consumed() says how many frames the first stage has taken.
        self.frames_consumed, self.max_ahead = frames_consumed, max_ahead
        self.task, self.path = task, path
        self.producer = Producer({**producer_config, "client.id": f"gateway-frames-{task.task_id[:12]}"})
        self.partitions, self.quality = partitions, jpeg_quality
        self.on_progress, self.on_done, self.on_error = on_progress, on_done, on_error
        # on_decoded(reader) once every frame is read, before the end of stream goes out (so before any stage
        # can finish the task): what was decoded, not what the probe counted, is what the task then says.
        self.on_decoded = on_decoded
        self.limits, self.epoch = limits, epoch
        self.trace = trace  # the run's trace context: decoding is a span of it (posemesh.mesh.tracing)
        self.cancelled = threading.Event()
        self.sender = kafka.Sender(self.producer)
        self.topic = kafka.task_topic(kafka.RAW_FRAMES, task.task_id)

    def _send(self, record: pb.StageRecord) -> None:
        self.sender.send(self.topic, record.SerializeToString(), records.partition_of(record, self.partitions))

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
                while (self.max_ahead and self.frames_consumed and frame.index % 8 == 0
                       and frame.index - self.frames_consumed() > self.max_ahead and not self.cancelled.is_set()):
                    self.producer.poll(0.05)
                data = jpeg.encode(frame.image, self.quality)
                h, w = frame.image.shape[:2]
                self._send(records.frame_record(task_id, self.task.options, self.epoch, pb.Frame(
                    index=frame.index, timestamp_s=frame.timestamp_s, width=w, height=h, jpeg=data)))
                count = frame.index + 1
                if count % PROGRESS_EVERY == 0:
                    self.producer.poll(0)
                    self.on_progress(reported, count - 1)
                    reported = count
            if self.cancelled.is_set():
                return
            if self.on_decoded is not None:
                self.on_decoded(reader)
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
        except Exception:  # the task fails; the gateway and every other task go on
            if self.cancelled.is_set():
                return  # stopped on purpose: whatever failed after that does not matter
            log.exception("frame producer of %s failed", task_id)
            self.on_error(f"decoding the upload failed after {count} frames")
        finally:
            if self.cancelled.is_set():
                self.producer.purge()
