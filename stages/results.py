"""A task's result files: written in segments while its frames arrive, assembled once when it ends.

Layout in the blob store (mesh/blobs.py: the data directory, or an S3 bucket), under results/:

    .partial-<task>-e<epoch>/             grows while the task runs; any annotate worker may continue it
        seg-00000000-00000119.mp4         a finished segment: frames 0..119 as H.264, an IDR frame first
        seg-00000000-00000119.jsonl       their keypoints, one JSON line a frame
    <task>/                               the result, published as one when the task ends
        annotated.mp4                     every segment's packets in one MP4, moov first, with the audio
        keypoints.jsonl
        coco.json, tracks.txt, keypoints.csv   the keypoints as COCO results, MOT tracks, CSV (exports.py)

The segment being written, and a result being assembled, are the worker's own files (its scratch folder).
Segments are what let a replacement worker continue a task instead of redoing it: a finished segment is
durable (stored whole, the keypoints last), so its frames' input offsets may be committed.

What the MP4 keeps from the upload:
- each frame's presentation time (variable frame rate included), counted from the first frame, the same
  origin as keypoints' `timestamp_s`; the time base is 1/90000 s;
- the exact picture size: even sizes are H.264 High (4:2:0, plays everywhere); an odd width or height
  cannot be coded in 4:2:0 (chroma is subsampled by two and H.264 crops in steps of two), so odd sizes are
  coded 4:4:4 (High 4:4:4 Predictive profile), which FFmpeg-based players, VLC and Chrome play but some
  hardware decoders (Safari, phones) do not;
- the audio: copied when MP4 can carry the codec, else re-encoded to AAC;
- moov first ("faststart"), so a browser starts playing before the download ends.
A frame whose size differs from the first frame's (a mid-stream resolution change) is scaled into the
first frame's size, aspect kept, padded with black; its keypoints stay in its own pixels.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
from av.video.frame import PictureType

from posemesh.mesh import media, names
from posemesh.mesh.blobs import BlobStore, blob_sha256
from posemesh.mesh.models import sha256_of
from posemesh.stages import exports
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb

log = logging.getLogger("posemesh.stage")

VIDEO_FILE, KEYPOINTS_FILE = "annotated.mp4", "keypoints.jsonl"
ARTIFACT_FILES = {tpb.ARTIFACT_KIND_ANNOTATED_VIDEO: (VIDEO_FILE, "video/mp4"),
                  tpb.ARTIFACT_KIND_KEYPOINTS: (KEYPOINTS_FILE, "application/jsonl"),
                  tpb.ARTIFACT_KIND_COCO_KEYPOINTS: ("coco.json", "application/json"),
                  tpb.ARTIFACT_KIND_MOT_TRACKS: ("tracks.txt", "text/plain"),
                  tpb.ARTIFACT_KIND_KEYPOINTS_CSV: ("keypoints.csv", "text/csv")}
# Made from the task's keypoints when it is published (stages/exports.py): no model runs again.
EXPORTS = {tpb.ARTIFACT_KIND_COCO_KEYPOINTS: "coco", tpb.ARTIFACT_KIND_MOT_TRACKS: "mot",
           tpb.ARTIFACT_KIND_KEYPOINTS_CSV: "csv"}
TIME_BASE = Fraction(1, 90000)
SEGMENT_RE = re.compile(r"^seg-(\d{8})-(\d{8})\.(mp4|jsonl)$")
# Audio codecs an MP4 carries as they are; anything else is re-encoded to AAC.
MP4_AUDIO = {"aac", "mp3", "ac3", "eac3", "alac"}


def wanted_outputs(options: tpb.TaskOptions) -> set[int]:
    return set(options.outputs) - {tpb.ARTIFACT_KIND_UNSPECIFIED} or set(ARTIFACT_FILES)


def keypoints_record(frame: pb.Frame) -> dict:
    return {
        "index": frame.index,
        "timestamp_s": round(frame.timestamp_s, 6),
        "width": frame.width,
        "height": frame.height,
        "persons": [{
            "track_id": p.track_id,
            "box": [round(p.box.x1, 2), round(p.box.y1, 2), round(p.box.x2, 2), round(p.box.y2, 2)],
            "score": round(p.score, 4),
            "keypoints": [[round(k.x, 2), round(k.y, 2), round(k.score, 4)] for k in p.keypoints],
        } for p in frame.persons],
    }


def fit(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """The image scaled into width x height, aspect kept, centred on black (a mid-stream size change)."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    scale = min(width / w, height / h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    canvas = np.zeros((height, width, 3), np.uint8)
    x, y = (width - nw) // 2, (height - nh) // 2
    canvas[y:y + nh, x:x + nw] = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    return canvas


@dataclass
class KeyframeClock:
    """When a live task's next picture must be a keyframe. Players start (and, after a loss, resume) only
    at one, so one comes at least every `interval_s` of media time and of wall time, however few frames the
    source keeps. A GOP counted in frames (the encoder's `g`) is fps x interval frames: with 9 frames in 10
    dropped at the source that was minutes, and a player joining got no picture for as long.

    A picture is made a keyframe when waiting for the next one would pass the interval, judging the next
    frame's time by the last gap between frames: at 0.4 s a frame and a 2 s interval, keyframes 1.6-2.0 s
    apart, never 2.4."""

    interval_s: float
    key: tuple[float, float] | None = None  # (media time, wall time) of the last keyframe
    last: tuple[float, float] | None = None  # of the last picture

    def due(self, media_s: float, wall_s: float) -> bool:
        if self.key is None or self.last is None or media_s < self.key[0]:
            return True  # the first picture, or time went back (the task runs again from its start)
        room = self.interval_s - 1e-6
        return any(now - key + max(0.0, now - last) >= room
                   for now, key, last in zip((media_s, wall_s), self.key, self.last))

    def coded(self, media_s: float, wall_s: float, keyframe: bool) -> None:
        """A picture was coded: a keyframe (forced, or the encoder's own: a new segment's first) or not."""
        self.last = (media_s, wall_s)
        if keyframe:
            self.key = (media_s, wall_s)


@dataclass
class EncoderSettings:
    preset: str = "veryfast"
    crf: int = 23
    segment_frames: int = 60  # Settings.segment_frames
    # A live task codes for latency: no lookahead, a keyframe at least every `live_keyframe_s` of media and
    # of wall time (KeyframeClock), whatever the frame rate that reaches annotate.
    live: bool = False
    live_keyframe_s: float = 2.0


@dataclass
class Segment:
    """The segment being written by this worker."""

    first: int
    video: av.container.OutputContainer | None
    stream: object
    jsonl: object
    video_tmp: Path
    jsonl_tmp: Path
    last: int = -1


@dataclass
class ResultWriter:
    """One task's outputs on this worker."""

    task_id: str
    store: BlobStore
    scratch: Path  # this worker's own folder
    outputs: set
    size: tuple[int, int]  # the first frame's width, height: the video's size
    fps: float
    settings: EncoderSettings
    worker: str
    epoch: int = 0
    publisher: object = None  # a live task's RtspPublisher: offered every coded packet
    segment: Segment | None = None
    frames: int = 0
    warnings: list[str] = field(default_factory=list)
    durable: int = -1  # the last index of the finished segments (those of earlier owners included)
    frames_total: int = 0
    keyframes: KeyframeClock | None = None  # a live task's
    checked_published: float = 0.0  # when the store was last asked (published_elsewhere)
    seen_published: bool = False

    def __post_init__(self) -> None:
        self.durable = _chain_end(self.store.names(self.partial))
        if self.settings.live:
            self.keyframes = KeyframeClock(self.settings.live_keyframe_s)

    @property
    def partial(self) -> str:
        return names.partial_prefix(self.task_id, self.epoch)

    @property
    def final(self) -> str:
        return names.results_prefix(self.task_id)

    def published_elsewhere(self, every_s: float = 1.0) -> bool:
        """Whether the task's result is already published (by another replica), asking the store at most
        every `every_s`: per frame that would be a request to the object store each time."""
        now = time.monotonic()
        if not self.seen_published and now - self.checked_published >= every_s:
            self.checked_published = now
            self.seen_published = self.store.is_published(self.final)
        return self.seen_published

    @property
    def video(self) -> bool:
        return tpb.ARTIFACT_KIND_ANNOTATED_VIDEO in self.outputs

    # ------------------------------------------------------------------ segments

    def _open_segment(self, first: int) -> Segment:
        self.scratch.mkdir(parents=True, exist_ok=True)
        video_tmp = self.scratch / f"{self.task_id}-e{self.epoch}-open.mp4"
        jsonl_tmp = self.scratch / f"{self.task_id}-e{self.epoch}-open.jsonl"
        container = stream = None
        if self.video:
            container = av.open(str(video_tmp), "w", format="mp4")
            width, height = self.size
            stream = container.add_stream("libx264", rate=Fraction(self.fps or 30.0).limit_denominator(1001))
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"
            stream.codec_context.time_base = TIME_BASE
            # No B-frames: every packet's decode time equals its presentation time, so segments coded
            # apart join into one stream with times that only grow, and a live viewer waits for no reordering.
            stream.options = {"preset": self.settings.preset, "crf": str(self.settings.crf), "bf": "0"}
            if self.settings.live:
                keyint = max(1, round((self.fps or 25.0) * self.settings.live_keyframe_s))
                stream.options.update({"tune": "zerolatency", "g": str(keyint)})
        return Segment(first, container, stream, open(jsonl_tmp, "w"), video_tmp, jsonl_tmp)

    def write(self, frame: pb.Frame, image: np.ndarray | None) -> None:
        """Append one frame (index order); `image` is the drawn picture when the video is wanted."""
        if self.segment is None:
            self.segment = self._open_segment(frame.index)
        seg = self.segment
        if seg.video is not None:
            picture = _video_frame(fit(image, *self.size), seg.stream.pix_fmt)
            picture.pts = round(frame.timestamp_s / TIME_BASE)
            picture.time_base = TIME_BASE
            now = time.monotonic()
            if self.keyframes is not None and self.keyframes.due(frame.timestamp_s, now):
                picture.pict_type = PictureType.I  # libx264: an IDR picture (closed GOP)
            for packet in seg.stream.encode(picture):  # live: no lookahead, so this picture's packet
                seg.video.mux(packet)
                if self.keyframes is not None:
                    self.keyframes.coded(frame.timestamp_s, now, packet.is_keyframe)
                if self.publisher is not None:
                    self.publisher.offer(packet, seg.stream)
        seg.jsonl.write(json.dumps(keypoints_record(frame), separators=(",", ":")) + "\n")
        seg.last = frame.index
        self.frames += 1
        if seg.last - seg.first + 1 >= self.settings.segment_frames:
            self.close_segment()

    def close_segment(self) -> int | None:
        """Finish the open segment and put it in place; returns its last index (None: nothing open)."""
        seg, self.segment = self.segment, None
        if seg is None:
            return None
        if seg.video is not None:
            for packet in seg.stream.encode(None):
                seg.video.mux(packet)
                if self.publisher is not None:
                    self.publisher.offer(packet, seg.stream)
            seg.video.close()
        seg.jsonl.close()
        name = f"seg-{seg.first:08d}-{seg.last:08d}"
        if seg.video is not None:
            self.store.put_file(self.partial + f"{name}.mp4", seg.video_tmp, move=True)
        self.store.put_file(self.partial + f"{name}.jsonl", seg.jsonl_tmp, move=True)  # last: now it counts
        self.durable = max(self.durable, seg.last)
        return seg.last

    def abandon(self) -> None:
        """Stop writing (the task moved away or ended): the open segment goes, finished ones stay."""
        seg, self.segment = self.segment, None
        if seg is None:
            return
        try:
            if seg.video is not None:
                seg.video.close()
            seg.jsonl.close()
        except Exception:  # noqa: BLE001 - best-effort: a half-written file is deleted either way
            log.debug("closing an abandoned segment of %s", self.task_id, exc_info=True)
        seg.video_tmp.unlink(missing_ok=True)
        seg.jsonl_tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ the end

    def published(self) -> pb.TaskResult | None:
        """The task's result when one is already in place (None otherwise).

        Two replicas may write one task at once (a member the broker dropped from the group still works
        until it hears so; a rebalance on the local broker can overlap): both write equal segments, and
        whoever publishes first wins. The other finds the result here and reports it instead of failing
        or replacing it. Redelivered work on files gets the same treatment as redelivered frames."""
        if not self.store.is_published(self.final):
            return None
        artifacts = []
        for kind in sorted(self.outputs):
            name, content_type = ARTIFACT_FILES[kind]
            size = self.store.size(self.final + name)
            if size is not None:
                artifacts.append(tpb.Artifact(kind=kind, file_name=name, size_bytes=size, content_type=content_type,
                                              sha256=blob_sha256(self.store, self.final + name)))
        return pb.TaskResult(task_id=self.task_id, artifacts=artifacts, frames_written=self.frames_total or 0,
                             warnings=self.warnings)

    def publish(self, total: int, upload: Path | None, start_s: float) -> pb.TaskResult:
        """All frames are written: join the segments, add the audio, and make the result visible at once."""
        self.frames_total = total
        done = self.published()
        if done is not None:
            self.abandon()
            self.store.delete_prefix(self.partial)  # what this writer made after the other published
            return done
        assembly = self.scratch / f"{self.task_id}-e{self.epoch}-assembly"  # this worker's own
        try:
            return self._publish(total, upload, start_s, assembly)
        except OSError:
            done = self.published()  # another replica published while this one assembled
            if done is None:
                raise
            return done
        finally:
            shutil.rmtree(assembly, ignore_errors=True)

    def _publish(self, total: int, upload: Path | None, start_s: float, assembly: Path) -> pb.TaskResult:
        self.close_segment()
        segments = _chain(self.store.names(self.partial))
        if total and (not segments or segments[-1][1] != total - 1):
            raise RuntimeError(f"segments of task {self.task_id} end at {segments[-1][1] if segments else -1}, "
                               f"not at its last frame {total - 1}")
        shutil.rmtree(assembly, ignore_errors=True)
        assembly.mkdir(parents=True)
        names = [f"seg-{a:08d}-{b:08d}" for a, b in segments]
        if self.outputs & {tpb.ARTIFACT_KIND_KEYPOINTS, *EXPORTS}:
            with open(assembly / KEYPOINTS_FILE, "wb") as out:
                for name in names:
                    for chunk in self.store.read_chunks(self.partial + f"{name}.jsonl"):
                        out.write(chunk)
            exports.write(assembly / KEYPOINTS_FILE, {EXPORTS[kind]: assembly / ARTIFACT_FILES[kind][0]
                                                      for kind in self.outputs & set(EXPORTS)})
            if tpb.ARTIFACT_KIND_KEYPOINTS not in self.outputs:  # only made for the exports
                (assembly / KEYPOINTS_FILE).unlink()
        if self.video:
            with contextlib.ExitStack() as copies:  # local files for the muxer (the store's own, if local)
                parts = [copies.enter_context(self.store.local_copy(self.partial + f"{n}.mp4")) for n in names]
                if None in parts:
                    raise RuntimeError(f"a video segment of task {self.task_id} is missing from the store")
                last_s = _last_time(b"".join(self.store.read_chunks(self.partial + f"{names[-1]}.jsonl"))
                                    ) if names else 0.0
                self.warnings += join_video(parts, assembly / VIDEO_FILE, upload, start_s, self.size, last_s)
        artifacts = []
        for kind in sorted(self.outputs):
            name, content_type = ARTIFACT_FILES[kind]
            path = assembly / name
            if not path.exists():
                continue
            with open(path, "rb") as f:
                os.fsync(f.fileno())
            artifacts.append(tpb.Artifact(kind=kind, file_name=name, size_bytes=path.stat().st_size,
                                          content_type=content_type, sha256=sha256_of(path)))
        # The whole result becomes visible at once, and a result already in place is never replaced: the
        # first publisher wins, a later one reports the winner's (published()).
        if not self.store.publish_dir(self.final, assembly):
            done = self.published()
            if done is not None:
                self.store.delete_prefix(self.partial)
                return done
            raise RuntimeError(f"the result of task {self.task_id} was neither published nor there")
        self.store.delete_prefix(self.partial)
        return pb.TaskResult(task_id=self.task_id, artifacts=artifacts, frames_written=total,
                             warnings=self.warnings)


def _video_frame(image: np.ndarray, pix_fmt: str) -> av.VideoFrame:
    """A BGR picture as the encoder's input. For 4:2:0 OpenCV converts (2.1 ms a 1080p frame with the
    copy, where swscale's bgr24 conversion takes 4.2 ms); BT.601 limited range either way."""
    if pix_fmt == "yuv420p":
        return av.VideoFrame.from_ndarray(cv2.cvtColor(image, cv2.COLOR_BGR2YUV_I420), format="yuv420p")
    return av.VideoFrame.from_ndarray(image, format="bgr24")


def _chain(segment_names: list[str]) -> list[tuple[int, int]]:
    """The finished segments that continue each other from frame 0: [(first, last), ...]."""
    found: dict[int, int] = {}
    for name in segment_names:
        m = SEGMENT_RE.match(name)
        if m and m.group(3) == "jsonl":
            found[int(m.group(1))] = max(found.get(int(m.group(1)), -1), int(m.group(2)))
    chain, nxt = [], 0
    while nxt in found:
        chain.append((nxt, found[nxt]))
        nxt = found[nxt] + 1
    return chain


def _chain_end(segment_names: list[str]) -> int:
    chain = _chain(segment_names)
    return chain[-1][1] if chain else -1


def join_video(segments: list[Path], out_path: Path, upload: Path | None, start_s: float,
               size: tuple[int, int], last_frame_s: float) -> list[str]:
    """The segments' H.264 packets in one MP4 (moov first), interleaved with the upload's audio shifted
    to the same origin and cut a second after the last frame (at `last_frame_s`). Returns warnings."""
    warnings: list[str] = []
    inputs = [av.open(str(p)) for p in segments]
    audio_file = None
    try:
        out = av.open(str(out_path), "w", format="mp4", options={"movflags": "+faststart"})
        if not inputs:  # a video of no frames: an empty, valid MP4 is still a truthful answer
            out.close()
            return warnings
        video_out = out.add_stream_from_template(inputs[0].streams.video[0])
        video_out.time_base = TIME_BASE
        packets = [_video_packets(c) for c in inputs]
        audio_packets = iter(())
        if upload is not None and upload.exists():
            try:
                audio_file = media.MediaFile(upload, 1)
                if audio_file.container.streams.audio:
                    audio_packets, note = _audio(audio_file, out, start_s)
                    if note:
                        warnings.append(note)
            except (media.NotAVideo, av.FFmpegError):
                warnings.append("the upload's audio could not be read; the annotated video has none")
        video_end = last_frame_s + 1.0
        merged = heapq.merge(*(((t, 0, p) for t, p in seq) for seq in packets),
                             ((t, 1, p) for t, p in audio_packets), key=lambda x: (x[0], x[1]))
        for t, kind, packet in merged:
            if kind == 0:
                packet.stream = video_out
            elif t > video_end:
                continue  # audio running past the last frame (a file cut short): stop with the picture
            out.mux(packet)
        out.close()
    finally:
        for c in inputs:
            c.close()
        if audio_file is not None:
            audio_file.__exit__(None, None, None)
    return warnings


def _last_time(keypoints: bytes) -> float:
    """The presentation time of a segment's last frame, from its keypoints lines."""
    lines = keypoints.strip().splitlines()
    return float(json.loads(lines[-1])["timestamp_s"]) if lines else 0.0


def _video_packets(container):
    stream = container.streams.video[0]
    for packet in container.demux(stream):
        if packet.dts is None:
            continue
        yield float(packet.pts * packet.time_base), packet


def _audio(audio_file: media.MediaFile, out, start_s: float):
    """(time-ordered audio packets for `out`, a warning or "") from the upload's first audio stream."""
    source = audio_file.container.streams.audio[0]
    name = source.codec_context.name
    if name in MP4_AUDIO:
        stream = out.add_stream_from_template(source)
        return _copied_audio(audio_file.container, source, stream, start_s), ""
    stream = out.add_stream("aac", rate=source.codec_context.sample_rate or 48000)
    stream.layout = source.codec_context.layout.name if source.codec_context.layout else "stereo"
    return _encoded_audio(audio_file.container, source, stream, start_s), f"the audio ({name}) was re-encoded to AAC"


def _copied_audio(container, source, stream, start_s: float):
    shift = round(start_s / source.time_base) if source.time_base else 0
    for packet in container.demux(source):
        if packet.dts is None or packet.pts is None:
            continue
        packet.pts -= shift
        packet.dts -= shift
        if packet.pts < 0:
            continue
        packet.stream = stream
        yield float(packet.pts * packet.time_base), packet


def _encoded_audio(container, source, stream, start_s: float):
    resampler = av.AudioResampler(format="fltp", layout=stream.layout, rate=stream.rate)
    for frame in container.decode(source):
        if frame.time is None or frame.time < start_s:
            continue
        for out_frame in resampler.resample(frame):
            out_frame.pts = None
            for packet in stream.encode(out_frame):
                yield float(packet.pts * packet.time_base) if packet.pts is not None else 0.0, packet
    for packet in stream.encode(None):
        yield float(packet.pts * packet.time_base) if packet.pts is not None else 0.0, packet
