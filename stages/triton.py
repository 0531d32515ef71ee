"""A Triton model as a function of numpy arrays, batched the way the server wants it."""

from __future__ import annotations

import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype


class TritonModel:
    """Calls one model over gRPC. Inputs larger than the model's max batch are split into chunks that
    are sent concurrently, so Triton's dynamic batcher can merge them with other workers' requests."""

    def __init__(self, url: str, name: str, ready_timeout: float = 120.0):
        self.url, self.name = url, name
        self.client = grpcclient.InferenceServerClient(url)
        self._wait_ready(ready_timeout)
        config = self.client.get_model_config(name, as_json=True)["config"]
        self.max_batch = int(config.get("max_batch_size", 1)) or 1
        self.output_names = [o["name"] for o in config["output"]]
        self.calls = 0
        self.seconds = 0.0

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client.is_model_ready(self.name):
                    return
            except InferenceServerException:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Triton model {self.name!r} at {self.url} not ready after {timeout}s")
            time.sleep(0.25)

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        n = next(iter(inputs.values())).shape[0]
        if n == 0:
            raise ValueError("empty batch")
        starts = list(range(0, n, self.max_batch))
        results: list = [None] * len(starts)
        errors: list = []
        done = threading.Semaphore(0)
        t0 = time.perf_counter()
        for k, start in enumerate(starts):
            tensors = []
            for name, array in inputs.items():
                chunk = np.ascontiguousarray(array[start:start + self.max_batch])
                t = grpcclient.InferInput(name, list(chunk.shape), np_to_triton_dtype(chunk.dtype))
                t.set_data_from_numpy(chunk)
                tensors.append(t)

            def callback(result, error, k=k):
                if error is not None:
                    errors.append(error)
                else:
                    results[k] = result
                done.release()

            self.client.async_infer(self.name, tensors, callback,
                                    outputs=[grpcclient.InferRequestedOutput(o) for o in self.output_names])
        for _ in starts:
            done.acquire()
        if errors:
            raise RuntimeError(f"Triton {self.name}: {errors[0]}")
        self.calls += len(starts)
        self.seconds += time.perf_counter() - t0
        return {o: np.concatenate([r.as_numpy(o) for r in results]) for o in self.output_names}

    def close(self) -> None:
        self.client.close()
