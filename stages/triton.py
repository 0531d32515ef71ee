"""A Triton model as a function of numpy arrays: batched the way the server wants; a busy server slows the
caller down, only a gone one fails it.

- Inputs larger than the model's max batch are split into chunks, sent at most
  POSEMESH_TRITON_MAX_IN_FLIGHT at a time per model and process, so Triton's dynamic batcher can merge them
  with other workers' requests while a worker never floods a busy server's queue: the worker's loop waits
  here, and its Kafka consumer simply reads less (back-pressure).
- A stuck connection is not a gone server either. When the readiness question goes unanswered on the
  model's connection, it is asked again on a new one; if that answers, Triton is there and the old
  connection is what hangs (CI: a request and then every probe on one channel unanswered for minutes while
  Triton served everyone else): the model moves to the new connection and the requests still out on the
  old one are cancelled and sent again.
- Busy is not gone. When an answer takes longer than its deadline (four times the recent round trip, at
  least POSEMESH_TRITON_TIMEOUT_S), the model's readiness is asked: Triton answers health checks at once
  even with a long inference queue, so a ready model means "busy": the request is left to finish (it is
  not cancelled and sent again at the back of the queue). Only a Triton that is unreachable, not ready, or
  not answering at all (hung) runs the outage clock.
- Outages (server unreachable, restarting, hung, model not loaded yet) are retried with back-off for up to
  POSEMESH_TRITON_OUTAGE_S; meanwhile `problem` says what is wrong (the worker's health turns
  NOT_SERVING). After that TritonUnavailable is raised and the worker fails the affected tasks with that
  message. Other errors (a tensor the model rejects) raise StageError at once.
- Only the chunks that failed are sent again: a late or failed chunk never makes its batch start over.
- The gRPC channel reconnects quickly once the server is back (reconnect back-off capped at 1 s).
- When Triton can open this process's system shared memory (POSEMESH_TRITON_SHM=auto probes it once, by
  registering a small region: same host and same /dev/shm, whatever the address; on|off force it), tensors
  travel through shared memory instead of the gRPC payload: a request names a registered region, and
  neither side serializes megabytes of pixels or YOLOX's 1.2 MB-a-frame output. Otherwise (remote Triton,
  a container with its own /dev/shm) the gRPC payload is used.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException, np_to_triton_dtype, triton_to_np_dtype

from posemesh.mesh import tracing
from posemesh.stages.base import ServiceUnavailable, StageError

log = logging.getLogger("posemesh.stage")

# How long a readiness question may take. Triton answers it without queueing, but on a starved machine
# (load in the hundreds) any answer can take seconds: a short wait would count a busy Triton as gone.
PROBE_TIMEOUT_S = 5.0
# A Triton that takes connections but answers not even the readiness question is starved (a machine
# oversubscribed tenfold: four 5 s probes in a row went unanswered in CI) or hung, not gone: it gets this
# many times POSEMESH_TRITON_OUTAGE_S before its tasks fail. Refused connections (gone) get the limit itself.
UNANSWERED_OUTAGE_FACTOR = 4
# What gRPC says when nothing answered in time, as opposed to a refused connection (gone): the readiness
# question timed out, the HTTP/2 handshake was not answered ("timed out before receiving SETTINGS frame"),
# the TCP connection itself was not accepted in time (a starved server's full accept queue: "connect() timed
# out", seen in CI), or a keepalive ping went unanswered. A remote host that vanished reads the same way.
UNANSWERED_WORDS = ("DEADLINE_EXCEEDED", "timed out", "ping timeout")

TRANSIENT_CODES = {"StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.CANCELLED",
                   "StatusCode.RESOURCE_EXHAUSTED", "StatusCode.UNKNOWN"}
TRANSIENT_WORDS = ("unknown model", "not ready", "not found", "failed to connect", "connection", "socket closed",
                   "deadline", "unavailable")
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", 2**31 - 1),
    ("grpc.max_receive_message_length", 2**31 - 1),
    # Reconnect soon after a restart. Not grpc.min_reconnect_backoff_ms: it is also the time a connection
    # attempt may take, and at 200 ms a starved Triton (CI, ten burners per core) could not finish its
    # HTTP/2 handshake in time, so a busy server read as a gone one. gRPC's default (20 s) stays.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
    # Keepalive finds a connection whose host vanished without a word; the answer may take as long as
    # Triton's own keepalive timeout (20 s): at 5 s a starved Triton's connection was closed under its
    # requests ("Stream removed (ping timeout)").
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 20_000),
]


def shared_memory_visible(client, tag: str) -> str:
    """"" when Triton can open a system shared-memory region this process made, else why not. Same host
    and same /dev/shm is what counts, not the address: a container with its own /dev/shm cannot see the
    host's regions even over loopback, and two containers sharing one IPC namespace can see each other's."""
    name = f"{tag}_probe"
    handle = shm.create_shared_memory_region(name, f"/{name}", 64)
    try:
        client.register_system_shared_memory(name, f"/{name}", 64)
    except InferenceServerException as exc:
        return exc.message() or str(exc)
    else:
        try:
            client.unregister_system_shared_memory(name)
        except InferenceServerException:
            pass
        return ""
    finally:
        shm.destroy_shared_memory_region(handle)


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


def unanswered(probe: str) -> bool:
    """Whether a failed readiness question went unanswered (Triton starved or hung) rather than refused
    (Triton gone: "Connection refused", or not ready)."""
    return any(w in probe for w in UNANSWERED_WORDS)


class _Round:
    """The sub-requests of one call that are out at the same time, and what came back for each."""

    def __init__(self, starts: list[int]):
        self.lock = threading.Lock()
        self.left = len(starts)
        self.results: dict[int, object] = {}
        self.errors: dict[int, Exception] = {}
        self.sent: dict[int, float] = {}  # start -> when it was sent (monotonic)
        self.done = threading.Event()
        if not starts:
            self.done.set()

    def sending(self, start: int) -> float:
        """Notes that the sub-request at `start` goes out now; returns when."""
        with self.lock:
            self.sent[start] = time.monotonic()
            return self.sent[start]

    def unanswered(self) -> list[int]:
        """The sub-requests sent that have had no answer yet."""
        with self.lock:
            return [s for s in self.sent if s not in self.results and s not in self.errors]

    def oldest_unanswered(self) -> float:
        """When the longest-waiting sub-request still out was sent (now when none is)."""
        return min((self.sent[s] for s in self.unanswered()), default=time.monotonic())

    def answer(self, start: int, result, error) -> None:
        with self.lock:
            if error is not None:
                self.errors[start] = error
            else:
                self.results[start] = result
            self.left -= 1
            if self.left == 0:
                self.done.set()


class TritonModel:
    """One model on one Triton server, called like a function of numpy arrays (see the module docstring)."""

    def __init__(self, url: str, name: str, timeout_s: float = 10.0, outage_s: float = 60.0, shm: str = "auto",
                 max_in_flight: int = 4):
        self.url, self.name = url, name
        self.timeout_s, self.outage_s = timeout_s, outage_s
        self.client = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        self.max_batch = 0
        self.output_names: list[str] = []
        self.outputs: dict[str, tuple[np.dtype, list[int]]] = {}  # name -> dtype, dims without batch
        self.shm_mode = shm  # Settings.triton_shm: "auto" (probed once Triton answers), "on" or "off"
        self.shared_memory = shm == "on"
        self.slots: SharedMemorySlots | None = None
        self.in_flight = threading.BoundedSemaphore(max(1, max_in_flight))
        self.latency_s = 0.0  # moving average of answered requests' round trips
        self.calls = 0
        self.seconds = 0.0
        self.late = 0  # answers that came after the deadline from a Triton that was busy, not gone
        self._problem = ""  # non-empty while Triton is unreachable, not ready or not answering
        self._probed = 0.0
        self._outage_since: float | None = None
        self.reconnects = 0  # times the model moved to a new connection because its own hung
        self._retired: list[tuple[float, object]] = []  # (when, client) replaced, closed a while later

    @classmethod
    def for_settings(cls, settings, name: str) -> TritonModel:
        return cls(settings.triton_url, name, settings.triton_timeout_s, settings.triton_outage_s,
                   settings.triton_shm, settings.triton_max_in_flight)

    @property
    def problem(self) -> str:
        """What is wrong with Triton ("" when nothing is). While something is, a cheap readiness probe (at
        most once a second, from the health thread) clears it as soon as the model answers again, so
        health recovers even when no work is waiting."""
        if self._problem and time.monotonic() - self._probed > 1.0:
            self._probed = time.monotonic()
            try:
                if self.client.is_model_ready(self.name, client_timeout=1.0):
                    self._fine()
            except InferenceServerException:
                pass
        return self._problem

    @problem.setter
    def problem(self, value: str) -> None:
        self._problem = value

    def deadline_s(self) -> float:
        """How long an answer may take before Triton is asked whether it is still there: four times the
        recent round trip, at least POSEMESH_TRITON_TIMEOUT_S. A busy server's answers slow down, and so
        do the checks."""
        return max(self.timeout_s, 4 * self.latency_s)

    def _load_config(self) -> None:
        config = self.client.get_model_config(self.name, as_json=True, client_timeout=self.timeout_s)["config"]
        self.max_batch = int(config.get("max_batch_size", 1)) or 1
        self.output_names = [o["name"] for o in config["output"]]
        self.outputs = {o["name"]: (_np_type(o["data_type"]), [int(d) for d in o["dims"]]) for o in config["output"]}
        if self.shm_mode == "auto" and self.slots is None:
            why_not = shared_memory_visible(self.client, f"pm{os.getpid()}{uuid.uuid4().hex[:6]}")
            self.shared_memory = not why_not
            log.info("Triton model %s at %s: tensors %s", self.name, self.url,
                     "through system shared memory" if self.shared_memory else
                     f"in the gRPC payload (Triton cannot open this process's shared memory: {why_not})")
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

    # -- busy or gone --------------------------------------------------------------------------------------

    def _ready(self) -> str:
        """"" when the model says it is ready (a busy server still answers this at once: health is not
        queued behind inference), else what is wrong. Unanswered, the question is asked again on a new
        connection, and the model moves to it if Triton answers there (the old connection hangs)."""
        try:
            if self.client.is_model_ready(self.name, client_timeout=max(self.timeout_s, PROBE_TIMEOUT_S)):
                return ""
            return "model not ready"
        except InferenceServerException as exc:
            what = _text(exc)
        if not unanswered(what):
            return what
        fresh = grpcclient.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        try:
            ready = fresh.is_model_ready(self.name, client_timeout=max(self.timeout_s, PROBE_TIMEOUT_S))
        except InferenceServerException:
            ready = False
        if not ready:
            fresh.close()
            return what
        log.warning("Triton model %s: its connection to %s hangs (%s) while a new one is answered: moving to the "
                    "new one", self.name, self.url, what)
        now = time.monotonic()
        for when, client in [r for r in self._retired if now - r[0] > 60]:
            client.close()  # long enough for every thread to be done with it
            self._retired.remove((when, client))
        self._retired.append((now, self.client))
        self.client = fresh
        if self.slots is not None:
            self.slots.client = fresh
        self.reconnects += 1
        return ""

    def _trouble(self, what: str, probe: str) -> None:
        """Triton is unreachable, not ready or not answering (`probe`: what the readiness question got):
        start (or continue) the outage clock, and give up once it has run for POSEMESH_TRITON_OUTAGE_S, or
        UNANSWERED_OUTAGE_FACTOR times that while the question goes unanswered rather than refused."""
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
        self.problem = f"Triton model {self.name} at {self.url}: {what}"
        limit = self.outage_s * (UNANSWERED_OUTAGE_FACTOR if unanswered(probe) else 1)
        if now - self._outage_since >= limit:
            raise TritonUnavailable(f"Triton at {self.url} could not serve {self.name} for "
                                    f"{limit:.0f} s ({what})")

    def _fine(self) -> None:
        self._outage_since = None
        self.problem = ""

    def _wait(self, event_wait, started: float, lost=None) -> None:
        """Wait on `event_wait(timeout)`; each time the deadline passes, ask Triton whether it is there.
        Busy (it answers): keep waiting, no clock runs. Gone or hung: the outage clock runs.
        `lost` is a pair (oldest, resend). `resend()` is called at most once a wait, either when the model moved
        off a hung connection, or when Triton keeps answering but the request still out that was sent first (at
        `oldest()`) has waited UNANSWERED_OUTAGE_FACTOR x the outage limit: its answer is taken as lost (in
        CI, on a starved machine, one request's HTTP/2 connection was closed under it, "settings timeout",
        and its answer never came while new calls worked), so the caller cancels and sends again what is
        out. The wait counts from each request's own sending, not the call's start: a call's later chunks
        wait for its earlier ones (max_in_flight) and, on a busy server, each waits its turn in the queue;
        counted from the call's start, a long busy queue read as lost answers (CI runs 130 and 131: every
        chunk sent twice)."""
        reconnects = self.reconnects
        while not event_wait(self.deadline_s()):
            what = self._ready()
            if what:
                self._trouble(f"no answer for {time.monotonic() - started:.0f} s and {what}", what)
                continue
            self._fine()
            if lost is None:
                continue
            oldest, resend = lost
            waited = time.monotonic() - oldest()
            if self.reconnects != reconnects:  # what is out went on the hung connection
                log.warning("Triton model %s: requests out on the hung connection sent again", self.name)
            elif waited > UNANSWERED_OUTAGE_FACTOR * self.outage_s:
                log.warning("Triton model %s: a request unanswered for %.0f s while Triton is there: taken as "
                            "lost, what is out sent again", self.name, waited)
            else:
                continue
            resend()
            lost = None

    # -- calls ---------------------------------------------------------------------------------------------

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        """The outputs for a batch of any size. Only sub-requests that failed are sent again: a late one
        never makes the batch start over."""
        n = next(iter(inputs.values())).shape[0]
        if n == 0:
            raise ValueError("empty batch")
        t0 = time.perf_counter()
        pending: list[int] | None = None
        answered: dict[int, dict[str, np.ndarray]] = {}
        delay = 0.2
        refused_since: float | None = None
        while True:
            try:
                if not self.max_batch:
                    self._load_config()
                if pending is None:
                    pending = list(range(0, n, self.max_batch))
                    step = self.max_batch
                failed = self._send(inputs, pending, step, answered)
            except TritonUnavailable:
                raise  # the outage limit passed while waiting: the tasks fail with that reason, as it is
            except Exception as exc:  # noqa: BLE001 - sorted into transient and not below
                failed = {-1: exc}
            if not failed:
                self._fine()
                self.seconds += time.perf_counter() - t0
                return {o: np.concatenate([answered[s][o] for s in sorted(answered)]) for o in self.output_names}
            exc = next(iter(failed.values()))
            if self.slots is not None and "shared memory" in str(exc).lower():
                self.slots.register_again()  # Triton restarted and forgot our regions
                exc = InferenceServerException(f"shared memory regions registered again: {exc}",
                                               status="StatusCode.UNAVAILABLE")
            if not transient(exc):
                raise StageError(f"Triton model {self.name}: {_text(exc)}") from None
            if pending is not None and -1 not in failed:
                pending = sorted(failed)
            what = self._ready()
            if what:  # unreachable or not ready: an outage, retried with back-off until the limit
                self._trouble(f"{_text(exc)}; {what}", what)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            else:  # the server is there but refused or dropped this request (overload): send again, for as
                # long as an outage may last (a refusal that never ends, such as shared memory Triton cannot
                # open, must not spin forever). A request that went unanswered (a keepalive ping, a deadline)
                # while Triton answers is starvation, as in _trouble: CI, a tenfold oversubscription, "Stream
                # removed (ping timeout)" for 20 s failed the task while Triton was there all along.
                self._fine()
                refused_since = refused_since or time.monotonic()
                limit = self.outage_s * (UNANSWERED_OUTAGE_FACTOR if unanswered(_text(exc)) else 1)
                if time.monotonic() - refused_since > limit:
                    raise TritonUnavailable(f"Triton at {self.url} refused {self.name} requests for "
                                            f"{limit:.0f} s ({_text(exc)})") from None
                time.sleep(min(delay, 0.5))
                delay = min(delay * 2, 2.0)

    def _send(self, inputs: dict[str, np.ndarray], starts: list[int], step: int,
              answered: dict[int, dict[str, np.ndarray]]) -> dict[int, Exception]:
        """Sends the chunks at `starts`, at most max_in_flight at a time (the rest wait here, and so does
        the worker's loop: back-pressure up to the Kafka consumer). Answers go into `answered`; the
        failures are returned."""
        call = _Round(starts)
        taken: dict[int, tuple] = {}
        out: dict[int, object] = {}  # start -> the call's context (cancel() ends it with CANCELLED)

        def cancel_unanswered() -> None:
            for start in call.unanswered():
                if out.get(start) is not None:
                    out[start].cancel()  # its callback runs with CANCELLED: a transient failure, sent again

        t0 = time.monotonic()
        lost = (call.oldest_unanswered, cancel_unanswered)  # a lost answer also holds an in-flight slot
        for start in starts:
            chunks = {name: np.ascontiguousarray(a[start:start + step]) for name, a in inputs.items()}
            rows = next(iter(chunks.values())).shape[0]
            self._wait(lambda timeout: self.in_flight.acquire(timeout=timeout), t0, lost)
            try:
                tensors, outputs = self._tensors(chunks, rows, taken, start)
            except BaseException:
                self.in_flight.release()
                raise
            sent, deadline = call.sending(start), self.deadline_s()
            traced = tracing.triton_call_started()

            def callback(result, error, start=start, sent=sent, deadline=deadline, traced=traced, rows=rows):
                self.in_flight.release()
                if error is None:
                    took = time.monotonic() - sent
                    self.late += took > deadline
                    self.latency_s = took if not self.latency_s else 0.8 * self.latency_s + 0.2 * took
                    tracing.triton_call_ended(*traced, model=self.name, size=rows)
                call.answer(start, result, error)

            # The gRPC deadline is only a backstop against a lost answer, twice the time after which _wait takes
            # one as lost: a slow answer is waited for as long as Triton says it is there (see _wait).
            try:
                out[start] = self.client.async_infer(
                    self.name, tensors, callback, outputs=outputs,
                    client_timeout=2 * max(UNANSWERED_OUTAGE_FACTOR * self.outage_s, deadline))
            except BaseException:  # refused before it went out (a closed channel): no callback will free its slot
                self.in_flight.release()
                raise

        self._wait(call.done.wait, t0, lost)
        self.calls += len(starts)
        for start, result in call.results.items():
            answered[start] = {o: self._output(result, o, taken.get(start)) for o in self.output_names}
        if self.slots is not None:
            for start, slot in taken.items():
                if start in call.results:
                    self.slots.give_back(slot)
                # A failed request's regions are dropped, not reused: Triton may still write into them.
        return call.errors

    def _tensors(self, chunks: dict[str, np.ndarray], rows: int, taken: dict, start: int):
        tensors, outputs = [], []
        if self.slots is None:
            for name, chunk in chunks.items():
                t = grpcclient.InferInput(name, list(chunk.shape), np_to_triton_dtype(chunk.dtype))
                t.set_data_from_numpy(chunk)
                tensors.append(t)
            return tensors, [grpcclient.InferRequestedOutput(o) for o in self.output_names]
        region_in, region_out = self.slots.take()
        taken[start] = (region_in, region_out)
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

    def _output(self, result, name: str, slot) -> np.ndarray:
        if slot is None:
            return result.as_numpy(name)
        shape = [int(d) for d in result.get_output(name).shape]
        offset = next(o for n, o, _b in self._output_layout(shape[0]) if n == name)
        return np.array(shm.get_contents_as_numpy(slot[1].handle, self.outputs[name][0], shape, offset=offset))

    def close(self) -> None:
        if self.slots is not None:
            self.slots.release()
        self.client.close()
        for _when, client in self._retired:
            client.close()


def _np_type(triton_type: str) -> np.dtype:
    return np.dtype(triton_to_np_dtype(triton_type.removeprefix("TYPE_")))


def _text(exc: Exception) -> str:
    if isinstance(exc, InferenceServerException):
        return f"{exc.status() or ''} {exc.message() or ''}".strip()
    return f"{exc.__class__.__name__}: {exc}"
