"""Uploads as video: prove a file decodes (by content, not by name) and iterate its frames upright."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import av
import cv2
import numpy as np

from posemesh.v1 import task_service_pb2 as tpb


class NotAVideo(ValueError):
    """The upload is not a decodable video; the message says why, for the uploader."""


def _clockwise(rotation: int) -> int:
    # PyAV reports the display matrix's angle counter-clockwise; players turn the picture the other way.
    return (-int(rotation or 0)) % 360


def upright(image: np.ndarray, clockwise: int) -> np.ndarray:
    if clockwise == 90:
        return cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
    if clockwise == 180:
        return cv2.rotate(image, cv2.ROTATE_180)
    if clockwise == 270:
        return cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return image


def probe(path: Path) -> tpb.VideoInfo:
    """Open with PyAV, demux every packet and decode the first frame. Raises NotAVideo saying why."""
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise NotAVideo(f"not a readable video container ({exc.__class__.__name__}: {exc})") from None
    with container:
        if not container.streams.video:
            raise NotAVideo("the file has no video stream")
        stream = container.streams.video[0]
        declared = stream.frames
        packets, first = 0, None
        try:
            for packet in container.demux(stream):
                if packet.size == 0:
                    continue
                packets += 1
                if first is None:
                    for frame in packet.decode():
                        first = frame
                        break
        except av.FFmpegError as exc:
            raise NotAVideo(f"the video is damaged after {packets} packets ({exc})") from None
        if first is None:
            raise NotAVideo("no frame of the video stream could be decoded")
        if declared and packets < declared:
            raise NotAVideo(f"the video is truncated: the container declares {declared} frames but holds {packets}")
        rotation = _clockwise(getattr(first, "rotation", 0))
        width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 30.0
        return tpb.VideoInfo(width=width, height=height, fps=fps, frame_count=declared or packets,
                             codec=stream.codec_context.name, rotation=rotation)


@dataclass
class DecodedFrame:
    index: int
    timestamp_s: float
    image: np.ndarray  # BGR, upright


def frames(path: Path, fps: float) -> Iterator[DecodedFrame]:
    """Every frame in presentation order, rotated as the container asks."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for index, frame in enumerate(container.decode(stream)):
            ts = float(frame.time) if frame.time is not None else index / fps
            image = upright(frame.to_ndarray(format="bgr24"), _clockwise(getattr(frame, "rotation", 0)))
            yield DecodedFrame(index, ts, image)
