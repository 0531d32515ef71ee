"""Model registry, graph surgery and decoding: pure logic and ONNX Runtime, no servers."""

from __future__ import annotations

import shutil

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from posemesh.mesh import models
from posemesh.stages import pose
from tests.conftest import MODELS


def test_committed_triton_configs_match_the_registry():
    for path, text in models.expected_config_files().items():
        assert path.read_text() == text, f"{path} is stale: run `posemesh models configs`"
    for spec in models.MODELS.values():
        link = models.CPU_REPOSITORY / spec.name / "1" / "model.py"
        assert link.resolve() == (models.CPU_REPOSITORY / "onnxruntime_model.py").resolve()
        gpu = (models.GPU_REPOSITORY / spec.name / "config.pbtxt").read_text()
        assert 'platform: "tensorrt_plan"' in gpu and "max_batch_size: 32" in gpu


@pytest.mark.parametrize("name", list(models.MODELS))
def test_batch_of_n_equals_n_single_runs(onnx_dir, name):
    spec = models.MODELS[name]
    session = ort.InferenceSession(str(onnx_dir / spec.served_file), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [t.name for t in spec.inputs]
    assert [o.name for o in session.get_outputs()] == [t.name for t in spec.outputs]
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (5, *spec.inputs[0].dims), dtype=np.uint8)
    batched = session.run(None, {spec.inputs[0].name: x})
    for i in range(5):
        single = session.run(None, {spec.inputs[0].name: x[i:i + 1]})
        for b, s in zip(batched, single):
            assert b.shape[1:] == s.shape[1:]
            assert np.abs(b[i] - s[0]).max() <= 1e-4


def test_served_yolox_gives_the_published_heads_person_columns(onnx_dir):
    published = ort.InferenceSession(str(MODELS / models.YOLOX_NANO.file), providers=["CPUExecutionProvider"])
    served = ort.InferenceSession(str(onnx_dir / "yolox.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).integers(0, 256, (1, 3, models.YOLOX_SIZE, models.YOLOX_SIZE), dtype=np.uint8)
    (full,) = published.run(None, {published.get_inputs()[0].name: x.astype(np.float32)})
    (kept,) = served.run(None, {"images": x})
    assert full.shape == (1, 3549, 85) and kept.shape == (1, 3549, models.YOLOX_COLUMNS)
    assert np.abs(kept - full[..., :models.YOLOX_COLUMNS]).max() <= 1e-4


def test_a_prepared_file_is_prepared_again_when_its_surgery_changed(tmp_path, monkeypatch):
    first = models.prepare(tmp_path, MODELS, names=["yolox"])["yolox"]
    made = first.stat().st_mtime_ns
    assert models.prepare(tmp_path, MODELS, names=["yolox"])["yolox"].stat().st_mtime_ns == made  # kept
    monkeypatch.setattr(models, "SURGERY_REVISION", models.SURGERY_REVISION + 1)
    assert models.prepare(tmp_path, MODELS, names=["yolox"])["yolox"].stat().st_mtime_ns != made


def test_weights_are_verified_by_sha256(tmp_path):
    assert models.resolve_weights(models.YOLOX_NANO, MODELS).name == models.YOLOX_NANO.file
    corrupt = tmp_path / models.YOLOX_NANO.file
    shutil.copyfile(MODELS / models.YOLOX_NANO.file, corrupt)
    with open(corrupt, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(models.ModelError, match="sha256"):
        models.resolve_weights(models.YOLOX_NANO, tmp_path)
    with pytest.raises(models.ModelError, match="not found"):
        models.resolve_weights(models.BLAZEPOSE_FULL, tmp_path)


def test_rtmpose_stand_in_has_the_real_signature(onnx_dir):
    session = ort.InferenceSession(str(onnx_dir / "rtmpose.onnx"), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.zeros((3, 3, 256, 192), np.uint8)})
    assert [o.shape for o in out] == [(3, 17, 384), (3, 17, 512)]


def test_simcc_decode_golden():
    sx = np.zeros((2, 17, 384), np.float32)
    sy = np.zeros((2, 17, 512), np.float32)
    for k in range(17):
        sx[0, k, 10 * k + 3] = 0.9
        sy[0, k, 20 * k + 1] = 0.8
    sx[1, :, 100] = 0.4
    sy[1, :, 200] = 0.7
    sx[1, 5] = -1.0  # no positive response: invisible
    locs, scores = pose.decode_simcc(sx, sy)
    np.testing.assert_allclose(locs[0, :, 0], (10 * np.arange(17) + 3) / 2.0)
    np.testing.assert_allclose(locs[0, :, 1], (20 * np.arange(17) + 1) / 2.0)
    np.testing.assert_allclose(scores[0], 0.8)  # the smaller of the two maxima
    assert locs[1, 0].tolist() == [50.0, 100.0] and scores[1, 0] == pytest.approx(0.4)
    assert locs[1, 5].tolist() == [-1.0, -1.0]


def test_crop_region_and_matrix_round_trip_and_aspect():
    box = (100.0, 50.0, 160.0, 250.0)  # 60 x 200: tall
    region = pose.crop_region(box, 192, 256)
    x, y, w, h = region
    assert h == 250 and w == round(250 * 192 / 256)  # the height padded by 1.25, the width to the 3:4 input
    assert abs(x + w / 2 - 130) <= 0.5 and abs(y + h / 2 - 150) <= 0.5  # centred on the box
    m = pose.crop_matrix(region, 192, 256)
    # The region's outer pixel edges land on the crop's, and points come back exactly.
    edges = np.array([[x - 0.5, y - 0.5], [x + w - 0.5, y + h - 0.5]])
    np.testing.assert_allclose(edges @ m[:, :2].T + m[:, 2], [[-0.5, -0.5], [191.5, 255.5]], atol=1e-4)
    points = np.array([[130.0, 150.0], [101.5, 60.25]])
    np.testing.assert_allclose(pose.to_image(points @ m[:, :2].T + m[:, 2], m), points, atol=1e-3)


@pytest.mark.parametrize("box", [(700.0, 300.0, 830.0, 640.0), (-40.0, 900.0, 90.0, 1080.0)])
def test_a_resized_crop_is_the_crop_its_matrix_says(box):
    """The crop is a resize of the region (cheaper than a warp); warping the frame through its matrix gives the
    same picture, black outside the frame (the second box runs off the left and bottom edges)."""
    rng = np.random.default_rng(0)
    frame = cv2.GaussianBlur(rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8), (9, 9), 3)  # smooth: no aliasing
    estimator = pose.PoseEstimator("blazepose_lite", None)
    crop, m = estimator.crop(frame, box)
    warped = cv2.cvtColor(cv2.warpAffine(frame, m, (256, 256), flags=cv2.INTER_LINEAR), cv2.COLOR_BGR2RGB)
    assert np.abs(crop.astype(int) - warped).mean() < 0.5  # 0.12 and 0.04 measured; half a pixel off: 2.5, 0.9
    if box[0] < 0:  # the crop's left columns lie left of the frame
        assert not crop[:, :4].any() and not warped[:, :4].any()


def test_blazepose_decode_maps_to_coco_order():
    lm = np.zeros((1, 39, 5), np.float32)
    for i in range(39):
        lm[0, i, :2] = (i, 100 + i)
    lm[0, :, 3] = 10.0
    locs, scores = pose.decode_blazepose(lm.reshape(1, 195))
    assert locs[0, :, 0].tolist() == pose.BLAZEPOSE_TO_COCO.tolist()
    assert np.all(scores > 0.99)
