"""Uploads as video files and nothing else: open, check and decode them safely.

Uploads come from strangers, and FFmpeg can do far more than decode a video file: follow an HLS
playlist or a concat script to other files and URLs, read an image sequence, render text or
subtitles as video, open the sockets an SDP file describes. So:

- The container is chosen here, from the file's first bytes, out of an allow-list of video containers
  (`sniff`). FFmpeg never probes by itself, and the stored upload's name never comes from the user.
- An MP4/MOV's boxes are checked before FFmpeg opens it (`posemesh.mesh.mp4_boxes`): FFmpeg builds an
  index entry for every sample the file declares, so counts impossible for the file's bytes are refused
  and the memory a file can make FFmpeg take grows with its real size, not with what it says.
- The file is handed to FFmpeg as an open file object with every protocol forbidden, so no demuxer can
  open another file or URL; the MP4 demuxer's external data references stay off.
- Video codecs come from an allow-list. Size, frame count, duration and frame rate are capped before a
  frame is decoded, and the decoder itself refuses frames above the pixel cap (a header can lie).
- Whether a file is usable is decided by what decodes, not by what its index declares: a file that
  ends early is processed as far as it goes, with a warning on the task.

Messages are for the uploader: they never contain a server path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np

from posemesh.mesh import jpeg, mp4_boxes
from posemesh.v1 import task_service_pb2 as tpb

# Demuxers that read one self-contained video file. Name -> extra demuxer options.
DEMUXERS: dict[str, dict[str, str]] = {
    "mov": {"enable_drefs": "0", "use_absolute_path": "0"},  # MP4, MOV, 3GP
    "matroska": {},  # MKV, WebM
    "avi": {},
    "mpegts": {},  # TS and M2TS
    "mpeg": {},  # MPEG program stream
    "flv": {},
}
CONTAINER_NAMES = "MP4/MOV, Matroska/WebM, AVI, MPEG-TS, MPEG-PS or FLV"
VIDEO_CODECS = {"h264", "hevc", "av1", "vp8", "vp9", "mpeg4", "msmpeg4v3", "mpeg2video", "mpeg1video", "mjpeg",
                "h263", "prores", "dnxhd"}
MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"}
SNIFF_BYTES = 4096


class NotAVideo(ValueError):
    """The upload is not a video posemesh accepts; the message says why, for the uploader."""


@dataclass(frozen=True)
class Limits:
    max_frame_pixels: int = 3840 * 2160
    max_frame_side: int = 4096
    max_frames: int = 108_000
    max_duration_s: float = 3600.0
    max_fps: float = 120.0

    @classmethod
    def from_settings(cls, settings) -> Limits:
        return cls(settings.max_frame_pixels, settings.max_frame_side, settings.max_frames,
                   settings.max_duration_s, settings.max_fps)

    def check_size(self, width: int, height: int) -> None:
        if width > self.max_frame_side or height > self.max_frame_side or width * height > self.max_frame_pixels:
            raise NotAVideo(f"frames of {width}x{height} exceed the limit of {self.max_frame_side} pixels a side and "
                            f"{self.max_frame_pixels} pixels a frame: scale the video down")


# The default caps, shared: a Limits is frozen.
DEFAULT_LIMITS = Limits()


def sniff(head: bytes) -> str | None:
    """The demuxer for a file starting with `head`, or None when it is no container we accept."""
    if len(head) >= 8 and head[4:8] in MP4_BOXES:
        return "mov"
    if head[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        return "avi"
    if head[:4] == b"\x00\x00\x01\xba":
        return "mpeg"
    if head[:4] == b"FLV\x01":
        return "flv"
    for size, start in ((188, 0), (192, 4)):  # MPEG-TS, and M2TS with its 4-byte timecode
        if len(head) > start + 3 * size and all(head[start + k * size] == 0x47 for k in range(4)):
            return "mpegts"
    return None


class MediaFile:
    """An upload opened for demuxing with the safeguards above; use as a context manager."""

    def __init__(self, path: Path, max_frame_pixels: int):
        self.file = open(path, "rb")
        self.index: mp4_boxes.Index | None = None  # what an MP4's boxes declare, checked
        try:
            demuxer = sniff(self.file.read(SNIFF_BYTES))
            if demuxer is None:
                raise NotAVideo(f"not a video file posemesh accepts: send {CONTAINER_NAMES}")
            if demuxer == "mov":
                try:
                    self.index = mp4_boxes.check(self.file, os.fstat(self.file.fileno()).st_size)
                except mp4_boxes.Damaged as exc:
                    raise NotAVideo(str(exc)) from None
            self.file.seek(0)
            try:
                self.container = av.open(self.file, mode="r", format=demuxer, options={
                    **DEMUXERS[demuxer], "format_whitelist": demuxer, "protocol_whitelist": "none"})
            except av.FFmpegError as exc:
                raise NotAVideo(f"not a readable {demuxer} file ({_reason(exc)})") from None
            if not self.container.streams.video:
                self.container.close()
                raise NotAVideo("the file has no video stream")
            self.stream = self.container.streams.video[0]
            # The codec's own name: the decoder's can differ (AV1 is decoded by libdav1d).
            codec = self.codec = self.stream.codec_context.codec.canonical_name
            if codec not in VIDEO_CODECS:
                self.container.close()
                raise NotAVideo(f"video codec {codec!r} is not accepted: use one of {', '.join(sorted(VIDEO_CODECS))}")
            # The decoder refuses bigger frames whatever the header said (avcodec's max_pixels).
            self.stream.codec_context.options = {"max_pixels": str(max_frame_pixels)}
        except BaseException:
            self.file.close()
            raise

    def __enter__(self) -> MediaFile:
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.container.close()
        finally:
            self.file.close()


def _reason(exc: av.FFmpegError) -> str:
    """FFmpeg's words without the file name (which would be a server path)."""
    return getattr(exc, "strerror", None) or exc.__class__.__name__


def _clockwise(rotation: int) -> int:
    # PyAV reports the display matrix's angle counter-clockwise; players turn the picture the other way.
    return (-int(round(rotation or 0))) % 360


def upright(image: np.ndarray, clockwise: int) -> np.ndarray:
    if clockwise == 90:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if clockwise == 180:
        return cv2.rotate(image, cv2.ROTATE_180)
    if clockwise == 270:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image


@dataclass
class Probed:
    video: tpb.VideoInfo
    warnings: list[str] = field(default_factory=list)


def probe(path: Path, limits: Limits = DEFAULT_LIMITS) -> Probed:
    """Check an upload before any work starts: container, codec, caps, and that a frame decodes.
    Demuxes every packet (cheap: no decoding) to count frames and measure duration and frame rate."""
    warnings: list[str] = []
    with MediaFile(path, limits.max_frame_pixels) as media:
        stream = media.stream
        ctx = stream.codec_context
        if ctx.width and ctx.height:
            limits.check_size(ctx.width, ctx.height)
        declared = stream.frames
        if media.index is not None and media.index.video_samples() > limits.max_frames:
            raise NotAVideo(_too_many_frames(limits, f" (its index declares {media.index.video_samples()})"))
        packets = with_data = 0
        first_frame = None
        times: list[float] = []
        try:
            for packet in media.container.demux(stream):
                if packet.dts is None and packet.size == 0:
                    continue  # the end-of-stream marker PyAV adds
                packets += 1
                if packet.size == 0:
                    continue  # an empty index entry (AVI's "dropped frame"): nothing to decode
                with_data += 1
                if with_data > limits.max_frames:
                    raise NotAVideo(_too_many_frames(limits))
                if packet.pts is not None:
                    times.append(float(packet.pts * packet.time_base))
                if first_frame is None:
                    first_frame = _decode_first(packet)
        except av.FFmpegError as exc:
            warnings.append(f"the file is damaged after {packets} frames ({_reason(exc)}); the frames before "
                            "that are processed")
        if first_frame is None:
            first_frame = _flush_first(stream)
        if first_frame is None:
            raise NotAVideo("no frame of the video stream could be decoded")
        limits.check_size(first_frame.width, first_frame.height)
        duration = _duration(times, stream)
        warnings += _cut_short(media, declared, packets, duration)
        if duration > limits.max_duration_s:
            raise NotAVideo(f"the video lasts {duration:.0f} s, "
                            f"longer than the limit of {limits.max_duration_s:.0f} s: "
                            "cut it into shorter parts")
        fps = with_data / duration if duration > 0 and with_data > 1 else float(stream.average_rate or 0) or 30.0
        if fps > limits.max_fps:
            raise NotAVideo(f"the video has {fps:.0f} frames a second, more than the limit of {limits.max_fps:.0f}")
        rotation = _clockwise(getattr(first_frame, "rotation", 0))
        width, height = first_frame.width, first_frame.height
        if rotation in (90, 270):
            width, height = height, width
        audio = media.container.streams.audio
        start = float(first_frame.time) if first_frame.time is not None else 0.0
        return Probed(tpb.VideoInfo(width=width, height=height, fps=round(fps, 6), frame_count=with_data,
                                    codec=media.codec, rotation=rotation, duration_s=round(duration, 6),
                                    audio_codec=audio[0].codec_context.name if audio else "", start_s=start),
                      warnings)


def _too_many_frames(limits: Limits, declared: str = "") -> str:
    return f"the video has more than {limits.max_frames} frames{declared}, the most accepted: cut it into shorter parts"


def _cut_short(media: MediaFile, declared: int, packets: int, duration: float) -> list[str]:
    """A warning when the file ends before its own index says it should. Only MP4's sample table counts
    frames; AVI's header counts time slots (a valid AVI with gaps "declares" more frames than it holds)
    and Matroska or TS declare none, so for those the declared duration is compared instead."""
    if media.container.format.name.startswith("mov"):
        if declared and packets < declared:
            return [f"the file ends early: its index declares {declared} frames but {packets} are present; the "
                    "frames present are processed"]
        return []
    declared_s = (media.container.duration or 0) / 1e6
    if duration and declared_s > duration * 1.1 + 0.5:
        return [f"the file ends early: its header declares {declared_s:.1f} s but {duration:.1f} s of video are "
                "present; the frames present are processed"]
    return []


def _decode_first(packet):
    try:
        for frame in packet.decode():
            return frame
    except av.FFmpegError as exc:
        if "max_pixels" in str(exc) or isinstance(exc, av.ArgumentError):
            raise NotAVideo("the frames are larger than the accepted limit: scale the video down") from None
    return None  # an undecodable packet, or the decoder still filling its delay


def _flush_first(stream):
    try:
        for frame in stream.codec_context.decode(None):
            return frame
    except av.FFmpegError:
        pass
    return None


def span_duration(first: float, last: float, frames: int) -> float:
    """VideoInfo.duration_s: from the first frame's time to the end of the last, which lasts the average
    frame interval (5 frames at 5 fps: 1.0 s, as the container and the annotated MP4 say). Needs 2 frames."""
    span = last - first
    return span + span / (frames - 1)


def _duration(times: list[float], stream) -> float:
    """span_duration of the packets' presentation times; the stream's own duration under 2 of them."""
    if len(times) >= 2:
        times.sort()
        return span_duration(times[0], times[-1], len(times))
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return 0.0


# Frames whose colours a JPEG decoder reads right from their own planes. JFIF says YCbCr is BT.601's; FFmpeg
# takes an untagged frame for BT.601 too (AVColorSpace: 2 unspecified, 5 BT470BG, 6 SMPTE170M). A frame tagged
# otherwise (BT.709: most HD cameras and phones) goes to JPEG through BGR, which converts its colours.
JFIF_COLORSPACES = frozenset({2, 5, 6})
FULL_RANGE = 2  # AVColorRange JPEG; a yuvj format is full range whatever its tag
# Limited range (luma 16-235, chroma 16-240) stretched to JPEG's full 0-255, rounded.
LUMA_TO_FULL = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)
CHROMA_TO_FULL = np.clip(np.round((np.arange(256) - 128) * 255 / 224 + 128), 0, 255).astype(np.uint8)


def jfif_planes(frame: av.VideoFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The frame's Y, Cb and Cr planes as a JPEG holds them (4:2:0, full range, BT.601), or None when the
    frame is in another format (then only its BGR conversion says what it looks like)."""
    if (frame.format.name not in ("yuv420p", "yuvj420p") or frame.width % 2 or frame.height % 2
            or frame.colorspace not in JFIF_COLORSPACES):
        return None
    full = frame.format.name == "yuvj420p" or frame.color_range == FULL_RANGE
    planes = []
    for i, plane in enumerate(frame.planes):
        w, h = (frame.width, frame.height) if i == 0 else (frame.width // 2, frame.height // 2)
        pixels = np.frombuffer(plane, np.uint8).reshape(h, plane.line_size)[:, :w]
        planes.append(np.ascontiguousarray(pixels) if full
                      else cv2.LUT(pixels, LUMA_TO_FULL if i == 0 else CHROMA_TO_FULL))
    return planes[0], planes[1], planes[2]


def frame_jpeg(frame: av.VideoFrame, quality: int, clockwise: int = 0) -> tuple[bytes, int, int]:
    """The frame turned upright as a JPEG, and its width and height. A frame from a BT.601 (or untagged) 4:2:0
    video goes to JPEG from its own planes: no conversion to BGR and back, which took about a third of the 10 ms of
    CPU a 1080p frame's JPEG cost and read the colours less exactly (FFmpeg's integer conversion is about one level
    dark: bench/frame_jpeg.py)."""
    planes = jfif_planes(frame)
    if planes is None:
        image = upright(frame.to_ndarray(format="bgr24"), clockwise)
        return jpeg.encode(image, quality), image.shape[1], image.shape[0]
    y, cb, cr = (upright(p, clockwise) for p in planes)
    return jpeg.encode_yuv420(y, cb, cr, quality), y.shape[1], y.shape[0]


@dataclass
class DecodedFrame:
    index: int
    # Seconds from the first frame's presentation time: the same origin in every output.
    timestamp_s: float
    frame: av.VideoFrame  # as decoded
    clockwise: int  # the turn that makes it upright

    @property
    def image(self) -> np.ndarray:
        """BGR, upright (converted at each call)."""
        return upright(self.frame.to_ndarray(format="bgr24"), self.clockwise)

    def jpeg(self, quality: int) -> tuple[bytes, int, int]:
        """Upright, as a JPEG, with its width and height (frame_jpeg)."""
        return frame_jpeg(self.frame, quality, self.clockwise)


class FrameReader:
    """Every decodable frame in presentation order, upright, with dense indices. Packets that do not
    decode are skipped and counted (`skipped`); a frame above the caps ends the reading with NotAVideo.
    `sample_fps` keeps a frame only when its time reaches the next multiple of 1/sample_fps (0: all).
    Once read, `decoded` (frames given out) and `duration_s()` are what VideoInfo's frame_count and
    duration_s mean; `read` counts every frame that decoded, given out or not."""

    def __init__(self, path: Path, fps: float, limits: Limits = DEFAULT_LIMITS, sample_fps: float = 0.0):
        self.path, self.fps, self.limits = path, fps or 30.0, limits
        self.sample_step = 1.0 / sample_fps if sample_fps else 0.0
        self.skipped = 0
        self.decoded = 0  # frames given out
        self.read = 0  # frames that decoded
        self.last_s = 0.0  # the last decoded one's timestamp_s (the first one's is 0)

    def duration_s(self) -> float | None:
        """span_duration of the frames that decoded; None under 2 frames (no interval to measure)."""
        return span_duration(0.0, self.last_s, self.read) if self.read >= 2 else None

    def __iter__(self) -> Iterator[DecodedFrame]:
        with MediaFile(self.path, self.limits.max_frame_pixels) as media:
            stream = media.stream
            stream.thread_type = "AUTO"
            origin, last, index = None, -math.inf, 0
            step = 1.0 / self.fps
            next_sample = 0.0
            for packet in media.container.demux(stream):
                try:
                    frames = packet.decode()
                except av.FFmpegError:
                    self.skipped += 1
                    continue
                for frame in frames:
                    if frame.width * frame.height > self.limits.max_frame_pixels:
                        self.limits.check_size(frame.width, frame.height)
                    t = frame.time
                    if origin is None:
                        origin = t if t is not None else 0.0
                    ts = t - origin if t is not None else last + step
                    if ts <= last:  # missing or repeated timestamps: keep time moving forward
                        ts = last + step if last > -math.inf else 0.0
                    last = ts
                    self.read, self.last_s = self.read + 1, ts
                    if self.sample_step:
                        if ts < next_sample - 1e-6:
                            continue  # decoded (the next frames need it) but not kept: not encoded
                        # The multiple after this frame's time: a gap in the video skips samples, not the clock.
                        next_sample = (math.floor((ts + 1e-6) / self.sample_step) + 1) * self.sample_step
                    self.decoded = index + 1
                    yield DecodedFrame(index, ts, frame, _clockwise(getattr(frame, "rotation", 0)))
                    index += 1


def frames(path: Path, fps: float, limits: Limits = DEFAULT_LIMITS) -> Iterator[DecodedFrame]:
    """Shorthand for iterating a FrameReader."""
    return iter(FrameReader(path, fps, limits))
