"""JPEG in and out of the mesh, with libjpeg-turbo's own API (simplejpeg).

Measured on a 1080p frame, one core: a full decode takes 6.4 ms through simplejpeg and 12.2 ms through
OpenCV's imdecode, with identical pixels; a decode at 1/4 scale (all the detector needs) about 4 ms
through either. Encoding a BGR picture stays with OpenCV (6.1 ms, the same as simplejpeg); a decoded video frame
in the right colours is encoded from its own YUV planes (media.frame_jpeg), which skips two colour conversions.
"""

from __future__ import annotations

import cv2
import numpy as np
import simplejpeg
from prometheus_client import Counter

# How many JPEGs each process decodes and encodes (the benchmark divides by frames).
DECODES = Counter("posemesh_jpeg_decodes_total", "JPEG decodes", ["scale"])
ENCODES = Counter("posemesh_jpeg_encodes_total", "JPEG encodes")


class BadJpeg(ValueError):
    """The bytes are not a JPEG that decodes."""


def decode(jpeg: bytes, buffer: np.ndarray | None = None) -> np.ndarray:
    """The whole picture, BGR (in `buffer` when given: at least height x width x 3 bytes).

    Chroma is upsampled by repeating each sample (libjpeg-turbo's fast upsampling) rather than by its smoothing
    filter: 4.2 against 4.7-5.3 ms a 1080p frame, pixels 0.1 level apart on average (bench/frame_jpeg.py). Every
    full decode in the mesh is this one, so a frame decoded by pose or by annotate is the same picture."""
    DECODES.labels("full").inc()
    try:
        return simplejpeg.decode_jpeg(jpeg, "BGR", buffer=buffer, fastupsample=True)
    except ValueError as exc:
        raise BadJpeg(f"undecodable JPEG ({exc})") from None


class Pictures:
    """Full decodes into buffers that are kept and written over again, for a stage that holds a batch of
    decoded frames at once (pose).

    Fresh arrays for a batch of decoded frames went back to the kernel between batches and came again as page
    faults: about 3 ms of CPU a 1080p frame in the pose worker (13.1-14.1 against 10.3-10.8 ms a frame in the
    stack; bench/README.md, 2026-12-04, has the measurements). A stage that decodes one frame at a time and drops it
    (annotate) measured the same either way, and keeps `decode`. A picture handed out stays valid until the next
    recycle(): call it when every picture decoded since the last one is no longer used (the next batch). At most
    RETAIN_BYTES of buffers are kept between batches (ten 1080p frames, two 4K ones); the rest are allocated and
    dropped as before.
    """

    RETAIN_BYTES = 64 * 1024 * 1024

    def __init__(self) -> None:
        self.free: list[np.ndarray] = []  # flat uint8 buffers, no picture of the current batch in them
        self.lent: list[np.ndarray] = []

    def decode(self, data: bytes) -> np.ndarray:
        """The whole picture, BGR, in a buffer of this object's (valid until the next recycle())."""
        try:
            height, width, _colorspace, _subsampling = simplejpeg.decode_jpeg_header(data)
        except ValueError as exc:
            raise BadJpeg(f"undecodable JPEG ({exc})") from None
        size = height * width * 3
        fits = [i for i, b in enumerate(self.free) if size <= b.size <= 2 * size]
        buffer = self.free.pop(fits[-1]) if fits else np.empty(size, np.uint8)  # the smallest that fits
        self.lent.append(buffer)
        return decode(data, buffer)

    def recycle(self) -> None:
        """Every picture decoded so far may be written over from now on."""
        self.free.extend(self.lent)
        self.lent.clear()
        # Largest first, each kept while the budget allows: a frame too big for it alone (8K) leaves the
        # smaller buffers kept.
        kept: list[np.ndarray] = []
        budget = self.RETAIN_BYTES
        for buffer in sorted(self.free, key=lambda b: b.size, reverse=True):
            if buffer.size <= budget:
                kept.append(buffer)
                budget -= buffer.size
        self.free = kept


def decode_for(jpeg: bytes, width: int, height: int, longest_side: int) -> tuple[np.ndarray, float]:
    """The picture at the smallest DCT scale (1/8, 1/4, 1/2, 1) whose longest side is still at least
    `longest_side`, and the factor from its pixels back to the frame's."""
    longest = max(width, height)
    scale = 1
    DECODES.labels("reduced").inc()
    for factor in (8, 4, 2):
        if longest and longest / factor >= longest_side:
            scale = factor
            break
    try:
        image = simplejpeg.decode_jpeg(jpeg, "BGR", min_width=max(1, -(-width // scale)),
                                       min_height=max(1, -(-height // scale)))
    except ValueError as exc:
        raise BadJpeg(f"undecodable JPEG ({exc})") from None
    return image, (width / image.shape[1]) if width else 1.0


def encode_yuv420(y: np.ndarray, cb: np.ndarray, cr: np.ndarray, quality: int) -> bytes:
    """A JPEG of full-range BT.601 planes, the chroma ones at half width and height (media.jfif_planes)."""
    ENCODES.inc()
    return simplejpeg.encode_jpeg_yuv_planes(y, cb, cr, quality=quality)


def encode(image: np.ndarray, quality: int) -> bytes:
    ENCODES.inc()
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise BadJpeg("JPEG encoding failed")
    return data.tobytes()
