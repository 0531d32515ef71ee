"""What annotate draws on a frame: each person's box and id label in a colour per track id, and the COCO-17
skeleton with the person's left side in orange and right side in blue. One place for the skeleton,
colours and labels.

Drawing is a pure function of the frame and its records (the resilience test compares annotated videos
frame by frame), and everything scales with the frame height, so 720p and 4K read alike:
- the id label sits on a filled box of the id colour above the box's top-left corner, inside the box when
  that would cross the frame's top edge, and always wholly inside the frame;
- keypoints below KEYPOINT_MIN_SCORE or outside the frame are not drawn, nor limbs that end at one;
- labels are drawn after every skeleton, so no other person's limbs cover them.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

# Limbs between COCO-17 keypoints (indices in COCO order: nose, eyes, ears, shoulders, elbows, wrists, hips,
# knees, ankles; left before right).
COCO_SKELETON = [(15, 13), (13, 11), (16, 14), (14, 12), (11, 12), (5, 11), (6, 12), (5, 6), (5, 7), (6, 8),
                 (7, 9), (8, 10), (1, 2), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 6)]
# Keypoints (and limbs between them) at or below this score are not drawn.
KEYPOINT_MIN_SCORE = 0.3

# BGR. COCO-17 after the nose: odd indices are the person's left side, even ones the right.
LEFT_COLOUR = (0, 140, 255)  # orange
RIGHT_COLOUR = (255, 140, 0)  # blue
CENTRE_COLOUR = (230, 230, 230)  # light grey: the nose and the lines across the body (shoulders, hips, eyes)
OUTLINE = (40, 40, 40)

FONT = cv2.FONT_HERSHEY_SIMPLEX


def colour(track_id: int) -> tuple[int, int, int]:
    if track_id <= 0:
        return (160, 160, 160)
    hue = (track_id * 47) % 180  # well-spread hues for consecutive ids
    return tuple(int(c) for c in cv2.cvtColor(np.uint8([[[hue, 220, 255]]]), cv2.COLOR_HSV2BGR)[0, 0])


def side_colour(*keypoints: int) -> tuple[int, int, int]:
    """The colour of a keypoint or of the limb between two: left, right, or centre when it has no side or
    joins both sides."""
    sides = {k % 2 for k in keypoints if k > 0}  # 1: left, 0: right
    if sides == {1}:
        return LEFT_COLOUR
    if sides == {0}:
        return RIGHT_COLOUR
    return CENTRE_COLOUR


class Scale:
    """Line widths, dot sizes and label text size for a frame height (1080p: 2 px lines, 22 px text)."""

    def __init__(self, height: int):
        s = height / 1080
        self.line = max(1, round(2 * s))
        self.dot = max(2, round(4 * s))
        self.text_px = max(11, round(22 * s))
        self.text_thickness = max(1, round(2 * s))
        self.font_scale = cv2.getFontScaleFromHeight(FONT, self.text_px, self.text_thickness)
        self.pad = max(2, self.text_px // 4)


def label_box(text: str, x1: float, y1: float, width: int, height: int, scale: Scale) -> tuple[int, int, int, int]:
    """Where a person's label goes: (left, top, right, bottom) of its background, the text inside with the
    scale's padding. Above the box's top-left corner; inside the box when that crosses the frame's top edge;
    clamped into the frame (a frame narrower or lower than the label: from its left or top edge)."""
    (tw, th), _baseline = cv2.getTextSize(text, FONT, scale.font_scale, scale.text_thickness)
    bw, bh = tw + 2 * scale.pad, th + 2 * scale.pad
    left = int(round(x1))
    top = int(round(y1)) - bh
    if top < 0:
        top = int(round(y1))  # below the box's top edge, inside it
    left = max(0, min(left, width - bw))
    top = max(0, min(top, height - bh))
    return left, top, left + bw, top + bh


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    b, g, r = background
    return (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 140 else (255, 255, 255)


def visible(keypoint, width: int, height: int) -> bool:
    """Drawn: scored above KEYPOINT_MIN_SCORE and inside the frame."""
    x, y = keypoint.x, keypoint.y
    return (keypoint.score > KEYPOINT_MIN_SCORE and math.isfinite(x) and math.isfinite(y)
            and 0 <= x < width and 0 <= y < height)


def draw_skeleton(image: np.ndarray, keypoints, scale: Scale) -> None:
    height, width = image.shape[:2]
    shown = [visible(k, width, height) for k in keypoints]
    points = [(int(round(k.x)), int(round(k.y))) if s else None for k, s in zip(keypoints, shown)]
    for a, b in COCO_SKELETON:
        if shown[a] and shown[b]:
            cv2.line(image, points[a], points[b], side_colour(a, b), scale.line, cv2.LINE_AA)
    for k, point in enumerate(points):
        if point is not None:
            cv2.circle(image, point, scale.dot, side_colour(k), -1, cv2.LINE_AA)
            cv2.circle(image, point, scale.dot, OUTLINE, 1, cv2.LINE_AA)


def draw_label(image: np.ndarray, text: str, x1: float, y1: float, background: tuple[int, int, int],
               scale: Scale) -> None:
    height, width = image.shape[:2]
    left, top, right, bottom = label_box(text, x1, y1, width, height, scale)
    cv2.rectangle(image, (left, top), (right - 1, bottom - 1), background, -1)
    cv2.putText(image, text, (left + scale.pad, bottom - scale.pad), FONT, scale.font_scale, _text_colour(background),
                scale.text_thickness, cv2.LINE_AA)


def draw(image: np.ndarray, persons) -> np.ndarray:
    scale = Scale(image.shape[0])
    for p in persons:
        x1, y1, x2, y2 = (int(round(v)) for v in (p.box.x1, p.box.y1, p.box.x2, p.box.y2))
        cv2.rectangle(image, (x1, y1), (x2, y2), colour(p.track_id), scale.line)
        if len(p.keypoints) == 17:
            draw_skeleton(image, p.keypoints, scale)
    for p in persons:
        label = f"#{p.track_id}" if p.track_id else f"{p.score:.2f}"
        draw_label(image, label, p.box.x1, p.box.y1, colour(p.track_id), scale)
    return image
