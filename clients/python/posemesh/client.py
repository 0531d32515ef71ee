"""The Python SDK: a thin, retrying client over the generated TaskService stub.

    from posemesh.client import Client

    with Client("127.0.0.1:50051", api_key="posemesh-dev-key") as pm:
        task = pm.submit("match.mp4", pose_model="blazepose_full")
        task = pm.wait(task.task_id, on_update=lambda t: print(t.state))
        pm.download(task.task_id, "video", "match.annotated.mp4")

Retries: calls that are safe to repeat are retried with exponential back-off (capped at 5 s) on UNAVAILABLE
(and on DEADLINE_EXCEEDED for reads) for up to `retry_s` seconds (default 90: a gateway or whole stack
restart takes 20-60 s), then fail with GatewayUnreachable, which says for how long and why. Uploads are safe
to repeat because each carries one idempotency key through all its attempts; watches reconnect the same way.

An UNAVAILABLE the gateway answers about a live source (its trailer posemesh-unavailable: source, e.g. a
camera that does not answer) is not retried: the gateway is there, the camera is for the caller to check.

Several gateways: give every address, comma-separated ("10.0.0.5:50051,10.0.0.6:50051"), or one DNS name
that resolves to them all (a Kubernetes headless Service). Calls are spread over them (gRPC's round_robin),
and a call that fails because its gateway died is retried on another.
"""

from __future__ import annotations

import io
import math
import os
import random
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import grpc

from posemesh.v1 import task_service_pb2 as tpb
from posemesh.v1 import task_service_pb2_grpc as tpb_grpc

CHUNK = 1024 * 1024  # the gateway's largest accepted chunk
POSE_MODELS = {"default": tpb.POSE_MODEL_UNSPECIFIED, "blazepose_lite": tpb.POSE_MODEL_BLAZEPOSE_LITE,
               "blazepose_full": tpb.POSE_MODEL_BLAZEPOSE_FULL, "rtmpose": tpb.POSE_MODEL_RTMPOSE}
# Artifacts by the names the CLI and the SDK take: the annotated video, the keypoints (JSON lines), and the
# keypoints exported as COCO keypoint results, MOT Challenge tracks and CSV.
ARTIFACTS = {"video": tpb.ARTIFACT_KIND_ANNOTATED_VIDEO, "keypoints": tpb.ARTIFACT_KIND_KEYPOINTS,
             "coco": tpb.ARTIFACT_KIND_COCO_KEYPOINTS, "mot": tpb.ARTIFACT_KIND_MOT_TRACKS,
             "csv": tpb.ARTIFACT_KIND_KEYPOINTS_CSV}
TERMINAL = {tpb.TASK_STATE_COMPLETED, tpb.TASK_STATE_FAILED, tpb.TASK_STATE_CANCELLED}


MAX_BACKOFF_S = 5.0


class GatewayUnreachable(grpc.RpcError):
    """The gateway stayed unavailable for the whole retry budget. An RpcError with code() UNAVAILABLE, so
    code that handles the plain gRPC error handles this one too."""

    def __init__(self, address: str, waited_s: float, last: grpc.RpcError):
        super().__init__()
        self._details = (f"the gateway at {address} could not be reached for {waited_s:.0f} s "
                         f"({last.details() or last.code().name}); is it running, and is the address right?")

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return self._details

    def __str__(self) -> str:
        return self._details


def channel_target(address: str) -> str:
    """The gRPC target for one address or several comma-separated IP:port addresses (gRPC takes a list only
    of IP literals: ipv4:a:p,b:p or ipv6:[a]:p,[b]:p)."""
    if "," not in address or address.startswith(("ipv4:", "ipv6:", "dns:", "unix:", "unix-abstract:", "xds:")):
        return address
    parts = [a.strip() for a in address.split(",") if a.strip()]
    return ("ipv6:" if parts[0].startswith("[") else "ipv4:") + ",".join(parts)


def state_name(state: int) -> str:
    return tpb.TaskState.Name(state).removeprefix("TASK_STATE_").lower()


def read_mot_boxes(path: str | Path) -> dict[int, list[tuple[float, float, float, float]]]:
    """Boxes from a MOT Challenge file (a det.txt, or the mesh's own MOT export; a gt.txt's boxes are all read,
    distractors included): one line per box, `frame,id,bb_left,bb_top,bb_width,bb_height,...` (commas or
    spaces), frames and pixels counted from 1. Returns x1, y1, x2, y2 (pixels from 0) by frame index (from 0),
    as `Client.submit(given_boxes=...)` takes them. A file without boxes is refused: none would mean the
    detector runs."""
    boxes: dict[int, list[tuple[float, float, float, float]]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            frame, _id, left, top, width, height = (float(v) for v in re.split(r"[,\s]+", line.strip())[:6])
        except ValueError:
            raise ValueError(f"{path}:{n}: not a MOT line (frame,id,bb_left,bb_top,bb_width,bb_height,...)") from None
        if not (math.isfinite(frame) and frame >= 1 and frame == int(frame)):
            raise ValueError(f"{path}:{n}: frame {frame:g}: MOT files count frames from 1")
        boxes.setdefault(int(frame) - 1, []).append((left - 1, top - 1, left - 1 + width, top - 1 + height))
    if not boxes:
        raise ValueError(f"{path}: no boxes in it")
    return boxes


class Client:
    def __init__(self, address: str | None = None, api_key: str | None = None, retry_s: float = 90.0,
                 backoff_s: float = 0.2, timeout_s: float = 30.0, channel: grpc.Channel | None = None):
        self.address = address or os.environ.get("POSEMESH_ADDRESS", "127.0.0.1:50051")
        self.api_key = api_key or os.environ.get("POSEMESH_API_KEY", "posemesh-dev-key")
        self.retry_s, self.backoff_s, self.timeout_s = retry_s, backoff_s, timeout_s
        self.channel = channel or grpc.insecure_channel(channel_target(self.address), options=[
            ("grpc.max_receive_message_length", 8 * 1024 * 1024), ("grpc.lb_policy_name", "round_robin")])
        self.stub = tpb_grpc.TaskServiceStub(self.channel)

    @property
    def metadata(self) -> list[tuple[str, str]]:
        return [("authorization", f"Bearer {self.api_key}")]

    def _retry(self, call: Callable, reads: bool = False):
        retryable = {grpc.StatusCode.UNAVAILABLE} | ({grpc.StatusCode.DEADLINE_EXCEEDED} if reads else set())
        waits = Backoff(self.retry_s, self.backoff_s)
        while True:
            try:
                return call()
            except grpc.RpcError as exc:
                if exc.code() not in retryable or _about_a_source(exc):
                    raise
                if not waits.wait():
                    raise GatewayUnreachable(self.address, waits.waited, exc) from None

    # ------------------------------------------------------------------ calls

    def submit(self, video: str | Path | BinaryIO, pose_model: str | int = "default", outputs: list[str] | None = None,
               min_person_score: float = 0.0, idempotency_key: str | None = None, file_name: str | None = None,
               on_bytes: Callable[[int], None] | None = None,
               region_of_interest: list[tuple[float, float]] | None = None, max_persons: int = 0,
               sample_fps: float = 0.0, callback_url: str = "",
               given_boxes: dict[int, list[tuple[float, float, float, float]]] | None = None) -> tpb.Task:
        """Upload a video (a path or a binary file object) and return the task at once. region_of_interest:
        polygon vertices (x, y) in frame pixels; only persons whose box centre is inside are kept.
        max_persons: the highest-scoring persons kept per frame (0: all). sample_fps: frames per second to
        analyse (0: every frame). callback_url: where the server POSTs the outcome when the task ends.
        given_boxes: the persons' boxes (x1, y1, x2, y2 in frame pixels) by frame index (0-based, as the results
        count frames), used instead of running the detector (`read_mot_boxes` reads them from a MOT file)."""
        if given_boxes is not None and not given_boxes:
            raise ValueError("given_boxes is empty: give None to have the detector find the persons")
        if isinstance(video, (str, Path)):
            path = Path(video)
            opener = lambda: open(path, "rb")  # noqa: E731
            file_name = file_name or path.name
        else:
            start = video.tell() if video.seekable() else None

            def opener():
                if start is not None:
                    video.seek(start)
                return _NoClose(video)
            file_name = file_name or getattr(video, "name", "upload")
        options = tpb.TaskOptions(
            pose_model=POSE_MODELS[pose_model] if isinstance(pose_model, str) else pose_model,
            outputs=[ARTIFACTS[o] for o in outputs or []], min_person_score=min_person_score,
            region_of_interest=[tpb.Point(x=x, y=y) for x, y in region_of_interest or []], max_persons=max_persons,
            sample_fps=sample_fps, given_boxes=[
                tpb.FrameBoxes(frame_index=i, boxes=[tpb.Box(x1=b[0], y1=b[1], x2=b[2], y2=b[3]) for b in boxes])
                for i, boxes in sorted((given_boxes or {}).items())])
        metadata = tpb.UploadMetadata(file_name=str(Path(file_name).name), options=options,
                                      idempotency_key=idempotency_key or uuid.uuid4().hex, callback_url=callback_url)

        def requests(f) -> Iterator[tpb.UploadRequest]:
            yield tpb.UploadRequest(metadata=metadata)
            while chunk := f.read(CHUNK):
                if on_bytes:
                    on_bytes(len(chunk))
                yield tpb.UploadRequest(chunk=chunk)

        def call():
            with opener() as f:
                return self.stub.Upload(requests(f), metadata=self.metadata).task
        return self._retry(call)

    def start_live(self, url: str, pose_model: str | int = "default", name: str = "", transport: str = "tcp",
                   max_lag_s: float = 0.0, outputs: list[str] | None = None, min_person_score: float = 0.0) -> tpb.Task:
        """Start a task on a live RTSP source; it runs until the stream ends or cancel() stops it."""
        options = tpb.TaskOptions(
            pose_model=POSE_MODELS[pose_model] if isinstance(pose_model, str) else pose_model,
            outputs=[ARTIFACTS[o] for o in outputs or []], min_person_score=min_person_score)
        source = tpb.LiveSource(
            url=url, transport=tpb.RTSP_TRANSPORT_UDP if transport == "udp" else tpb.RTSP_TRANSPORT_TCP)
        request = tpb.StartLiveTaskRequest(source=source, options=options, name=name, max_lag_s=max_lag_s)
        return self._retry(
            lambda: self.stub.StartLiveTask(request, metadata=self.metadata, timeout=self.timeout_s).task)

    def frames(self, task_id: str) -> Iterator[tpb.WatchFramesResponse]:
        """The task's annotated frames as they are made (JPEG and persons), until it ends. A channel of its
        own keeps gRPC from buffering many frames for a slow reader (HTTP/2's window grows with BDP probing):
        a live view should show the newest frames, and the server drops the oldest for a reader that lags."""
        with grpc.insecure_channel(self.address, options=[("grpc.http2.bdp_probe", 0),
                                                          ("grpc.max_receive_message_length", 8 * 1024 * 1024)]) as ch:
            stub = tpb_grpc.TaskServiceStub(ch)
            yield from stub.WatchFrames(tpb.WatchFramesRequest(task_id=task_id), metadata=self.metadata)

    def get(self, task_id: str) -> tpb.Task:
        return self._retry(lambda: self.stub.GetTask(tpb.GetTaskRequest(task_id=task_id), metadata=self.metadata,
                                                     timeout=self.timeout_s).task, reads=True)

    def stats(self) -> tpb.GetStatsResponse:
        """Your tasks by state (every user's for an admin key) and, per stage, workers alive, frames per
        second over the last minute and frames waiting."""
        return self._retry(lambda: self.stub.GetStats(tpb.GetStatsRequest(), metadata=self.metadata,
                                                      timeout=self.timeout_s), reads=True)

    def list(self, state: int = tpb.TASK_STATE_UNSPECIFIED, page_size: int = 50) -> Iterator[tpb.Task]:
        token = ""
        while True:
            page = self._retry(lambda token=token: self.stub.ListTasks(
                tpb.ListTasksRequest(page_size=page_size, page_token=token, state=state),
                metadata=self.metadata, timeout=self.timeout_s), reads=True)
            yield from page.tasks
            if not page.next_page_token:
                return
            token = page.next_page_token

    def watch(self, task_id: str, timeout_s: float | None = None) -> Iterator[tpb.Task]:
        """Task snapshots as they change, until a terminal state; reconnects if the stream breaks. With
        `timeout_s` the stream ends (DEADLINE_EXCEEDED is swallowed) when that much time has passed, whether
        or not anything changed."""
        deadline = time.monotonic() + timeout_s if timeout_s is not None else None
        waits = Backoff(self.retry_s, self.backoff_s)
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            try:
                for event in self.stub.WatchTask(tpb.WatchTaskRequest(task_id=task_id), metadata=self.metadata,
                                                 timeout=remaining):
                    waits = Backoff(self.retry_s, self.backoff_s)  # heard from the gateway: a new budget
                    yield event.task
                    if event.task.state in TERMINAL:
                        return
                return
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and deadline is not None:
                    return
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                if not waits.wait():
                    raise GatewayUnreachable(self.address, waits.waited, exc) from None

    def wait(self, task_id: str, timeout_s: float | None = None,
             on_update: Callable[[tpb.Task], None] | None = None) -> tpb.Task:
        """Block until the task is completed, failed or cancelled and return it. With `timeout_s`, raise
        TimeoutError once that much time has passed without a terminal state, even if no update came."""
        task = None
        for task in self.watch(task_id, timeout_s):
            if on_update:
                on_update(task)
        if task is None or task.state not in TERMINAL:
            task = self.get(task_id)  # a terminal state that came just at the deadline still counts
        if task.state not in TERMINAL:
            raise TimeoutError(f"task {task_id} still {state_name(task.state)} after {timeout_s}s")
        return task

    def cancel(self, task_id: str) -> tpb.Task:
        return self._retry(lambda: self.stub.CancelTask(tpb.CancelTaskRequest(task_id=task_id),
                                                        metadata=self.metadata, timeout=self.timeout_s).task)

    def delete(self, task_id: str) -> None:
        self._retry(lambda: self.stub.DeleteTask(tpb.DeleteTaskRequest(task_id=task_id), metadata=self.metadata,
                                                 timeout=self.timeout_s))

    def download(self, task_id: str, kind: str | int, dest: str | Path | BinaryIO) -> tpb.Artifact:
        """Stream an artifact to a path (written atomically) or a binary file object."""
        kind = ARTIFACTS[kind] if isinstance(kind, str) else kind

        def call():
            stream = self.stub.DownloadResult(tpb.DownloadResultRequest(task_id=task_id, kind=kind),
                                              metadata=self.metadata)
            first = next(stream)
            artifact = first.artifact
            if isinstance(dest, (str, Path)):
                target = Path(dest)
                if target.is_dir():
                    target = target / artifact.file_name
                tmp = target.with_name(f".{target.name}.part")
                with open(tmp, "wb") as f:
                    for msg in stream:
                        f.write(msg.chunk)
                os.replace(tmp, target)
            else:
                for msg in stream:
                    dest.write(msg.chunk)
            return artifact
        return self._retry(call, reads=True)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Backoff:
    """Waits between attempts: exponential from `first_s`, with jitter, at most MAX_BACKOFF_S each, until
    `budget_s` has passed since the first failure."""

    def __init__(self, budget_s: float, first_s: float):
        self.budget_s, self.next_s = budget_s, first_s
        self.started = time.monotonic()

    @property
    def waited(self) -> float:
        return time.monotonic() - self.started

    def wait(self) -> bool:
        """Sleep before the next attempt; False (without sleeping) once the budget is spent."""
        left = self.budget_s - self.waited
        if left <= 0:
            return False
        time.sleep(min(left, self.next_s * (0.5 + random.random())))
        self.next_s = min(MAX_BACKOFF_S, self.next_s * 2)
        return True


class _NoClose(io.RawIOBase):
    """Lets `with` wrap a caller's file object without closing it."""

    def __init__(self, f):
        self.f = f

    def read(self, n=-1):
        return self.f.read(n)

    def readable(self):
        return True

    def close(self):
        pass


def _about_a_source(exc: grpc.RpcError) -> bool:
    """The gateway's UNAVAILABLE about a live source, not about itself (gateway/validation.py's trailer)."""
    trailers = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return any(key == "posemesh-unavailable" and value == "source" for key, value in trailers or ())
