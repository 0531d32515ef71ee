"""Triton Python-backend model that runs one ONNX file with ONNX Runtime on the CPU.

Every model folder's `1/model.py` links here; the folder's config.pbtxt names the ONNX file
(parameter `onnx_file`, looked up in $POSEMESH_ONNX_DIR) and the tensors. On GPUs the same folders are
TensorRT plans instead (deploy/tensorrt/), with identical tensor names, so workers do not change.

Dynamic batching hands `execute` several requests at once: their inputs are concatenated into one
ONNX Runtime call (the point of batching), and the outputs split back, one response per request.
This Triton build corrupts tensors under numpy 2: its environment pins numpy<2 (deploy/triton-requirements.txt).
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        path = os.path.join(os.environ["POSEMESH_ONNX_DIR"], params["onnx_file"])
        options = ort.SessionOptions()
        # One thread per model instance: on a small CPU, parallelism comes from running the detector and
        # the pose model at the same time, not from splitting one small convolution across cores.
        options.intra_op_num_threads = int(os.environ.get("POSEMESH_ORT_THREADS", "1"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [t["name"] for t in config["input"]]
        self.output_names = [t["name"] for t in config["output"]]

    def execute(self, requests):
        batches = [[pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.input_names]
                   for r in requests]
        sizes = [b[0].shape[0] for b in batches]
        feeds = {n: np.concatenate([b[i] for b in batches]) if len(batches) > 1 else batches[0][i]
                 for i, n in enumerate(self.input_names)}
        try:
            outputs = self.session.run(self.output_names, feeds)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not take the model down
            error = pb_utils.TritonError(f"onnxruntime: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            tensors = [pb_utils.Tensor(n, np.ascontiguousarray(o[start:start + size]))
                       for n, o in zip(self.output_names, outputs)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self):
        self.session = None
