"""Pose stage: yolox_<task> -> rtmpose_<task>. Top-down: one crop per detected person, 17 COCO keypoints.

Two model families, chosen per task (TaskOptions.pose_model):
- RTMPose (production): crop resized to 192x256 (aspect kept, box padded by 1.25), RGB, mean/std inside
  the served graph; SimCC outputs decoded by arg-max over 2x sub-pixel bins (mmpose's get_simcc_maximum).
- BlazePose lite/full (offline default): square crop of side 1.25 x max(w, h) resized to 256x256, RGB;
  39 landmarks x (x, y, z, visibility, presence), of which 17 map to COCO. With POSE_REFINE, a second pass
  on the region BlazePose's own pipeline uses: centred on the first pass's hip-centre landmark (33), its
  side 2.5 x the distance to the scale landmark (34), rotated so that the body stands upright in the crop
  (MediaPipe's pose_landmarks_to_roi), warped. It costs a second model call per person.
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


def crop_region(box, out_w: int, out_h: int) -> tuple[int, int, int, int]:
    """The image region (x, y, width, height, whole pixels) a crop of out_w x out_h takes around the box:
    padded, widened or heightened to the crop's aspect, centred on the box."""
    x1, y1, x2, y2 = box
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    w, h = max(x2 - x1, 1.0) * PADDING, max(y2 - y1, 1.0) * PADDING
    aspect = out_w / out_h
    if w > h * aspect:
        h = w / aspect
    else:
        w = h * aspect
    width, height = max(1, round(w)), max(1, round(h))
    return round(cx - width / 2), round(cy - height / 2), width, height


def crop_matrix(region: tuple[int, int, int, int], out_w: int, out_h: int) -> np.ndarray:
    """2x3 affine from image pixels to the crop that resizing `region` to out_w x out_h gives (OpenCV's
    resize maps pixel centres: x_crop + 0.5 = (x_image - x + 0.5) * out_w / width)."""
    x, y, width, height = region
    sx, sy = out_w / width, out_h / height
    return np.array([[sx, 0, (0.5 - x) * sx - 0.5], [0, sy, (0.5 - y) * sy - 0.5]], np.float32)


def cut(image: np.ndarray, region: tuple[int, int, int, int]) -> np.ndarray:
    """The region's pixels, black where it lies outside the image (a view when it lies inside)."""
    x, y, width, height = region
    ih, iw = image.shape[:2]
    if x >= 0 and y >= 0 and x + width <= iw and y + height <= ih:
        return image[y:y + height, x:x + width]
    out = np.zeros((height, width, *image.shape[2:]), image.dtype)
    xa, ya, xb, yb = max(x, 0), max(y, 0), min(x + width, iw), min(y + height, ih)
    if xa < xb and ya < yb:
        out[ya - y:yb - y, xa - x:xb - x] = image[ya:yb, xa:xb]
    return out


def whole_body_box(box, frame_height: int):
    """BlazePose's region for a detected box: extended below the frame when the box ends at its bottom edge
    and is shorter than a whole person (FULL_BODY_ASPECT)."""
    x1, y1, x2, y2 = box
    if frame_height and y2 >= frame_height - 1:
        y2 = max(y2, y1 + FULL_BODY_ASPECT * (x2 - x1))
    return x1, y1, x2, y2


def to_image(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Crop pixels [K, 2] -> image pixels, through the inverse of a crop's 2x3 affine."""
    if matrix[0, 1] == 0 and matrix[1, 0] == 0:  # a crop_matrix: a scale and a shift per axis
        return (points - matrix[:, 2]) / np.diag(matrix[:, :2])
    inverse = cv2.invertAffineTransform(matrix)
    return points @ inverse[:, :2].T + inverse[:, 2]


def region_matrix(center, scale_point, size: int) -> np.ndarray:
    """2x3 affine from image pixels to a size x size crop of the region BlazePose's pipeline derives from
    its auxiliary landmarks: centred on `center`, side 2 x 1.25 x |scale_point - center|, rotated so that
    the vector centre -> scale point points up (MediaPipe's AlignmentPointsRectsCalculator, target 90
    degrees, then RectTransformationCalculator's 1.25)."""
    (cx, cy), (px, py) = center, scale_point
    side = max(2.0 * PADDING * float(np.hypot(px - cx, py - cy)), 1.0)
    rotation = np.pi / 2 - np.arctan2(-(py - cy), px - cx)  # clockwise, radians, of the region
    matrix = cv2.getRotationMatrix2D((float(cx), float(cy)), float(np.degrees(rotation)), size / side)
    matrix[:, 2] += (size / 2 - cx, size / 2 - cy)
    return matrix.astype(np.float32)


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


def blazepose_alignment(landmarks: np.ndarray) -> np.ndarray:
    """[M, 195] -> the auxiliary landmarks 33 (hip centre) and 34 (scale and rotation) [M, 2, 2] in crop pixels."""
    return landmarks.reshape(-1, 39, 5)[:, 33:35, :2].copy()


class PoseEstimator:
    """Crops, Triton calls and decoding for one pose model; images are BGR."""

    def __init__(self, name: str, model, refine: bool = False):
        """model: a callable taking the input tensor by name, like TritonModel (or ONNX Runtime in bench/).
        refine: BlazePose's second pass on the region its first pass finds (the module's docstring)."""
        self.name = name
        self.model = model
        self.rtmpose = name == "rtmpose"
        self.refine = refine and not self.rtmpose
        self.size = (RTMPOSE_W, RTMPOSE_H) if self.rtmpose else (BLAZEPOSE_SIZE, BLAZEPOSE_SIZE)

    def crop(self, image: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
        """The model's input for the person in `box` and its crop_matrix. The region is resized, not warped:
        a scale and a shift need no more, and it takes 2.6x less CPU (bench/crops.py: 3.6 against 9.3 ms a
        towncentre frame of 11 persons), moving a keypoint by a median 0.08% of the box's height."""
        if not self.rtmpose:
            box = whole_body_box(box, image.shape[0])
        region = crop_region(box, *self.size)
        crop = cv2.resize(cut(image, region), self.size, interpolation=cv2.INTER_LINEAR)
        return self._model_input(crop), crop_matrix(region, *self.size)

    def _warp(self, image: np.ndarray, matrix: np.ndarray) -> np.ndarray:
        """The model's input from a BGR image through a region's 2x3 affine (rotated: POSE_REFINE's pass)."""
        return self._model_input(cv2.warpAffine(image, matrix, self.size, flags=cv2.INTER_LINEAR,
                                                borderValue=(0, 0, 0)))

    def _model_input(self, crop: np.ndarray) -> np.ndarray:
        """A BGR crop as the model takes it: RGB, channels first for RTMPose."""
        crop = cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)
        return crop.transpose(2, 0, 1) if self.rtmpose else crop

    def __call__(self, crops: np.ndarray, matrices: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Returns keypoints [M, 17, 2] in image pixels and scores [M, 17]."""
        points, scores, _aligned = self._run(crops, matrices)
        return points, scores

    def _run(self, crops: np.ndarray, matrices: list[np.ndarray]):
        """(keypoints [M, 17, 2] and scores [M, 17]; with `refine`, BlazePose's alignment landmarks [M, 2, 2],
        both in image pixels; else None)."""
        aligned = None
        if self.rtmpose:
            out = self.model(input=crops)
            locs, scores = decode_simcc(out["simcc_x"], out["simcc_y"])
        else:
            out = self.model(input_1=crops)
            locs, scores = decode_blazepose(out["Identity"])
            aligned = blazepose_alignment(out["Identity"]) if self.refine else None
        points = np.stack([to_image(locs[i], m) for i, m in enumerate(matrices)]) if matrices else locs
        if aligned is not None and matrices:
            aligned = np.stack([to_image(aligned[i], m) for i, m in enumerate(matrices)])
        return points, scores, aligned

    def estimate(self, images: list[np.ndarray], boxes: list) -> tuple[np.ndarray, np.ndarray]:
        """Keypoints [M, 17, 2] (image pixels) and scores [M, 17] of the person in boxes[i] of images[i]: one
        model call for all, and with `refine` a second on the regions the first pass found."""
        crops, matrices = zip(*(self.crop(image, box) for image, box in zip(images, boxes)))
        points, scores, aligned = self._run(np.stack(crops), list(matrices))
        if not self.refine:
            return points, scores
        matrices = [region_matrix(center, scale_point, self.size[0]) for center, scale_point in aligned]
        crops = np.stack([self._warp(image, m) for image, m in zip(images, matrices)])
        points, scores, _aligned = self._run(crops, matrices)
        return points, scores


class PoseStage(Stage):
    name = "pose"
    max_batch = 8  # frames; each brings ~1-12 crops, and the model's own max batch splits the rest

    def setup(self, settings) -> None:
        self.settings = settings
        self.estimators: dict[str, PoseEstimator] = {}
        self.pictures = jpeg.Pictures()  # a batch's decoded frames, in buffers reused by the next batch

    def estimator(self, name: str) -> PoseEstimator:
        if name not in self.estimators:
            self.estimators[name] = PoseEstimator(name, TritonModel.for_settings(self.settings, name),
                                                  refine=self.settings.pose_refine)
        return self.estimators[name]

    def problem(self) -> str:
        return next((e.model.problem for e in self.estimators.values() if e.model.problem), "")

    def close(self) -> None:
        for estimator in self.estimators.values():
            estimator.model.close()  # unregisters and frees its shared-memory regions

    def process(self, items: list[FrameItem]) -> None:
        # Persons grouped by model across all frames and tasks of the batch: one Triton call per model (two
        # with POSE_REFINE).
        images, boxes, where = defaultdict(list), defaultdict(list), defaultdict(list)
        self.pictures.recycle()  # the last batch's pictures are done with
        for item in items:
            if not item.frame.persons:
                continue
            try:
                image = self.pictures.decode(item.frame.jpeg)
            except jpeg.BadJpeg as exc:
                raise StageError(f"frame {item.frame.index}: {exc}") from None
            self.share(item, image)  # annotate on this host draws on it without decoding the JPEG again
            estimator = self.estimator(model_name(item.task.options.pose_model, self.settings.default_pose_model))
            for person in item.frame.persons:
                b = person.box
                images[estimator.name].append(image)
                boxes[estimator.name].append((b.x1, b.y1, b.x2, b.y2))
                where[estimator.name].append(person)
        for name in boxes:
            points, scores = self.estimators[name].estimate(images[name], boxes[name])
            for person, pts, sc in zip(where[name], points.tolist(), scores.tolist()):
                del person.keypoints[:]
                for (x, y), s in zip(pts, sc):
                    person.keypoints.add(x=x, y=y, score=s)
