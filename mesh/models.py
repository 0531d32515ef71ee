"""The models posemesh serves: one source of truth for weights, graph surgery and Triton configs.

    posemesh models verify             # check the pretrained files in the models dir against sha256
    posemesh models prepare --out DIR  # write the serving ONNX files (dynamic batch, uint8 input)
    posemesh models configs            # regenerate model_repository/ (CPU) and deploy/tensorrt/ (GPU)
    posemesh models pull NAME          # fetch an official release (needs a network)

Weights are never committed: they are read from the models directory (POSEMESH_MODELS_DIR, default
../shared/models when it exists) and checked against the sha256 values below.

Every served model takes **uint8** pixels and does the cast (and normalisation) inside the graph: a
frame crosses the wire at a quarter of the float32 size, and the worker code is the same whether the
server runs these ONNX files on CPU (Python backend + ONNX Runtime) or TensorRT plans built from them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from posemesh.mesh.settings import REPO_ROOT, default_models_dir, env


@dataclass(frozen=True)
class Weights:
    """A pretrained ONNX file as published, identified by sha256."""

    file: str
    sha256: str
    # Official release to fetch it from where a network exists (a zip holding `member`, or the file).
    url: str = ""
    member: str = ""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # Triton type name without TYPE_
    dims: tuple[int, ...]  # without the batch dimension


@dataclass(frozen=True)
class ServedModel:
    """One Triton model: the ONNX it is built from and how Triton batches it."""

    name: str
    weights: Weights
    surgery: str  # name of a function below that turns the published graph into the served one
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    # On CPU a bigger batch is not cheaper per item (measured with ONNX Runtime on one thread: BlazePose-lite
    # 3.95 ms a crop at batch 1, 4.27 at 8, 4.90 at 32; YOLOX 15.2 ms a frame at 1, 16.9 at 8): the batch
    # caps stay small, just big enough to spread Triton's per-request cost.
    max_batch_cpu: int
    preferred_cpu: tuple[int, ...]
    max_batch_gpu: int = 32
    preferred_gpu: tuple[int, ...] = (8, 16, 32)
    queue_delay_us: int = 2000
    # Built by posemesh when the published file is absent (RTMPose offline): right signature, no training.
    stand_in: str = ""

    @property
    def served_file(self) -> str:
        return f"{self.name}.onnx"


YOLOX_NANO = Weights(
    "yolox_nano_coco_416.onnx", "695e750a5d5754bb5a8d5325643b59282191a7e7a564e435a415fd3c578eab14",
    url="https://github.com/Megvii-BaseDetection/YOLOX/releases/download/0.1.1rc0/yolox_nano.onnx")
YOLOX_NANO_HUMANART = Weights(
    "yolox_nano_humanart_person_416_end2end.onnx",
    "1450966de24902b18aada1a78913d7efd8fc8dcd51bd4d0d5591476bd4a38821",
    url="https://download.openmmlab.com/mmpose/v1/projects/rtmposev1/onnx_sdk/"
        "yolox_nano_8xb8-300e_humanart-40f6f0d0.zip", member="end2end.onnx")
BLAZEPOSE_LITE = Weights("blazepose_lite_256.onnx",
                         "a1879217fef76f3835598619d4551b7acab6b4d0f16e47acb6811b4b37525506")
BLAZEPOSE_FULL = Weights("blazepose_full_256.onnx",
                         "463d547a02d710aaa7020d3ed340be2dde632d25049348a8e270d17b4dbd3590")
# RTMPose-m body7 256x192, OpenMMLab's onnx_sdk release. The sha256 is pinned on first successful pull
# (`posemesh models pull rtmpose --pin`): it could not be computed on the offline build machines.
RTMPOSE_M = Weights(
    "rtmpose-m_simcc-body7_pt-body7_420e-256x192.onnx", env("RTMPOSE_SHA256", ""),
    url="https://download.openmmlab.com/mmpose/v1/projects/rtmposev1/onnx_sdk/"
        "rtmpose-m_simcc-body7_pt-body7_420e-256x192-e48f03d0_20230504.zip", member="end2end.onnx")

# Raised with every change to a surgery below: served files prepared before are prepared again.
SURGERY_REVISION = 2
YOLOX_SIZE = 416
YOLOX_COLUMNS = 6  # of the head's 85 per anchor: box (4), objectness, person (COCO class 0)
BLAZEPOSE_SIZE = 256
RTMPOSE_W, RTMPOSE_H = 192, 256
# mmpose's RTMPose normalisation, RGB order.
RTMPOSE_MEAN = (123.675, 116.28, 103.53)
RTMPOSE_STD = (58.395, 57.12, 57.375)

MODELS: dict[str, ServedModel] = {m.name: m for m in [
    ServedModel("yolox", YOLOX_NANO, "yolox_surgery",
                inputs=(Tensor("images", "UINT8", (3, YOLOX_SIZE, YOLOX_SIZE)),),
                outputs=(Tensor("output", "FP32", (3549, YOLOX_COLUMNS)),),
                max_batch_cpu=4, preferred_cpu=(2, 4)),
    ServedModel("blazepose_lite", BLAZEPOSE_LITE, "blazepose_surgery",
                inputs=(Tensor("input_1", "UINT8", (BLAZEPOSE_SIZE, BLAZEPOSE_SIZE, 3)),),
                outputs=(Tensor("Identity", "FP32", (195,)), Tensor("Identity_1", "FP32", (1,))),
                max_batch_cpu=8, preferred_cpu=(4, 8)),
    ServedModel("blazepose_full", BLAZEPOSE_FULL, "blazepose_surgery",
                inputs=(Tensor("input_1", "UINT8", (BLAZEPOSE_SIZE, BLAZEPOSE_SIZE, 3)),),
                outputs=(Tensor("Identity", "FP32", (195,)), Tensor("Identity_1", "FP32", (1,))),
                max_batch_cpu=8, preferred_cpu=(4, 8)),
    ServedModel("rtmpose", RTMPOSE_M, "rtmpose_surgery",
                inputs=(Tensor("input", "UINT8", (3, RTMPOSE_H, RTMPOSE_W)),),
                outputs=(Tensor("simcc_x", "FP32", (17, RTMPOSE_W * 2)),
                         Tensor("simcc_y", "FP32", (17, RTMPOSE_H * 2))),
                max_batch_cpu=8, preferred_cpu=(4, 8), stand_in="build_rtmpose_stand_in"),
]}


def pose_model_names():
    """TaskOptions.pose_model -> served model name (UNSPECIFIED means the server's default)."""
    from posemesh.v1 import task_service_pb2 as tpb

    return {tpb.POSE_MODEL_BLAZEPOSE_LITE: "blazepose_lite", tpb.POSE_MODEL_BLAZEPOSE_FULL: "blazepose_full",
            tpb.POSE_MODEL_RTMPOSE: "rtmpose"}


class ModelError(RuntimeError):
    pass


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def resolve_weights(w: Weights, models_dir: Path | None = None) -> Path:
    """The verified path of a pretrained file, or ModelError saying what to do."""
    models_dir = models_dir or default_models_dir()
    path = models_dir / w.file
    if not path.exists():
        raise ModelError(f"{w.file} not found in {models_dir} (set POSEMESH_MODELS_DIR or run "
                         f"`posemesh models pull`)")
    if not w.sha256:
        raise ModelError(f"{w.file} has no pinned sha256; pin it with `posemesh models pull --pin`")
    digest = sha256_of(path)
    if digest != w.sha256:
        raise ModelError(f"{path}: sha256 {digest} does not match the pinned {w.sha256}")
    return path


# ---------------------------------------------------------------------------------------------------
# Graph surgery. Each takes the published ModelProto and returns the served one.


def _make_batch_dynamic(model, dim_name: str = "N") -> None:
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].ClearField("dim_value")
        value.type.tensor_type.shape.dim[0].dim_param = dim_name
    # Intermediate shapes recorded with batch 1 would contradict the new inputs.
    del model.graph.value_info[:]


def _uint8_input(model, name: str, scale: float | None = None, mean=None, std=None, channel_axis: int = 1):
    """Replace float input `name` by a uint8 input of the same name, casting (and normalising) inside."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    original = next(i for i in graph.input if i.name == name)
    internal = f"{name}__f32"
    for node in graph.node:
        node.input[:] = [internal if x == name else x for x in node.input]
    nodes, current = [helper.make_node("Cast", [name], [f"{name}__cast"], to=TensorProto.FLOAT)], f"{name}__cast"
    shape = [1, 1, 1, 1]
    if mean is not None:
        shape[channel_axis] = len(mean)
        graph.initializer.append(numpy_helper.from_array(np.array(mean, np.float32).reshape(shape), f"{name}__mean"))
        graph.initializer.append(numpy_helper.from_array(
            (1.0 / np.array(std, np.float32)).reshape(shape), f"{name}__inv_std"))
        nodes += [helper.make_node("Sub", [current, f"{name}__mean"], [f"{name}__centred"]),
                  helper.make_node("Mul", [f"{name}__centred", f"{name}__inv_std"], [internal])]
    elif scale is not None:
        graph.initializer.append(numpy_helper.from_array(np.array(scale, np.float32), f"{name}__scale"))
        nodes.append(helper.make_node("Mul", [current, f"{name}__scale"], [internal]))
    else:
        nodes[0].output[0] = internal
    for i, node in enumerate(nodes):
        graph.node.insert(i, node)
    original.type.tensor_type.elem_type = TensorProto.UINT8


def yolox_surgery(model):
    import numpy as np
    from onnx import numpy_helper

    _make_batch_dynamic(model)
    # The export baked batch 1 into three Reshape shapes [1, 85, -1]; 0 copies the input's dimension.
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.int64 and arr.tolist() == [1, 85, -1]:
            init.CopyFrom(numpy_helper.from_array(np.array([0, 85, -1], np.int64), init.name))
    _uint8_input(model, "images")
    _person_columns(model, "output")
    return model


def _person_columns(model, name: str) -> None:
    """Keep the columns of output `name` that detect reads (box 4, objectness, the person class): the head's
    other 79 class scores were 1.2 MB a frame copied out of ONNX Runtime, through Triton and into the worker,
    and never read."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    full = f"{name}__all_classes"
    for node in graph.node:
        node.output[:] = [full if x == name else x for x in node.output]
    for const, value in (("starts", 0), ("ends", YOLOX_COLUMNS), ("axes", 2)):
        graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), f"{name}__{const}"))
    graph.node.append(helper.make_node("Slice", [full] + [f"{name}__{c}" for c in ("starts", "ends", "axes")],
                                       [name]))
    graph.output[0].type.tensor_type.shape.dim[2].dim_value = YOLOX_COLUMNS


def blazepose_surgery(model):
    import numpy as np
    from onnx import numpy_helper

    keep = {"Identity", "Identity_1"}  # landmarks and presence; the mask and heatmaps stay on the server
    outputs = [o for o in model.graph.output if o.name in keep]
    del model.graph.output[:]
    model.graph.output.extend(outputs)
    _make_batch_dynamic(model)
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype == np.int64 and arr.tolist() == [1, 256, 256, 1]:
            init.CopyFrom(numpy_helper.from_array(np.array([-1, 256, 256, 1], np.int64), init.name))
    _uint8_input(model, "input_1", scale=1.0 / 255.0)
    return _prune(model)


def rtmpose_surgery(model):
    _make_batch_dynamic(model)
    _uint8_input(model, "input", mean=RTMPOSE_MEAN, std=RTMPOSE_STD)
    return model


def _prune(model):
    """Drop nodes that no kept output depends on."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    keep = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(node.input)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in keep for i in n.input}
    inits = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    return model


def build_rtmpose_stand_in(seed: int = 0):
    """An ONNX model with RTMPose's exact signature (input [N,3,256,192] float, normalised; outputs
    simcc_x [N,17,384] and simcc_y [N,17,512]) and fixed random weights. It is not trained: it exists so
    the RTMPose path (crop, Triton, SimCC decode) runs end to end where the real weights cannot be had."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    n = "N"
    # input -> 8x8 average pool (32x24 map) -> 1x1 conv to 17 channels -> two linear heads.
    conv_w = rng.normal(0, 0.5, (17, 3, 1, 1)).astype(np.float32)
    wx = rng.normal(0, 0.05, (32 * 24, RTMPOSE_W * 2)).astype(np.float32)
    wy = rng.normal(0, 0.05, (32 * 24, RTMPOSE_H * 2)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["input"], ["pooled"], kernel_shape=[8, 8], strides=[8, 8]),
        helper.make_node("Conv", ["pooled", "conv_w"], ["feat"]),
        helper.make_node("Reshape", ["feat", "feat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "wx"], ["simcc_x"]),
        helper.make_node("MatMul", ["flat", "wy"], ["simcc_y"]),
    ]
    graph = helper.make_graph(
        nodes, "rtmpose_stand_in",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [n, 3, RTMPOSE_H, RTMPOSE_W])],
        [helper.make_tensor_value_info("simcc_x", TensorProto.FLOAT, [n, 17, RTMPOSE_W * 2]),
         helper.make_tensor_value_info("simcc_y", TensorProto.FLOAT, [n, 17, RTMPOSE_H * 2])],
        [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(wx, "wx"),
         numpy_helper.from_array(wy, "wy"),
         numpy_helper.from_array(np.array([0, 17, 32 * 24], np.int64), "feat_shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                              producer_name="posemesh-rtmpose-stand-in")
    model.ir_version = 8
    return model


# ---------------------------------------------------------------------------------------------------


def prepare(out_dir: Path, models_dir: Path | None = None, names: list[str] | None = None) -> dict[str, Path]:
    """Write the served ONNX file of each model into out_dir (atomically); returns name -> path.
    Files whose source and surgery are unchanged are kept (a stamp holds the source sha256 and SURGERY_REVISION)."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in names or list(MODELS):
        spec = MODELS[name]
        target = out_dir / spec.served_file
        try:
            source = resolve_weights(spec.weights, models_dir)
            stamp = f"{spec.weights.sha256} surgery {SURGERY_REVISION}"
        except ModelError:
            if not spec.stand_in:
                raise
            source, stamp = None, f"stand-in:{spec.stand_in} surgery {SURGERY_REVISION}"
        stamp_file = target.with_suffix(".source")
        if target.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
            written[name] = target
            continue
        model = onnx.load(str(source)) if source else globals()[spec.stand_in]()
        model = globals()[spec.surgery](model)
        onnx.checker.check_model(model)
        with tempfile.NamedTemporaryFile(dir=out_dir, suffix=".tmp", delete=False) as tmp:
            tmp.write(model.SerializeToString())
        os.replace(tmp.name, target)
        stamp_file.write_text(stamp)
        written[name] = target
    return written


def is_stand_in(out_dir: Path, name: str) -> bool:
    stamp = out_dir / f"{name}.source"
    return stamp.exists() and stamp.read_text().startswith("stand-in:")


# Python-backend instances of each model on CPU: two stubs, each running ONNX Runtime on one thread, so a model
# can use both cores of the development machine. With one, a model ran one batch at a time: while the pose stage
# prepared its next crops BlazePose idled, and once decoding and detect were done (the last 64 frames of every
# upload) only BlazePose's one stub and annotate were left to run. bench/README.md (loop.py, "two instances of
# each model on CPU") has the A/B: 2 uploads 7.1-7.4 -> 8.6-8.7 frames/s, 239-247 -> 218-220 CPU ms a frame.
# On a GPU one instance per GPU (TensorRT runs the batch across the device).
CPU_INSTANCES = 2


def triton_config(spec: ServedModel, flavour: str) -> str:
    """config.pbtxt text. flavour 'cpu': Python backend over ONNX Runtime; 'gpu': TensorRT plan."""
    gpu = flavour == "gpu"
    max_batch = spec.max_batch_gpu if gpu else spec.max_batch_cpu
    preferred = spec.preferred_gpu if gpu else spec.preferred_cpu

    def tensors(kind: str, items) -> str:
        body = ",\n".join(f'  {{ name: "{t.name}" data_type: TYPE_{t.dtype} dims: [ {", ".join(map(str, t.dims))} ] }}'
                          for t in items)
        return f"{kind} [\n{body}\n]\n"

    lines = ["# Generated by `posemesh models configs` from mesh/models.py; do not edit by hand.\n",
             f'name: "{spec.name}"\n']
    if gpu:
        lines += ['platform: "tensorrt_plan"\n', 'default_model_filename: "model.plan"\n']
    else:
        lines += ['backend: "python"\n']
    lines += [f"max_batch_size: {max_batch}\n", tensors("input", spec.inputs), tensors("output", spec.outputs),
              "dynamic_batching {\n"
              f"  preferred_batch_size: [ {', '.join(map(str, preferred))} ]\n"
              f"  max_queue_delay_microseconds: {spec.queue_delay_us}\n"
              "}\n",
              f"instance_group [ {{ count: {1 if gpu else CPU_INSTANCES} "
              f"kind: {'KIND_GPU' if gpu else 'KIND_CPU'} }} ]\n"]
    if not gpu:
        lines += ['parameters { key: "onnx_file" value: { string_value: "' + spec.served_file + '" } }\n']
    return "".join(lines)


CPU_REPOSITORY = REPO_ROOT / "model_repository"
GPU_REPOSITORY = REPO_ROOT / "deploy" / "tensorrt" / "model_repository"


def expected_config_files() -> dict[Path, str]:
    files = {}
    for spec in MODELS.values():
        files[CPU_REPOSITORY / spec.name / "config.pbtxt"] = triton_config(spec, "cpu")
        files[GPU_REPOSITORY / spec.name / "config.pbtxt"] = triton_config(spec, "gpu")
    return files


def write_configs() -> list[Path]:
    out = []
    for path, text in expected_config_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        out.append(path)
        if path.is_relative_to(CPU_REPOSITORY):
            link = path.parent / "1" / "model.py"
            link.parent.mkdir(exist_ok=True)
            if not link.is_symlink():
                link.unlink(missing_ok=True)
                link.symlink_to(Path("..") / ".." / "onnxruntime_model.py")
    return out


def pull(name: str, models_dir: Path, pin: bool = False) -> Path:
    """Download an official release into models_dir and verify it (needs a network)."""
    spec = MODELS[name].weights if name in MODELS else {"yolox_humanart": YOLOX_NANO_HUMANART}[name]
    if not spec.url:
        raise ModelError(f"{name}: no official release URL is known; copy {spec.file} into {models_dir}")
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        download = Path(tmp) / "download"
        urllib.request.urlretrieve(spec.url, download)
        if spec.member:
            with zipfile.ZipFile(download) as zf:
                member = next(m for m in zf.namelist() if m.endswith(spec.member))
                with zf.open(member) as src, open(Path(tmp) / spec.file, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            download = Path(tmp) / spec.file
        digest = sha256_of(download)
        if spec.sha256 and digest != spec.sha256:
            raise ModelError(f"{spec.url}: sha256 {digest} does not match the pinned {spec.sha256}")
        if not spec.sha256 and not pin:
            raise ModelError(f"{spec.file} has no pinned sha256 yet (got {digest}); re-run with --pin to trust it")
        shutil.move(download, models_dir / spec.file)
    print(f"{spec.file}: sha256 {digest}")
    return models_dir / spec.file


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="posemesh models")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("verify")
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "run" / "onnx")
    sub.add_parser("configs")
    p = sub.add_parser("pull")
    p.add_argument("name", choices=[*MODELS, "yolox_humanart"])
    p.add_argument("--pin", action="store_true", help="accept a file whose sha256 is not pinned yet")
    args = parser.parse_args(argv)
    models_dir = default_models_dir()
    if args.cmd == "verify":
        bad = 0
        for spec in MODELS.values():
            try:
                print(f"ok   {spec.name:15s} {resolve_weights(spec.weights, models_dir)}")
            except ModelError as exc:
                bad += 0 if spec.stand_in else 1
                print(f"{'warn' if spec.stand_in else 'FAIL'} {spec.name:15s} {exc}")
        return 1 if bad else 0
    if args.cmd == "prepare":
        for name, path in prepare(args.out, models_dir).items():
            print(f"{name:15s} {path}{'  (stand-in: untrained)' if is_stand_in(args.out, name) else ''}")
        return 0
    if args.cmd == "configs":
        for path in write_configs():
            print(path.relative_to(REPO_ROOT))
        return 0
    if args.cmd == "pull":
        pull(args.name, models_dir, args.pin)
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
