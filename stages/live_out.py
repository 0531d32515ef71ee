"""A live task's annotated video published to an RTSP server (MediaMTX in production, posemesh's
GStreamer relay in the local stack), at TaskStarted.publish_url.

No second encoder: the H.264 packets the results writer codes for the MP4 are copied here as well (for live
tasks that encoder codes for latency: no lookahead, no B-frames, and a keyframe at least every two seconds of
media and of wall time however few frames the source keeps, results.KeyframeClock: players start at one).
A thread of its own does the network writes, fed by a bounded queue: a slow or absent server costs
dropped packets (and then a wait for the next keyframe, so players never see a broken picture), never a
slower task. A failed connection is tried again at the next keyframe, at most every few seconds.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import av

log = logging.getLogger("posemesh.stage")

QUEUE = 120
RETRY_S = 2.0


class RtspPublisher(threading.Thread):
    def __init__(self, url: str, task_id: str):
        super().__init__(name=f"publish-{task_id[:12]}", daemon=True)
        self.url, self.task_id = url, task_id
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE)
        self.template = None  # the coding stream whose parameters the published stream takes
        self.dropped = 0
        self.published = 0
        self.closed = threading.Event()

    def offer(self, packet: av.Packet, stream) -> None:
        """A packet just muxed into the MP4 (from the encoder `stream`); copied, never blocking."""
        if self.template is None:
            self.template = stream
        copy = av.Packet(bytes(packet))
        copy.pts, copy.dts, copy.time_base = packet.pts, packet.dts, packet.time_base
        copy.is_keyframe = packet.is_keyframe
        try:
            self.queue.put_nowait(copy)
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        self.closed.set()
        try:
            self.queue.put_nowait(None)
        except queue.Full:
            pass

    def run(self) -> None:
        out = stream = None
        need_keyframe, retry_at = True, 0.0
        while True:
            packet = self.queue.get()
            if packet is None or self.closed.is_set() and self.queue.empty():
                break
            if need_keyframe and not packet.is_keyframe:
                continue  # players can only start (or resume) at a keyframe
            if out is None:
                if time.monotonic() < retry_at:
                    continue
                try:
                    out = av.open(self.url, "w", format="rtsp", options={"rtsp_transport": "tcp"}, timeout=5)
                    stream = out.add_stream_from_template(self.template)
                    stream.time_base = packet.time_base
                except av.FFmpegError as exc:
                    log.warning("task %s: cannot publish to %s (%s); trying again", self.task_id, self.url,
                                getattr(exc, "strerror", exc))
                    out, retry_at = None, time.monotonic() + RETRY_S
                    continue
            try:
                packet.stream = stream
                out.mux(packet)
                self.published += 1
                need_keyframe = False
            except av.FFmpegError as exc:
                log.warning("task %s: publishing to %s broke off (%s)", self.task_id, self.url,
                            getattr(exc, "strerror", exc))
                _close(out)
                out, need_keyframe, retry_at = None, True, time.monotonic() + RETRY_S
        _close(out)


def _close(out) -> None:
    if out is not None:
        try:
            out.close()
        except av.FFmpegError:
            pass
