"""WatchFrames: annotated frames to clients as soon as annotate makes them.

Annotate writes a task's annotated frames (JPEG and persons) to live_<task> only while someone watches;
the count of viewers travels on posemesh.control (ViewersChanged). Here one reader per watched task (a
thread with a consumer that joins no group) hands each frame to every viewer's queue on the event loop.
A queue holds `queue_size` frames; a viewer that reads slower than frames come loses the oldest (counted,
and said in each response), so one slow client never slows the task or the other viewers.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from dataclasses import dataclass, field

from confluent_kafka import OFFSET_END, Consumer, TopicPartition

from posemesh.mesh import kafka
from posemesh.mesh.settings import Settings
from posemesh.v1 import task_service_pb2 as tpb

log = logging.getLogger("posemesh.gateway")


@dataclass
class Viewer:
    queue: asyncio.Queue
    dropped: int = 0


@dataclass
class _Watched:
    viewers: list[Viewer] = field(default_factory=list)
    reader: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)
    ready: threading.Event = field(default_factory=threading.Event)  # the reader is positioned


class LiveViews:
    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop, publish_viewers):
        self.settings, self.loop = settings, loop
        self.publish_viewers = publish_viewers  # (task_id, count): tells annotate, on posemesh.control
        self.tasks: dict[str, _Watched] = {}
        # Readers told to stop whose consumer may still be assigned to the live topic: deleting a topic under one
        # kills the gateway (librdkafka's SIGSEGV, README's topic lifecycle). Most likely what CI run 79 saw: a slow
        # watcher left 10 s after its task was cancelled, the topics were deleted right then (between `leave`
        # forgetting the task and its reader closing its consumer, as it was), and the gateway died without a word.
        self.stopping: dict[str, list[threading.Thread]] = {}
        self.lock = threading.Lock()

    def reading(self) -> set[str]:
        """Tasks whose live topic this gateway reads, or did until a moment ago and has not let go of yet (their
        topics must not be deleted under it)."""
        with self.lock:
            for task_id in [t for t, readers in self.stopping.items() if not any(r.is_alive() for r in readers)]:
                del self.stopping[task_id]
            return {t for t, w in self.tasks.items() if w.reader is not None} | set(self.stopping)

    async def join(self, task_id: str) -> Viewer:
        viewer = Viewer(asyncio.Queue(maxsize=self.settings.live_view_queue))
        with self.lock:
            watched = self.tasks.setdefault(task_id, _Watched())
            watched.viewers.append(viewer)
            count = len(watched.viewers)
            first = watched.reader is None
            if first:
                watched.reader = threading.Thread(target=self._read, args=(task_id, watched.stop, watched.ready),
                                                  name=f"view-{task_id[:12]}", daemon=True)
        if first:
            # The task's live topic is made for its first viewer (kafka.PIPELINE_TOPIC_PREFIXES says why),
            # and read from before annotate is told to write to it.
            await asyncio.to_thread(kafka.create_topics, kafka.admin(self.settings),
                                    kafka.task_topic_specs(task_id, self.settings, (kafka.LIVE_FRAMES,)))
            watched.reader.start()
        await asyncio.to_thread(watched.ready.wait, 10)
        await asyncio.to_thread(self.publish_viewers, task_id, count)
        return viewer

    async def leave(self, task_id: str, viewer: Viewer) -> None:
        with self.lock:
            watched = self.tasks.get(task_id)
            if watched is None or viewer not in watched.viewers:
                return
            watched.viewers.remove(viewer)
            count = len(watched.viewers)
            reader = None
            if not count:
                del self.tasks[task_id]
                watched.stop.set()
                reader = watched.reader
                if reader is not None:
                    self.stopping.setdefault(task_id, []).append(reader)
        if reader is not None:
            await asyncio.to_thread(reader.join, 5)
        try:
            await asyncio.to_thread(self.publish_viewers, task_id, count)
        except Exception:  # noqa: BLE001 - the broker is away; annotate keeps making frames a while longer
            log.warning("could not tell the workers that %s has %d viewers", task_id, count)

    def _read(self, task_id: str, stop: threading.Event, ready: threading.Event) -> None:
        topic = kafka.task_topic(kafka.LIVE_FRAMES, task_id)
        consumer = Consumer({**kafka.consumer_config(self.settings, f"gateway-view-{uuid.uuid4().hex[:8]}",
                                                     "gateway-view"), "enable.auto.commit": False})
        consumer.assign([TopicPartition(topic, 0, OFFSET_END)])  # from now on: a live view, not a replay
        ready.set()
        try:
            while not stop.is_set():
                for msg in consumer.consume(num_messages=16, timeout=0.05):
                    if msg.error() is None:
                        frame = tpb.AnnotatedFrame.FromString(msg.value())
                        self.loop.call_soon_threadsafe(self._fan_out, task_id, frame)
        finally:
            consumer.close()

    def _fan_out(self, task_id: str, frame: tpb.AnnotatedFrame) -> None:
        with self.lock:
            viewers = list(self.tasks.get(task_id, _Watched()).viewers)
        for viewer in viewers:
            if viewer.queue.full():
                viewer.queue.get_nowait()  # the oldest goes: the slow viewer sees the newest
                viewer.dropped += 1
            viewer.queue.put_nowait(frame)
