"""Pose stage: yolox_<task> -> rtmpose_<task>. Top-down: one crop per detected person, 17 COCO keypoints.

Two model families, chosen per task (TaskOptions.pose_model):
- RTMPose (production): affine crop to 192x256 (aspect kept, box padded by 1.25), RGB, mean/std inside
  the served graph; SimCC outputs decoded by arg-max over 2x sub-pixel bins (mmpose's get_simcc_maximum).
- BlazePose lite/full (offline default): square crop of side 1.25 x max(w, h) warped to 256x256, RGB;
  39 landmarks x (x, y, z, visibility, presence), of which 17 map to COCO.
All crops of a batch (every person of every frame of every task) go to Triton in one call per model.
"""

from __future__ import annotations

from collections import defaultdict

import cv2
import numpy as np

from posemesh.mesh import jpeg
from posemesh.mesh.models import BLAZEPOSE_SIZE, RTMPOSE_H, RTMPOSE_W, pose_model_names
from posemesh.stages.base import FrameItem, Stage, StageError
from posemesh.stages.triton import TritonModel

# BlazePose-33 indices of the COCO-17 keypoints, in COCO order (left before right).
BLAZEPOSE_TO_COCO = np.array([0, 2, 5, 7, 8, 11, 12, 13, 14, 15, 16, 23, 24, 25, 26, 27, 28])
SIMCC_SPLIT = 2.0
PADDING = 1.25
# A box the detect stage clipped at the frame's bottom edge holds only the part of a person the frame shows.
# BlazePose, trained on regions framing a whole body, fits the whole skeleton into such a crop: hips, knees
# and ankles land on the torso with high scores (towncentre frame 100, a person cut at the waist: knees
# scored 0.83 / 0.54 at the waist; nothing clamps them, the model puts them there). Its crop therefore
# assumes the person goes on below the edge, at least FULL_BODY_ASPECT x the box's width tall (the median
# height / width of whole-person boxes: 2.35 on towncentre, 2.5 on vtest); the part below the frame is
# black, and the model places the hidden joints there, outside the frame, with low scores. RTMPose is
# trained on COCO boxes of the visible part, so its crop stays the box's.
FULL_BODY_ASPECT = 2.4

MODEL_NAMES = pose_model_names()


def model_name(option: int, default: str) -> str:
    """The Triton model of a task's pose_model option (`default` when the task names none)."""
    return MODEL_NAMES.get(option) or default


def crop_matrix(box, out_w: int, out_h: int) -> np.ndarray:
    """2x3 affine from image pixels to a crop of out_w x out_h around the box (padded, aspect kept)."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    w, h = max(x2 - x1, 1.0) * PADDING, max(y2 - y1, 1.0) * PADDING
    aspect = out_w / out_h
    if w > h * aspect:
        h = w / aspect
    else:
        w = h * aspect
    s = out_w / w
    return np.array([[s, 0, -(cx - w / 2) * s], [0, s, -(cy - h / 2) * s]], np.float32)


def whole_body_box(box, frame_height: int):
    """BlazePose's region for a detected box: extended below the frame when the box ends at its bottom edge
    and is shorter than a whole person (FULL_BODY_ASPECT)."""
    x1, y1, x2, y2 = box
    if frame_height and y2 >= frame_height - 1:
        y2 = max(y2, y1 + FULL_BODY_ASPECT * (x2 - x1))
    return x1, y1, x2, y2


def to_image(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Crop pixels [K, 2] -> image pixels, through the inverse of a crop_matrix (scale + shift only)."""
    s = matrix[0, 0]
    return (points - matrix[:, 2]) / s


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, split: float = SIMCC_SPLIT) -> tuple[np.ndarray, np.ndarray]:
    """[M, K, Wx], [M, K, Wy] -> locations [M, K, 2] in crop pixels and scores [M, K].
    The score is the smaller of the two maxima; keypoints whose score is <= 0 get location -1."""
    x_locs = simcc_x.argmax(axis=-1)
    y_locs = simcc_y.argmax(axis=-1)
    locs = np.stack([x_locs, y_locs], axis=-1).astype(np.float32) / split
    scores = np.minimum(simcc_x.max(axis=-1), simcc_y.max(axis=-1))
    locs[scores <= 0] = -1
    return locs, scores


def decode_blazepose(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[M, 195] -> COCO-17 locations [M, 17, 2] in crop pixels and scores [M, 17] (sigmoid of visibility)."""
    lm = landmarks.reshape(-1, 39, 5)[:, BLAZEPOSE_TO_COCO]
    return lm[..., :2].copy(), 1.0 / (1.0 + np.exp(-lm[..., 3]))


class PoseEstimator:
    """Crops, Triton calls and decoding for one pose model; images are BGR."""

    def __init__(self, name: str, model):
        """model: a callable taking the input tensor by name, like TritonModel (or ONNX Runtime in bench/)."""
        self.name = name
        self.model = model
        self.rtmpose = name == "rtmpose"
        self.size = (RTMPOSE_W, RTMPOSE_H) if self.rtmpose else (BLAZEPOSE_SIZE, BLAZEPOSE_SIZE)

    def crop(self, image: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
        if not self.rtmpose:
            box = whole_body_box(box, image.shape[0])
        matrix = crop_matrix(box, *self.size)
        crop = cv2.warpAffine(image, matrix, self.size, flags=cv2.INTER_LINEAR, borderValue=(0, 0, 0))
        crop = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)
        return (crop.transpose(2, 0, 1) if self.rtmpose else crop), matrix

    def __call__(self, crops: np.ndarray, matrices: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Returns keypoints [M, 17, 2] in image pixels and scores [M, 17]."""
        if self.rtmpose:
            out = self.model(input=crops)
            locs, scores = decode_simcc(out["simcc_x"], out["simcc_y"])
        else:
            out = self.model(input_1=crops)
            locs, scores = decode_blazepose(out["Identity"])
        points = np.stack([to_image(locs[i], m) for i, m in enumerate(matrices)]) if matrices else locs
        return points, scores


class PoseStage(Stage):
    name = "pose"
    max_batch = 8  # frames; each brings ~1-12 crops, and the model's own max batch splits the rest

    def setup(self, settings) -> None:
        self.settings = settings
        self.estimators: dict[str, PoseEstimator] = {}

    def estimator(self, name: str) -> PoseEstimator:
        if name not in self.estimators:
            self.estimators[name] = PoseEstimator(name, TritonModel.for_settings(self.settings, name))
        return self.estimators[name]

    def problem(self) -> str:
        return next((e.model.problem for e in self.estimators.values() if e.model.problem), "")

    def close(self) -> None:
        for estimator in self.estimators.values():
            estimator.model.close()  # unregisters and frees its shared-memory regions

    def process(self, items: list[FrameItem]) -> None:
        # Crops grouped by model across all frames and tasks of the batch: one Triton call per model.
        crops, where = defaultdict(list), defaultdict(list)
        for item in items:
            if not item.frame.persons:
                continue
            try:
                image = jpeg.decode(item.frame.jpeg)
            except jpeg.BadJpeg as exc:
                raise StageError(f"frame {item.frame.index}: {exc}") from None
            estimator = self.estimator(model_name(item.task.options.pose_model, self.settings.default_pose_model))
            for person in item.frame.persons:
                b = person.box
                crop, matrix = estimator.crop(image, (b.x1, b.y1, b.x2, b.y2))
                crops[estimator.name].append(crop)
                where[estimator.name].append((person, matrix))
        for name, batch in crops.items():
            points, scores = self.estimators[name](np.stack(batch), [m for _p, m in where[name]])
            for (person, _m), pts, sc in zip(where[name], points.tolist(), scores.tolist()):
                del person.keypoints[:]
                for (x, y), s in zip(pts, sc):
                    person.keypoints.add(x=x, y=y, score=s)
