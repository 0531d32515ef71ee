"""A Triton model as a function of numpy arrays: batched the way the server wants, with deadlines.

- Inputs larger than the model's max batch are split into chunks sent concurrently, so Triton's dynamic
  batcher can merge them with other workers' requests.
- Every request has a deadline (POSEMESH_TRITON_TIMEOUT_S): a hung server costs a bounded wait, not a
  hung worker.
- Transient failures (server unreachable, restarting, hung, model not loaded yet) are retried with
  back-off for up to POSEMESH_TRITON_OUTAGE_S; meanwhile `problem` says what is wrong (the worker's health
  turns NOT_SERVING). After that TritonUnavailable is raised and the worker fails the affected tasks with
  that message. Other errors (a tensor the model rejects) raise StageError at once.
- The gRPC channel reconnects quickly once the server is back (reconnect back-off capped at 1 s).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from posemesh.stages.base import StageError

TRANSIENT_CODES = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
                   "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.UNKNOWN"}
TRANSIENT_WORDS = ("unknown model", "not ready", "not found", "failed to connect", "connection", "socket closed",
                   "deadline", "unavailable")
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]


class TritonUnavailable(RuntimeError):
    """Triton could not serve the model for longer than the outage limit."""


def transient(exc: Exception) -> bool:
    if isinstance(exc, InferenceServerException):
        if exc.status() in TRANSIENT_CODES:
            return True
        text = (exc.message() or "").lower()
        return any(w in text for w in TRANSIENT_WORDS)
    return isinstance(exc, (ConnectionError, TimeoutError))


class TritonModel:
    def __init__(self, url: str, name: str, timeout_s: float = 10.0, outage_s: float = 60.0):
        self.url, self.name = url, name
        self.timeout_s, self.outage_s = timeout_s, outage_s
        self.client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self.max_batch = 0
        self.output_names: list[str] = []
        self.calls = 0
        self.seconds = 0.0
        self._problem = ""  # non-empty while calls are failing
        self._probed = 0.0

    @property
    def problem(self) -> str:
        """What is wrong with Triton ("" when nothing is). While something is, a cheap readiness probe (at
        most once a second, from the health thread) clears it as soon as the model answers again, so
        health recovers even when no work is waiting."""
        if self._problem and time.monotonic() - self._probed > 1.0:
            self._probed = time.monotonic()
            try:
                if self.client.is_model_ready(self.name, client_timeout=1.0):
                    self._problem = ""
            except InferenceServerException:
                pass
        return self._problem

    @problem.setter
    def problem(self, value: str) -> None:
        self._problem = value

    def _load_config(self) -> None:
        config = self.client.get_model_config(self.name, as_json=True, client_timeout=self.timeout_s)["config"]
        self.max_batch = int(config.get("max_batch_size", 1)) or 1
        self.output_names = [o["name"] for o in config["output"]]

    def wait_ready(self, timeout: float) -> None:
        """Block until the model answers (start-up); raises TritonUnavailable after `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.client.is_model_ready(self.name, client_timeout=self.timeout_s):
                    self._load_config()
                    return
            except InferenceServerException:
                pass
            if time.monotonic() > deadline:
                raise TritonUnavailable(f"Triton model {self.name!r} at {self.url} not ready after {timeout:.0f} s")
            time.sleep(0.25)

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        n = next(iter(inputs.values())).shape[0]
        if n == 0:
            raise ValueError("empty batch")
        give_up = time.monotonic() + self.outage_s
        delay = 0.2
        while True:
            try:
                if not self.max_batch:
                    self._load_config()
                out = self._infer(inputs, n)
                self.problem = ""
                return out
            except Exception as exc:  # noqa: BLE001 - sorted into transient and not below
                if not transient(exc):
                    raise StageError(f"Triton model {self.name}: {_text(exc)}") from None
                self.problem = f"Triton model {self.name} at {self.url}: {_text(exc)}"
                if time.monotonic() + delay > give_up:
                    raise TritonUnavailable(f"Triton at {self.url} could not serve {self.name} for "
                                            f"{self.outage_s:.0f} s ({_text(exc)})") from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _infer(self, inputs: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
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

            self.client.async_infer(self.name, tensors, callback, client_timeout=self.timeout_s,
                                    outputs=[grpcclient.InferRequestedOutput(o) for o in self.output_names])
        for _ in starts:
            # The deadline is enforced by gRPC; this bound only guards against a callback never coming.
            if not done.acquire(timeout=self.timeout_s + 5):
                raise TimeoutError(f"no answer from Triton within {self.timeout_s + 5:.0f} s")
        if errors:
            raise errors[0]
        self.calls += len(starts)
        self.seconds += time.perf_counter() - t0
        return {o: np.concatenate([r.as_numpy(o) for r in results]) for o in self.output_names}

    def close(self) -> None:
        self.client.close()


def _text(exc: Exception) -> str:
    if isinstance(exc, InferenceServerException):
        return f"{exc.status() or ''} {exc.message() or ''}".strip()
    return f"{exc.__class__.__name__}: {exc}"
