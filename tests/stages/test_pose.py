"""The pose stage's crop for people the frame cuts off, against the real Triton server on a real frame, and
that frame drawn as annotate draws it (saved as a PNG to look at)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from posemesh.mesh import media as media_io
from posemesh.stages import drawing
from posemesh.stages.detect import DEFAULT_MIN_SCORE, Detector
from posemesh.stages.pose import FULL_BODY_ASPECT, PoseEstimator, region_matrix, to_image, whole_body_box
from posemesh.stages.triton import TritonModel
from posemesh.v1 import task_service_pb2 as tpb
from tests.conftest import media

# Frame 100 of towncentre: a woman at the bottom right is cut off at the waist by the frame's bottom edge
# (box about 130 x 190 px, ending at y = 1080); before the crop assumed a whole body there, BlazePose-lite
# put her knees at the waist with scores 0.83 and 0.54.
CLIP, FRAME = "towncentre_1080p_302f.mp4", 100


def test_whole_body_box_extends_only_short_boxes_at_the_bottom_edge():
    assert whole_body_box((100, 900, 230, 1080), 1080) == (100, 900, 230, 900 + FULL_BODY_ASPECT * 130)
    assert whole_body_box((100, 500, 230, 1000), 1080) == (100, 500, 230, 1000)  # not at the edge
    assert whole_body_box((100, 600, 230, 1080), 1080) == (100, 600, 230, 1080)  # tall enough already


def test_the_refined_region_is_centred_on_the_hips_upright_and_maps_back_exactly():
    """MediaPipe's region from its alignment landmarks: centre on the hips, side 2.5 x the distance to the
    scale point, turned so that the scale point is straight above the centre in the crop."""
    def apply(matrix, point):
        return matrix[:, :2] @ np.asarray(point, float) + matrix[:, 2]

    upright = region_matrix((100, 200), (100, 150), 256)  # scale point above the hips: no rotation
    assert np.allclose(upright[:, :2], np.eye(2) * 256 / 125)
    assert np.allclose(apply(upright, (100, 200)), (128, 128))
    lying = region_matrix((300, 400), (360, 400), 256)  # head to the right: the body is turned upright
    assert np.allclose(apply(lying, (300, 400)), (128, 128), atol=1e-3)
    above = apply(lying, (360, 400))
    assert np.allclose(above, (128, 128 - 60 * 256 / 150), atol=1e-3)  # straight above the centre
    points = np.array([[10.0, 20.0], [200.0, 31.5]])
    for matrix in (upright, lying):
        crop_points = points @ matrix[:, :2].T + matrix[:, 2]
        assert np.allclose(to_image(crop_points, matrix), points, atol=1e-3)


@pytest.mark.parametrize("model", ["blazepose_lite", "blazepose_full"])
def test_the_refined_pass_keeps_upright_people_where_they_are(triton, frame, model):
    """On towncentre's standing pedestrians the second pass moves no well-seen keypoint far: the same
    people, the same joints (the COCO gain is measured by bench/accuracy.py, on people who are not upright)."""
    height, width = frame.shape[:2]
    yolox, pose_model = TritonModel(triton.url, "yolox"), TritonModel(triton.url, model)
    try:
        [(boxes, _scores)] = Detector(yolox)([frame], [DEFAULT_MIN_SCORE])
        boxes = np.clip(boxes, 0, [width, height, width, height])
        whole = [b for b in boxes if b[3] < height - 1]  # people the frame shows whole
        first, first_scores = PoseEstimator(model, pose_model).estimate([frame] * len(whole), whole)
        second, second_scores = PoseEstimator(model, pose_model, refine=True).estimate([frame] * len(whole), whole)
    finally:
        yolox.close()
        pose_model.close()
    heights = np.array([b[3] - b[1] for b in whole])
    seen = (first_scores > 0.8) & (second_scores > 0.8)
    moved = np.linalg.norm(second - first, axis=-1) / heights[:, None]
    assert seen.sum() > 50 and np.median(moved[seen]) < 0.03, (seen.sum(), np.median(moved[seen]))


@pytest.fixture(scope="module")
def frame():
    path = media(CLIP)
    info = media_io.probe(path).video
    for index, decoded in enumerate(media_io.FrameReader(path, info.fps)):
        if index == FRAME:
            return decoded.image
    raise AssertionError(f"{CLIP} has no frame {FRAME}")


@pytest.mark.parametrize("model", ["blazepose_lite", "blazepose_full"])
def test_a_person_cut_off_by_the_bottom_edge_gets_no_legs_drawn_on_the_torso(triton, frame, model, tmp_path):
    height, width = frame.shape[:2]
    yolox, pose_model = TritonModel(triton.url, "yolox"), TritonModel(triton.url, model)
    try:
        [(boxes, scores)] = Detector(yolox)([frame], [DEFAULT_MIN_SCORE])
        boxes = np.clip(boxes, 0, [width, height, width, height])  # as the detect stage reports them
        estimator = PoseEstimator(model, pose_model)
        crops, matrices = zip(*(estimator.crop(frame, b) for b in boxes))
        points, kp_scores = estimator(np.stack(crops), list(matrices))
    finally:
        yolox.close()  # unregisters and frees its shared-memory regions
        pose_model.close()
    cut = [i for i, (x1, y1, x2, y2) in enumerate(boxes) if y2 >= height - 1 and (y2 - y1) < 1.6 * (x2 - x1)]
    assert cut, "the frame's cut-off person was not detected"
    for i in cut:
        # Knees and ankles: hidden below the edge. Either placed outside the frame or scored too low to draw.
        for k in range(13, 17):
            (x, y), s = points[i, k], kp_scores[i, k]
            assert y >= height or s <= drawing.KEYPOINT_MIN_SCORE, f"{model} keypoint {k} at y={y:.0f} score {s:.2f}"
        assert kp_scores[i, [0, 5, 6]].min() > 0.5  # the head and shoulders the frame shows are still found
    # People the frame shows whole keep their legs.
    whole = [i for i, b in enumerate(boxes) if b[3] < height - 1]
    assert np.mean([(kp_scores[i, 13:] > drawing.KEYPOINT_MIN_SCORE).mean() for i in whole]) > 0.7

    persons = []
    for i, (box, score) in enumerate(zip(boxes, scores)):
        p = tpb.Person(box=tpb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]), score=score, track_id=i + 1)
        for (x, y), s in zip(points[i].tolist(), kp_scores[i].tolist()):
            p.keypoints.add(x=x, y=y, score=s)
        persons.append(p)
    annotated = drawing.draw(frame.copy(), persons)
    png = tmp_path / f"towncentre_{FRAME}_{model}.png"
    cv2.imwrite(str(png), annotated)
    print(f"annotated frame: {png}")
    assert not np.array_equal(annotated, frame)
