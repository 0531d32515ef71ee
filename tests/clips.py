"""Generated clips for the input and output tests: real encodes (PyAV/FFmpeg) of real footage, with the
property under test dialled in (variable frame rate, audio, odd size, rotation, size changes, gaps)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from posemesh.mesh.settings import default_media_dir

SOURCE = default_media_dir() / "mmpose_demo_960x540_5f.mp4"


def source_frames(size: tuple[int, int]) -> list[np.ndarray]:
    """The five frames of the mmpose demo (people in a mall), resized to width x height, BGR."""
    import cv2

    with av.open(str(SOURCE)) as c:
        return [cv2.resize(f.to_ndarray(format="bgr24"), size, interpolation=cv2.INTER_AREA) for f in c.decode(video=0)]


def synth(path: Path, frames: int, size=(320, 180), fps: float = 10, times: list[float] | None = None,
          audio_s: float = 0.0, rotation: int = 0, fmt: str | None = None, codec: str = "libx264",
          pix_fmt: str | None = None, start_s: float = 0.0) -> Path:
    """`frames` frames of real footage at `size`. `times` (seconds) makes the frame rate variable;
    `audio_s` adds that many seconds of AAC (a 440 Hz tone); `rotation` (counter-clockwise degrees) is
    written as the display matrix, as phones do; `start_s` shifts every timestamp (a stream that does
    not start at 0)."""
    width, height = size
    images = source_frames(size)
    times = times if times is not None else [i / fps for i in range(frames)]
    tb = Fraction(1, 90000)
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = width, height
        stream.pix_fmt = pix_fmt or ("yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p")
        stream.codec_context.time_base = tb
        if codec == "libx264":
            stream.options = {"preset": "ultrafast"}
        if rotation:
            stream.set_display_rotation(rotation)
        audio = None
        if audio_s:
            audio = out.add_stream("aac", rate=48000)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(images[i % len(images)], format="bgr24")
            frame.pts = round((times[i] + start_s) / tb)
            frame.time_base = tb
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
        if audio is not None:
            n = 1024
            for k in range(int(audio_s * 48000) // n):
                t = (np.arange(n) + k * n) / 48000
                tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
                chunk = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
                chunk.sample_rate = 48000
                chunk.pts = k * n + round(start_s * 48000)
                for packet in audio.encode(chunk):
                    out.mux(packet)
            for packet in audio.encode(None):
                out.mux(packet)
    return path


def avi_with_gaps(path: Path, frames: int = 20) -> Path:
    """H.264 + AAC in AVI with a frame every other time slot: the header "declares" twice the frames it
    holds (AVI counts time slots), as phones' and cameras' variable-rate AVIs do."""
    images = source_frames((320, 180))
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 30)
        stream.options = {"preset": "ultrafast", "bf": "0"}
        audio = out.add_stream("aac", rate=48000)
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(images[i % len(images)], format="bgr24")
            frame.pts, frame.time_base = 2 * i, Fraction(1, 30)
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
        n = 1024
        for k in range(int(frames / 15 * 48000) // n):
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, n), np.float32), format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 48000, k * n
            for packet in audio.encode(chunk):
                out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)
    return path


def resolution_change(path: Path) -> Path:
    """MPEG-TS whose H.264 stream switches from 320x180 to 480x270 after 5 frames (in-band SPS), as a
    camera that changes resolution mid-recording writes it."""
    small, large = source_frames((320, 180)), source_frames((480, 270))
    with av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 180, "yuv420p"
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(small[i], format="bgr24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
        encoder = av.CodecContext.create("libx264", "w")
        encoder.width, encoder.height, encoder.pix_fmt = 480, 270, "yuv420p"
        encoder.time_base, encoder.framerate = Fraction(1, 10), 10
        packets = []
        for i in range(5):
            frame = av.VideoFrame.from_ndarray(large[i], format="bgr24")
            frame.pts = i
            packets += encoder.encode(frame)
        packets += encoder.encode(None)
        for packet in packets:
            packet.pts, packet.dts, packet.time_base = packet.pts + 5, packet.dts + 5, Fraction(1, 10)
            packet.stream = stream
            out.mux(packet)
    return path


def mjpeg_avi(path: Path, size: tuple[int, int], frames: int = 2) -> Path:
    """Motion-JPEG frames of `size` (tiny files: flat colour compresses to almost nothing)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mjpeg", rate=5)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuvj420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((size[1], size[0], 3), 90, np.uint8), format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def audio_only(path: Path) -> Path:
    with av.open(str(path), "w", format="matroska") as out:
        audio = out.add_stream("aac", rate=48000)
        for k in range(20):
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts = 48000, k * 1024
            for packet in audio.encode(chunk):
                out.mux(packet)
        for packet in audio.encode(None):
            out.mux(packet)
    return path


def remux(src: Path, dst: Path, fmt: str) -> Path:
    """The same packets in another container (e.g. an MP4 as MPEG-TS)."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format=fmt) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams if s.type in ("video", "audio")}
        for packet in inp.demux(*[s for s in inp.streams if s.index in streams]):
            if packet.dts is None:
                continue
            packet.stream = streams[packet.stream.index]
            out.mux(packet)
    return dst


def repeat(src: Path, dst: Path, times: int) -> Path:
    """The clip `times` times in a row, as one MP4 (packets copied, timestamps shifted): a long camera."""
    with av.open(str(src)) as first:
        stream = first.streams.video[0]
        packets = [p for p in first.demux(stream) if p.dts is not None]
        step = packets[1].pts - packets[0].pts if len(packets) > 1 else 1
        span = max(p.pts for p in packets) - min(p.pts for p in packets) + step
    with av.open(str(dst), "w") as out:
        target = None
        for k in range(times):
            with av.open(str(src)) as inp:
                s = inp.streams.video[0]
                if target is None:
                    target = out.add_stream_from_template(s)
                for packet in inp.demux(s):
                    if packet.dts is None:
                        continue
                    packet.pts += k * span
                    packet.dts += k * span
                    packet.stream = target
                    out.mux(packet)
    return dst
