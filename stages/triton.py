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
- When Triton runs on the same host (a loopback URL; POSEMESH_TRITON_SHM=auto|on|off), tensors travel
  through system shared memory instead of the gRPC payload: a request names a registered region, and
  neither side serializes megabytes of pixels or YOLOX's 1.2 MB-a-frame output. Remote Triton uses the
  gRPC payload as before.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from posemesh.stages.base import ServiceUnavailable, StageError

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


LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def use_shared_memory(url: str, mode: str = "auto") -> bool:
    """Settings.triton_shm: "on", "off", or "auto" (when Triton's address is a loopback address)."""
    if mode in ("on", "off"):
        return mode == "on"
    host = urlparse(f"//{url}").hostname or ""
    return host in LOOPBACK


@dataclass
class _Region:
    name: str
    handle: object
    size: int


class SharedMemorySlots:
    """Pairs of registered regions (inputs, outputs), each big enough for one request at the model's max
    batch. A slot is taken for one request and given back after its outputs are copied out."""

    def __init__(self, client, model: str, input_bytes: int, output_bytes: int):
        self.client, self.model = client, model
        self.input_bytes, self.output_bytes = input_bytes, output_bytes
        self.free: list[tuple[_Region, _Region]] = []
        self.all: list[_Region] = []
        self.lock = threading.Lock()
        self.tag = f"pm{os.getpid()}{uuid.uuid4().hex[:6]}{model}"

    def _region(self, kind: str, size: int) -> _Region:
        name = f"{self.tag}_{len(self.all)}_{kind}"
        handle = shm.create_shared_memory_region(name, f"/{name}", size)
        region = _Region(name, handle, size)
        self.all.append(region)
        self.client.register_system_shared_memory(name, f"/{name}", size)
        return region

    def take(self) -> tuple[_Region, _Region]:
        with self.lock:
            if self.free:
                return self.free.pop()
        return self._region("in", self.input_bytes), self._region("out", self.output_bytes)

    def give_back(self, slot: tuple[_Region, _Region]) -> None:
        with self.lock:
            self.free.append(slot)

    def register_again(self) -> None:
        """After Triton restarted: it forgot every registration."""
        for region in self.all:
            try:
                self.client.register_system_shared_memory(region.name, f"/{region.name}", region.size)
            except InferenceServerException:
                pass  # already registered, or Triton still away (the retry comes back here)

    def release(self) -> None:
        for region in self.all:
            try:
                self.client.unregister_system_shared_memory(region.name)
            except InferenceServerException:
                pass
            shm.destroy_shared_memory_region(region.handle)
        self.all, self.free = [], []


class TritonUnavailable(ServiceUnavailable):
    """Triton could not serve the model for longer than the outage limit."""


def transient(exc: Exception) -> bool:
    if isinstance(exc, InferenceServerException):
        if exc.status() in TRANSIENT_CODES:
            return True
        text = (exc.message() or "").lower()
        return any(w in text for w in TRANSIENT_WORDS)
    return isinstance(exc, (ConnectionError, TimeoutError))


class TritonModel:
    def __init__(self, url: str, name: str, timeout_s: float = 10.0, outage_s: float = 60.0, shm: str = "auto"):
        self.url, self.name = url, name
        self.timeout_s, self.outage_s = timeout_s, outage_s
        self.client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self.max_batch = 0
        self.output_names: list[str] = []
        self.outputs: dict[str, tuple[np.dtype, list[int]]] = {}  # name -> dtype, dims without batch
        self.shared_memory = use_shared_memory(url, shm)
        self.slots: SharedMemorySlots | None = None
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
        self.outputs = {o["name"]: (_np_type(o["data_type"]), [int(d) for d in o["dims"]]) for o in config["output"]}
        if self.shared_memory and self.slots is None:
            def size(tensors) -> int:
                return sum(self.max_batch * int(np.prod([int(d) for d in t["dims"]]))
                           * _np_type(t["data_type"]).itemsize
                           for t in tensors)
            self.slots = SharedMemorySlots(self.client, self.name, size(config["input"]), size(config["output"]))

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
                if self.slots is not None and "shared memory" in str(exc).lower():
                    self.slots.register_again()  # Triton restarted and forgot our regions
                    exc = InferenceServerException(f"shared memory regions registered again: {exc}",
                                                   status="StatusCode.UNAVAILABLE")
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
        taken: list = []
        done = threading.Semaphore(0)
        answered = 0
        t0 = time.perf_counter()
        try:
            for k, start in enumerate(starts):
                chunks = {name: np.ascontiguousarray(a[start:start + self.max_batch]) for name, a in inputs.items()}
                rows = next(iter(chunks.values())).shape[0]
                tensors, outputs = self._tensors(chunks, rows, taken)

                def callback(result, error, k=k):
                    if error is not None:
                        errors.append(error)
                    else:
                        results[k] = result
                    done.release()

                self.client.async_infer(self.name, tensors, callback, client_timeout=self.timeout_s, outputs=outputs)
            for _ in starts:
                # The deadline is enforced by gRPC; this bound only guards against a callback never coming.
                if not done.acquire(timeout=self.timeout_s + 5):
                    raise TimeoutError(f"no answer from Triton within {self.timeout_s + 5:.0f} s")
                answered += 1
            if errors:
                raise errors[0]
            out = {o: np.concatenate([self._output(r, o, k, taken) for k, r in enumerate(results)])
                   for o in self.output_names}
        finally:
            if self.slots is not None and answered == len(starts):
                for slot in taken:  # only slots whose requests are over are used again
                    self.slots.give_back(slot)
        self.calls += len(starts)
        self.seconds += time.perf_counter() - t0
        return out

    def _tensors(self, chunks: dict[str, np.ndarray], rows: int, taken: list):
        tensors, outputs = [], []
        if self.slots is None:
            for name, chunk in chunks.items():
                t = grpcclient.InferInput(name, list(chunk.shape), np_to_triton_dtype(chunk.dtype))
                t.set_data_from_numpy(chunk)
                tensors.append(t)
            return tensors, [grpcclient.InferRequestedOutput(o) for o in self.output_names]
        region_in, region_out = self.slots.take()
        taken.append((region_in, region_out))
        offset = 0
        for name, chunk in chunks.items():
            shm.set_shared_memory_region(region_in.handle, [chunk], offset=offset)
            t = grpcclient.InferInput(name, list(chunk.shape), np_to_triton_dtype(chunk.dtype))
            t.set_shared_memory(region_in.name, chunk.nbytes, offset=offset)
            tensors.append(t)
            offset += chunk.nbytes
        for name, offset_out, nbytes in self._output_layout(rows):
            o = grpcclient.InferRequestedOutput(name)
            o.set_shared_memory(region_out.name, nbytes, offset=offset_out)
            outputs.append(o)
        return tensors, outputs

    def _output_layout(self, rows: int) -> list[tuple[str, int, int]]:
        """(name, offset, bytes) of each output in a slot's output region, one after the other."""
        layout, offset = [], 0
        for name in self.output_names:
            dtype, dims = self.outputs[name]
            nbytes = rows * int(np.prod(dims)) * dtype.itemsize
            layout.append((name, offset, nbytes))
            offset += nbytes
        return layout

    def _output(self, result, name: str, k: int, taken: list) -> np.ndarray:
        if self.slots is None:
            return result.as_numpy(name)
        shape = [int(d) for d in result.get_output(name).shape]
        offset = next(o for n, o, _b in self._output_layout(shape[0]) if n == name)
        return np.array(shm.get_contents_as_numpy(taken[k][1].handle, self.outputs[name][0], shape, offset=offset))

    def close(self) -> None:
        if self.slots is not None:
            self.slots.release()
        self.client.close()


def _np_type(triton_type: str) -> np.dtype:
    return np.dtype(triton_to_np_dtype(triton_type.removeprefix("TYPE_")))


def _text(exc: Exception) -> str:
    if isinstance(exc, InferenceServerException):
        return f"{exc.status() or ''} {exc.message() or ''}".strip()
    return f"{exc.__class__.__name__}: {exc}"
