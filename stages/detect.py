"""Detect stage: raw_frames_<task> -> yolox_<task>. Finds persons with YOLOX-nano on Triton.

Pre- and post-processing follow Megvii's YOLOX demo: BGR 0..255 pixels letterboxed into the top-left of
a 416x416 canvas padded with 114; the head's output, of which the served graph keeps the person columns
([N, 3549, 6]: mesh/models.py), is decoded on the grid of strides 8/16/32, scored obj x cls(person) and
reduced with NMS at IoU 0.45.
"""

from __future__ import annotations

import cv2
import numpy as np

from posemesh.mesh import jpeg as jpeg_codec
from posemesh.mesh.models import YOLOX_SIZE
from posemesh.stages.base import FrameItem, Stage, StageError
from posemesh.stages.triton import TritonModel
from posemesh.v1 import task_service_pb2 as tpb

DEFAULT_MIN_SCORE = 0.5  # POSEMESH_DETECT_MIN_SCORE's default (mesh/settings.py); a task's min_person_score overrides
NMS_IOU = 0.45
STRIDES = (8, 16, 32)
# POSEMESH_DETECT_TILES: each frame is also cut into 2x2 tiles sharing this part of their side with their
# neighbours (a person on a tile edge is whole in one tile, or in the whole frame), merged by this NMS IoU.
TILE_OVERLAP = 0.2
TILE_NMS_IOU = 0.5
TILE_CUT_MARGIN = 4  # a box this close to a tile's inner edge (in the detector's 416 px input) is cut by it
TILED_FRAMES_PER_CALL = 4  # frames whose crops go to Triton at once: five crops a frame, and outputs of 1.2 MB


def _grid(size: int = YOLOX_SIZE) -> tuple[np.ndarray, np.ndarray]:
    grids, strides = [], []
    for s in STRIDES:
        n = size // s
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        strides.append(np.full((n * n, 1), s))
    return np.concatenate(grids).astype(np.float32), np.concatenate(strides).astype(np.float32)


GRID, GRID_STRIDES = _grid()


def letterbox(image: np.ndarray, size: int = YOLOX_SIZE) -> tuple[np.ndarray, float]:
    """BGR HWC uint8 -> CHW uint8 canvas with the image resized into its top-left corner, and the ratio."""
    h, w = image.shape[:2]
    r = min(size / h, size / w)
    # int() truncation, as in Megvii's demo: the box scale below divides by r, not by the rounded size.
    resized = cv2.resize(image, (int(w * r), int(h * r)), interpolation=cv2.INTER_LINEAR)
    canvas = np.full((size, size, 3), 114, np.uint8)
    canvas[:resized.shape[0], :resized.shape[1]] = resized
    return canvas.transpose(2, 0, 1), r


def decode(output: np.ndarray, ratio: float, min_score: float,
           nms_iou: float = NMS_IOU) -> tuple[np.ndarray, np.ndarray]:
    """One image's head output [3549, 6] (box, objectness, person) -> person boxes [M, 4] (x1 y1 x2 y2,
    input-image pixels), scores [M]."""
    scores = output[:, 4] * output[:, 5]  # objectness x person class
    keep = scores > min_score
    if not keep.any():
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.float32)
    raw, scores = output[keep], scores[keep]
    centre = (raw[:, :2] + GRID[keep]) * GRID_STRIDES[keep]
    size = np.exp(raw[:, 2:4]) * GRID_STRIDES[keep]
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1) / ratio
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    idx = cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), min_score, nms_iou)
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)
    order = idx[np.argsort(-scores[idx])]
    return boxes[order].astype(np.float32), scores[order].astype(np.float32)


def chosen(boxes: np.ndarray, scores: np.ndarray, options: tpb.TaskOptions) -> tuple[np.ndarray, np.ndarray]:
    """The task's choices (TaskOptions): persons whose box centre is inside its region of interest, then
    its `max_persons` highest-scoring ones. Boxes come sorted by score, highest first."""
    if len(options.region_of_interest) >= 3 and len(boxes):
        polygon = np.array([[p.x, p.y] for p in options.region_of_interest], np.float32)
        centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
        keep = np.array([cv2.pointPolygonTest(polygon, (float(x), float(y)), False) >= 0 for x, y in centres])
        boxes, scores = boxes[keep], scores[keep]
    if options.max_persons:
        boxes, scores = boxes[:options.max_persons], scores[:options.max_persons]
    return boxes, scores


def tiles(width: int, height: int) -> list[tuple[int, int, int, int]]:
    """Where the detector looks with POSEMESH_DETECT_TILES: the whole picture, then 2x2 tiles overlapping by
    TILE_OVERLAP, as (x0, y0, x1, y1). A picture no larger than the detector's input is only looked at whole:
    its tiles would only be enlarged."""
    if max(width, height) <= YOLOX_SIZE:
        return [(0, 0, width, height)]
    tw, th = int(width * (1 + TILE_OVERLAP) / 2), int(height * (1 + TILE_OVERLAP) / 2)
    return [(0, 0, width, height)] + [(x, y, x + tw, y + th) for y in (0, height - th) for x in (0, width - tw)]


def merge_tiles(found: list[tuple[np.ndarray, np.ndarray]], windows: list[tuple[int, int, int, int]],
                width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The persons of a picture from those found in each of its `windows` (`tiles`; boxes in each window's
    pixels): a tile's box touching an inner edge of its tile (a person cut by it) is dropped, the rest are
    merged by NMS, highest score first."""
    boxes, scores = [], []
    for (b, s), (x0, y0, x1, y1) in zip(found, windows):
        b = b + np.array([x0, y0, x0, y0], np.float32)
        if (x0, y0, x1, y1) != (0, 0, width, height):
            m = TILE_CUT_MARGIN * max(x1 - x0, y1 - y0) / YOLOX_SIZE  # the margin in this tile's pixels
            cut = (((b[:, 0] <= x0 + m) & (x0 > 0)) | ((b[:, 2] >= x1 - m) & (x1 < width))
                   | ((b[:, 1] <= y0 + m) & (y0 > 0)) | ((b[:, 3] >= y1 - m) & (y1 < height)))
            b, s = b[~cut], s[~cut]
        boxes.append(b)
        scores.append(s)
    boxes, scores = np.concatenate(boxes).reshape(-1, 4), np.concatenate(scores)
    if not len(boxes):
        return boxes.astype(np.float32), scores.astype(np.float32)
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    keep = np.asarray(cv2.dnn.NMSBoxes(xywh.tolist(), scores.tolist(), 0.0, TILE_NMS_IOU), np.int64).reshape(-1)
    keep = keep[np.argsort(-scores[keep], kind="stable")]  # highest first, whatever OpenCV's order
    return boxes[keep].astype(np.float32), scores[keep].astype(np.float32)


def decode_for_detection(jpeg: bytes, width: int, height: int, tiled: bool = False) -> tuple[np.ndarray, float]:
    """Decode a JPEG at the smallest DCT scale that still covers the 416 input: a 1080p frame decodes at
    1/4 size several times faster, and the detector never sees more than 416 pixels anyway (with `tiled`, a
    tile's side, (1 + TILE_OVERLAP) / 2 of the picture's, must still cover 416).
    Returns the image and the factor from decoded pixels back to frame pixels."""
    side = int(YOLOX_SIZE * 2 / (1 + TILE_OVERLAP)) if tiled else YOLOX_SIZE
    try:
        return jpeg_codec.decode_for(jpeg, width, height, side)
    except jpeg_codec.BadJpeg as exc:
        raise StageError(str(exc)) from None


class Detector:
    """YOLOX on Triton for a batch of BGR images (the part the tests compare with rtmlib)."""

    def __init__(self, model: TritonModel):
        self.model = model

    def __call__(self, images: list[np.ndarray], min_scores: list[float]) -> list[tuple[np.ndarray, np.ndarray]]:
        boxed = [letterbox(img) for img in images]
        output = self.model(images=np.stack([b for b, _r in boxed]))["output"]
        return [decode(output[i], r, s) for i, ((_b, r), s) in enumerate(zip(boxed, min_scores))]

    def tiled(self, images: list[np.ndarray], min_scores: list[float]) -> list[tuple[np.ndarray, np.ndarray]]:
        """The same, each picture looked at whole and in 2x2 tiles (`tiles`), then merged; TILED_FRAMES_PER_CALL
        pictures' crops to Triton at once, so that a batch's tensors stay near an untiled batch's."""
        out = []
        for first in range(0, len(images), TILED_FRAMES_PER_CALL):
            some = images[first:first + TILED_FRAMES_PER_CALL]
            windows = [tiles(img.shape[1], img.shape[0]) for img in some]
            crops = [img[y0:y1, x0:x1] for img, ws in zip(some, windows) for x0, y0, x1, y1 in ws]
            scores = min_scores[first:first + TILED_FRAMES_PER_CALL]
            found = self(crops, [s for s, ws in zip(scores, windows) for _w in ws])
            at = 0
            for img, ws in zip(some, windows):
                out.append(merge_tiles(found[at:at + len(ws)], ws, img.shape[1], img.shape[0]))
                at += len(ws)
        return out


class DetectStage(Stage):
    name = "detect"
    max_batch = 16

    def setup(self, settings) -> None:
        self.model = TritonModel.for_settings(settings, "yolox")
        self.model.wait_ready(120)
        self.detector = Detector(self.model)
        self.min_score = settings.detect_min_score
        self.tiled = settings.detect_tiles

    def problem(self) -> str:
        return self.model.problem

    def close(self) -> None:
        self.model.close()  # unregisters and frees its shared-memory regions

    def process(self, items: list[FrameItem]) -> None:
        # A task whose client gave its boxes (TaskOptions.given_boxes) has them on its frames already, put there
        # by the upload's decoder (posemesh.mesh.given_boxes): the model does not run for it.
        detected = []
        for item in items:
            if not item.task.options.HasField("boxes_given"):
                detected.append(item)
                continue
            found = [(p.box.x1, p.box.y1, p.box.x2, p.box.y2) for p in item.frame.persons]
            self._keep(item, np.array(found, np.float32).reshape(-1, 4), np.ones(len(found), np.float32))
        if not detected:
            return
        decoded = [decode_for_detection(it.frame.jpeg, it.frame.width, it.frame.height, self.tiled) for it in detected]
        min_scores = [it.task.options.min_person_score or self.min_score for it in detected]
        detect = self.detector.tiled if self.tiled else self.detector
        results = detect([img for img, _f in decoded], min_scores)
        for item, (_img, factor), (boxes, scores) in zip(detected, decoded, results):
            self._keep(item, boxes * factor, scores)

    @staticmethod
    def _keep(item: FrameItem, boxes: np.ndarray, scores: np.ndarray) -> None:
        """The frame's persons: these boxes (sorted by score) inside the frame, as the task chooses."""
        del item.frame.persons[:]
        w, h = item.frame.width, item.frame.height
        if w and h:
            boxes = np.clip(boxes, 0, [w, h, w, h])
            inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])  # a given box may lie outside
            boxes, scores = boxes[inside], scores[inside]
        boxes, scores = chosen(boxes, scores, item.task.options)
        for box, score in zip(boxes.tolist(), scores.tolist()):
            item.frame.persons.add(box=tpb.Box(x1=box[0], y1=box[1], x2=box[2], y2=box[3]), score=score)
