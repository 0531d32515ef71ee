"""The fields of requests: what a valid one looks like, and how user input is echoed in errors.

Anything a user sent comes back in an error message only shortened (a 10,000-character id echoed whole
would overflow the caller's metadata limit) and never with a server path.
"""

from __future__ import annotations

import base64
import binascii
import math
import unicodedata

import grpc

from posemesh.mesh.names import TASK_ID_RE
from posemesh.v1 import task_service_pb2 as tpb

MAX_IDEMPOTENCY_KEY = 128
MAX_FILE_NAME = 255
MAX_PAGE_TOKEN = 64
MAX_OFFSET = 10**9


# The trailer of an UNAVAILABLE that the gateway answers about something else than itself: "source", a live
# source that does not answer. Clients that retry UNAVAILABLE (an unreachable or restarting gateway) do not
# retry this one by themselves: the gateway is there, and the camera is for the user to look at.
UNAVAILABLE_TRAILER = "posemesh-unavailable"


class Refused(Exception):
    """A request the gateway answers with `code` and `message` (raised anywhere in a call: the status
    interceptor, gateway/interceptors.py, turns it into the call's status, with `trailers`)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, str], ...] = ()):
        super().__init__(message)
        self.code, self.message, self.trailers = code, message, trailers


def shorten(text: str, limit: int = 40) -> str:
    """A quoted, printable, at most `limit`-character rendering of user input for messages."""
    clean = "".join(c if c.isprintable() else "?" for c in text[: limit + 1])
    if len(text) > limit:
        return repr(clean[:limit]) + f"... ({len(text)} characters)"
    return repr(clean)


def task_id(value: str) -> str:
    if not value:
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "task_id is required")
    if not TASK_ID_RE.match(value):
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"task_id {shorten(value)} is not a task id: task ids are 32 lowercase hex characters")
    return value


def display_file_name(value: str) -> str:
    """The upload's name as shown back to its owner: the last path component, printable, bounded.
    It is never used to name anything on the server."""
    name = value.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in unicodedata.normalize("NFC", name) if c.isprintable())
    return name[:MAX_FILE_NAME] or "upload"


def idempotency_key(value: str) -> str:
    if len(value) > MAX_IDEMPOTENCY_KEY or not value.isprintable():
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"idempotency_key must be at most {MAX_IDEMPOTENCY_KEY} printable characters")
    return value


def page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def page_offset(token: str) -> int | None:
    """The list offset a page token stands for, or None when it is not a token we issued."""
    if not token:
        return 0
    if len(token) > MAX_PAGE_TOKEN:
        return None
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii").partition(":")
        if kind != "o" or not value.isdigit() or len(value) > 10:
            return None
        offset = int(value)
    except (ValueError, UnicodeError, binascii.Error):
        return None
    return offset if offset <= MAX_OFFSET else None


MAX_REGION_POINTS = 64
MAX_PERSONS = 1000
MAX_COORDINATE = 100_000.0  # frame pixels; far beyond the largest accepted frame


def region_problem(points: list[tuple[float, float]]) -> str:
    """What is wrong with a region-of-interest polygon ("" when nothing is; empty means no region)."""
    if not points:
        return ""
    if not 3 <= len(points) <= MAX_REGION_POINTS:
        return f"a polygon needs 3 to {MAX_REGION_POINTS} points, not {len(points)}"
    for k, (x, y) in enumerate(points):
        if not (math.isfinite(x) and math.isfinite(y) and 0 <= x <= MAX_COORDINATE and 0 <= y <= MAX_COORDINATE):
            return f"point {k} ({x}, {y}) is not in frame pixels (0 to {MAX_COORDINATE:.0f}, x right, y down)"
    twice_area = sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(points, points[1:] + points[:1]))
    if abs(twice_area) < 2.0:
        return "the polygon encloses no area (its points are on one line or repeated)"
    return ""


MAX_GIVEN_BOXES = 100_000


def given_boxes_problem(given: list[tpb.FrameBoxes]) -> str:
    """What is wrong with the boxes a request gives ("" when nothing is), naming the entry."""
    count, seen = 0, set()
    for k, frame in enumerate(given):
        where = f"given_boxes[{k}] (frame_index {frame.frame_index})"
        if frame.frame_index < 0:
            return f"{where}: frame_index counts frames from 0"
        if frame.frame_index in seen:
            return f"{where}: frame {frame.frame_index} is listed twice; give each frame's boxes in one entry"
        seen.add(frame.frame_index)
        if len(frame.boxes) > MAX_PERSONS:
            return f"{where}: {len(frame.boxes)} boxes; at most {MAX_PERSONS} in a frame"
        count += len(frame.boxes)
        if count > MAX_GIVEN_BOXES:
            return f"given_boxes: more than {MAX_GIVEN_BOXES} boxes in all"
        for j, b in enumerate(frame.boxes):
            corners = (b.x1, b.y1, b.x2, b.y2)
            if not all(math.isfinite(v) and -MAX_COORDINATE <= v <= MAX_COORDINATE for v in corners):
                return f"{where}, box {j}: corners must be frame pixels within +-{MAX_COORDINATE:.0f}"
            if not (b.x2 > b.x1 and b.y2 > b.y1):
                return f"{where}, box {j}: x2 must be right of x1 and y2 below y1 (x1 y1 is the top-left corner)"
    return ""
