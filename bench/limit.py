"""The model-compute limit: how many frames a second the models alone could do on this machine.

The same ONNX files the stack serves, on the same inputs the stack's workers give Triton (each frame
JPEG-encoded and decoded as the mesh does, letterboxed for YOLOX; every detected person cropped for the
pose model), each model at its fastest batch size, one ONNX Runtime thread per process and one process
per core, nothing else running: no decoding, no Kafka, no Triton, no encoding. Preparing the inputs is
not timed. The stack can only approach this number; the ratio says how much of the CPU it spends on the
models.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from posemesh.mesh import jpeg, media
from posemesh.mesh.settings import JPEG_QUALITY
from posemesh.stages.detect import DEFAULT_MIN_SCORE, decode, letterbox
from posemesh.stages.pose import PoseEstimator

BATCHES = (1, 2, 4, 8, 16)
POSE_INPUT = {"rtmpose": "input"}


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class Workload:
    frames: int
    images: Path  # .npy: letterboxed YOLOX inputs [N, 3, 416, 416] uint8
    crops: Path  # .npy: pose inputs [M, ...] uint8
    yolox_batch: int = 1
    pose_batch: int = 1
    yolox_ms: float = 0.0  # per frame, one thread, at its best batch
    pose_ms: float = 0.0  # per crop

    @property
    def persons_per_frame(self) -> float:
        return np.load(self.crops, mmap_mode="r").shape[0] / self.frames


def prepare(clip: Path, onnx_dir: Path, pose_model: str, quality: int = JPEG_QUALITY,
            work: Path | None = None) -> Workload:
    work = work or Path(tempfile.mkdtemp(prefix="posemesh-limit-"))
    work.mkdir(parents=True, exist_ok=True)
    info = media.probe(clip).video
    yolox = session(onnx_dir / "yolox.onnx")
    estimator = PoseEstimator(pose_model, None)
    images, crops = [], []
    for frame in media.FrameReader(clip, info.fps):
        data, w, h = frame.jpeg(quality)  # what raw_frames carries
        small, factor = jpeg.decode_for(data, w, h, 416)  # what detect decodes
        boxed, ratio = letterbox(small)
        images.append(boxed)
        [out] = yolox.run(None, {"images": boxed[None]})
        boxes, _scores = decode(out[0], ratio, DEFAULT_MIN_SCORE)
        full = jpeg.decode(data)  # what pose decodes
        boxes = np.clip(boxes * factor, 0, [w, h, w, h])  # as the detect stage reports them
        crops += [estimator.crop(full, b)[0] for b in boxes]
    np.save(work / "images.npy", np.stack(images))
    np.save(work / "crops.npy", np.stack(crops))
    load = Workload(len(images), work / "images.npy", work / "crops.npy")
    load.yolox_batch, load.yolox_ms = best_batch(yolox, "images", np.load(load.images))
    pose = session(onnx_dir / f"{pose_model}.onnx")
    load.pose_batch, load.pose_ms = best_batch(pose, POSE_INPUT.get(pose_model, "input_1"), np.load(load.crops))
    return load


def best_batch(sess: ort.InferenceSession, name: str, data: np.ndarray) -> tuple[int, float]:
    """The batch size with the least time per item (ms), over a sample of the inputs."""
    sample = data[: min(len(data), 64)]
    best = (1, float("inf"))
    for batch in BATCHES:
        sess.run(None, {name: sample[:batch]})
        t0 = time.perf_counter()
        for i in range(0, len(sample), batch):
            sess.run(None, {name: sample[i:i + batch]})
        per_item = (time.perf_counter() - t0) / len(sample) * 1000
        if per_item < best[1]:
            best = (batch, per_item)
    return best


def _share(args) -> None:
    images, crops, onnx_dir, pose_model, yolox_batch, pose_batch, part, parts, start = args
    yolox, pose = session(onnx_dir / "yolox.onnx"), session(onnx_dir / f"{pose_model}.onnx")
    pose_input = POSE_INPUT.get(pose_model, "input_1")
    imgs, crps = np.load(images, mmap_mode="r"), np.load(crops, mmap_mode="r")
    mine_i = np.ascontiguousarray(imgs[part::parts])
    mine_c = np.ascontiguousarray(crps[part::parts])
    yolox.run(None, {"images": mine_i[:yolox_batch]})  # first-call set-up is not the model's cost
    pose.run(None, {pose_input: mine_c[:pose_batch]})
    start.wait()
    for i in range(0, len(mine_i), yolox_batch):
        yolox.run(None, {"images": mine_i[i:i + yolox_batch]})
    for i in range(0, len(mine_c), pose_batch):
        pose.run(None, {pose_input: mine_c[i:i + pose_batch]})


def frames_per_second(load: Workload, onnx_dir: Path, pose_model: str, cores: int | None = None) -> float:
    """Both models on every frame's inputs, the work split over one single-threaded process per core."""
    cores = cores or os.cpu_count() or 1
    ctx = mp.get_context("fork")
    start = ctx.Barrier(cores + 1)
    args = [(load.images, load.crops, onnx_dir, pose_model, load.yolox_batch, load.pose_batch, k, cores, start)
            for k in range(cores)]
    procs = [ctx.Process(target=_share, args=(a,)) for a in args]
    for p in procs:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    for p in procs:
        p.join()
    return load.frames / (time.perf_counter() - t0)
