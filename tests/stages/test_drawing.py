"""What annotate draws (stages/drawing.py), on synthetic frames: labels readable and inside the frame, the
two sides of the body in their two colours, hidden and out-of-frame keypoints left out."""

from __future__ import annotations

import numpy as np
import pytest

from posemesh.stages import drawing
from posemesh.v1 import task_service_pb2 as tpb

# A standing person facing the camera (its left side on the image's right), COCO-17 order.
STANDING = [(320, 130), (330, 120), (310, 120), (340, 125), (300, 125), (370, 180), (270, 180), (390, 260),
            (250, 260), (400, 330), (240, 330), (350, 340), (290, 340), (355, 450), (285, 450), (360, 560),
            (280, 560)]


def person(track_id=7, box=(230, 100, 410, 580), points=STANDING, scores=None) -> tpb.Person:
    p = tpb.Person(box=tpb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]), score=0.9, track_id=track_id)
    for (x, y), s in zip(points, scores or [0.9] * len(points)):
        p.keypoints.add(x=x, y=y, score=s)
    return p


def near(image, x, y, bgr, r=1) -> bool:
    """Some pixel within r of (x, y) has the colour's hue: anti-aliased 2 px lines on black spread the
    colour over two pixels at part intensity, so channels are compared relative to the brightest."""
    patch = image[y - r:y + r + 1, x - r:x + r + 1].reshape(-1, 3).astype(float)
    lit = patch[patch.max(axis=1) >= 60]
    target = np.array(bgr, float) / max(bgr)
    return bool(len(lit)) and bool((np.abs(lit / lit.max(axis=1, keepdims=True) - target).max(axis=1) <= 0.12).any())


def blank(w=640, h=720):
    return np.zeros((h, w, 3), np.uint8)


@pytest.mark.parametrize("height", [360, 720, 2160])
def test_label_of_a_box_at_the_top_edge_is_inside_the_frame_on_its_background(height):
    width = height * 16 // 9
    image = blank(width, height)
    box = (width // 3, 0, width // 3 + height // 4, height // 2)  # touches the top edge
    drawing.draw(image, [person(track_id=12, box=box, points=[])])
    fill = np.array(drawing.colour(12))
    is_fill = (image.astype(int) == fill).all(axis=2)
    ys, xs = np.nonzero(is_fill)
    # The background: a filled block of the id colour, its top at the frame's top edge, wider and taller
    # than the scale's text, not a 2 px box outline.
    block = is_fill[:, box[0] + 3:box[0] + 10]
    rows = np.nonzero(block.all(axis=1))[0]
    assert len(rows) and rows.min() == 0
    text_px = drawing.Scale(height).text_px
    assert rows.max() >= text_px  # the whole label height is filled (the text is inside it)
    # The text itself: pixels other than the background inside the label (dark text on this bright colour).
    left, top, right, bottom = drawing.label_box("#12", box[0], box[1], width, height, drawing.Scale(height))
    assert (top, left) == (0, box[0]) and bottom <= height and right <= width
    text = ~is_fill[top:bottom, left:right]
    assert text.sum() > 0.05 * text.size
    assert (image[top:bottom, left:right].astype(int).sum(axis=2) < 100).sum() > 0  # some dark text
    assert xs.min() >= 0 and ys.min() >= 0


def test_labels_scale_with_the_frame_height():
    sizes = {h: drawing.label_box("#12", 100, 300, h * 16 // 9, h, drawing.Scale(h)) for h in (720, 2160)}
    h720 = sizes[720][3] - sizes[720][1]
    h4k = sizes[2160][3] - sizes[2160][1]
    assert 20 <= h720 <= 40 and 2.5 <= h4k / h720 <= 3.5


@pytest.mark.parametrize("box", [(630, 300, 700, 500), (-20, 300, 40, 500), (100, 715, 200, 800)])
def test_labels_are_clamped_into_the_frame(box):
    left, top, right, bottom = drawing.label_box("#123", box[0], box[1], 640, 720, drawing.Scale(720))
    assert 0 <= left < right <= 640 and 0 <= top < bottom <= 720


def test_label_sits_above_a_box_with_room_for_it():
    scale = drawing.Scale(720)
    left, top, right, bottom = drawing.label_box("#3", 100, 300, 640, 720, scale)
    assert bottom == 300 and left == 100


def test_left_and_right_limbs_have_two_colours_and_the_centre_a_third():
    image = drawing.draw(blank(), [person()])
    # Midpoints of limbs: left upper arm (5-7), right upper arm (6-8), left shin (13-15), right shin (14-16),
    # shoulders (5-6).
    left_arm, right_arm = (380, 220), (260, 220)
    left_shin, right_shin = (357, 505), (282, 505)
    shoulders = (320, 180)
    for x, y in (left_arm, left_shin):
        assert near(image, x, y, drawing.LEFT_COLOUR) and not near(image, x, y, drawing.RIGHT_COLOUR)
    for x, y in (right_arm, right_shin):
        assert near(image, x, y, drawing.RIGHT_COLOUR) and not near(image, x, y, drawing.LEFT_COLOUR)
    assert near(image, *shoulders, drawing.CENTRE_COLOUR)
    assert drawing.LEFT_COLOUR != drawing.RIGHT_COLOUR


def test_low_score_and_out_of_frame_keypoints_are_not_drawn():
    points = list(STANDING)
    scores = [0.9] * 17
    scores[13] = 0.1  # left knee hidden: it, and the thigh and shin through it, are not drawn
    points[16] = (280, 800)  # right ankle below the frame's bottom edge (the frame is 720 high)
    image = drawing.draw(blank(), [person(points=points, scores=scores)])
    reference = drawing.draw(blank(), [person()])
    assert near(reference, 355, 450, drawing.LEFT_COLOUR, r=2)  # the knee dot, when scored
    assert not near(image, 355, 450, drawing.LEFT_COLOUR, r=4)
    assert not near(image, 352, 395, drawing.LEFT_COLOUR, r=2)  # thigh 11-13
    assert not near(image, 357, 505, drawing.LEFT_COLOUR, r=2)  # shin 13-15
    assert near(image, 360, 560, drawing.LEFT_COLOUR, r=2)  # the ankle itself is scored: still drawn
    # The right shin would run from the knee (285, 450) to the bottom edge: nothing of it is drawn.
    assert not near(image, 283, 600, drawing.RIGHT_COLOUR, r=3)
    assert not near(image, 282, 715, drawing.RIGHT_COLOUR, r=3)
    assert near(image, 285, 450, drawing.RIGHT_COLOUR, r=2)  # the right knee is


def test_drawing_is_a_pure_function_of_the_frame_and_records():
    rng = np.random.default_rng(3)
    frame = rng.integers(0, 255, (720, 1280, 3), np.uint8)
    persons = [person(track_id=t, box=(100 * t, 0, 100 * t + 90, 400)) for t in (1, 2, 3)]
    assert np.array_equal(drawing.draw(frame.copy(), persons), drawing.draw(frame.copy(), persons))
