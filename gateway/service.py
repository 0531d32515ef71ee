"""The TaskService API (grpc.aio). Each method: authenticate, validate, act, answer with a precise code.

Streams (Upload, WatchTask, DownloadResult) are coroutines on one event loop, not a thread each, so one
user's open streams cannot starve everyone else; per-user limits (gateway/limits.py) bound what one
user may hold. Work that blocks (probing a video, talking to the broker, deleting files) runs in
threads, so the loop always answers.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import grpc

from posemesh.gateway import validation
from posemesh.gateway.limits import LimitExceeded
from posemesh.gateway.live import probe_source
from posemesh.gateway.metrics import UPLOAD_BYTES, UPLOADS
from posemesh.gateway.store import ACTIVE, TERMINAL, now_us, timestamp
from posemesh.gateway.validation import Refused
from posemesh.mesh import media, names
from posemesh.mesh.models import pose_model_names
from posemesh.v1 import task_service_pb2 as tpb
from posemesh.v1 import task_service_pb2_grpc as tpb_grpc

log = logging.getLogger("posemesh.gateway")

POSE_MODEL_NAMES = pose_model_names()
MAX_CHUNK = 1024 * 1024
DOWNLOAD_CHUNK = 256 * 1024
MAX_PAGE = 100
# The stored upload's name: never derived from the user's file name (FFmpeg must not guess by it).
TERMINAL_NAMES = {tpb.TASK_STATE_COMPLETED: "completed", tpb.TASK_STATE_FAILED: "failed",
                  tpb.TASK_STATE_CANCELLED: "cancelled"}
WATCH_POLL_S = 2.0  # a watcher re-reads its task at least this often, whatever the change feed says


def unary(method):
    """Turn Refused / LimitExceeded raised by a unary method into its status."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Refused as exc:
            await context.abort(exc.code, exc.message)
        except LimitExceeded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    return wrapper


def streaming(method):
    """The same for server-streaming methods (async generators)."""
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for item in method(self, request, context):
                yield item
        except Refused as exc:
            await context.abort(exc.code, exc.message)
        except LimitExceeded as exc:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    return wrapper


class TaskService(tpb_grpc.TaskServiceServicer):
    def __init__(self, gateway):
        self.gw = gateway
        self.auth = gateway.auth
        self.store = gateway.store
        self.settings = gateway.settings
        self.limits = gateway.limits
        self.changes = gateway.changes
        # Probing decodes: at most this many at once, whoever uploads.
        self.probes = asyncio.Semaphore(2)

    # ------------------------------------------------------------------ helpers

    def _owned_task(self, request, context) -> tuple[str, tpb.Task]:
        user = self.auth.user(context)
        task_id = validation.task_id(request.task_id)
        task = self.store.get(task_id, user)
        if task is None:  # someone else's task looks exactly like a missing one
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no task {task_id}")
        return user, task

    # ------------------------------------------------------------------ Upload

    async def Upload(self, request_iterator, context):
        try:
            response = await self._upload(request_iterator, context)
        except Refused as exc:
            UPLOADS.labels(exc.code.name.lower()).inc()
            await context.abort(exc.code, exc.message)
        except LimitExceeded as exc:
            UPLOADS.labels("resource_exhausted").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except asyncio.CancelledError:
            UPLOADS.labels("cancelled").inc()
            raise
        UPLOADS.labels("accepted").inc()
        UPLOAD_BYTES.inc(response.task.upload_bytes)
        return response

    async def _upload(self, request_iterator, context) -> tpb.UploadResponse:
        user = self.auth.user(context)
        if not self.gw.broker_available():
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the message broker is unavailable, so no task can start: "
                                                       "try again in a moment (nothing was kept)")
        messages = request_iterator.__aiter__()
        try:
            first = await messages.__anext__()
        except StopAsyncIteration:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "empty upload stream: send metadata, then chunks") from None
        if first.WhichOneof("payload") != "metadata":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          "the first upload message must be `metadata` (file name and options), then `chunk`s")
        meta = first.metadata
        options = self._validated_options(meta.options)
        key = validation.idempotency_key(meta.idempotency_key)
        file_name = validation.display_file_name(meta.file_name)
        previous = self.store.by_idempotency_key(user, key) if key else None
        if previous is not None and previous[0].options != options:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, self._key_reused(key, previous[0], "different options"))
        with self.limits.stream_slot(user, "another upload"):
            if previous is not None:  # a retry of an upload that made a task already: it needs no new slot
                return await self._receive_and_start(user, options, key, file_name, previous, messages)
            with self.limits.upload_slot(user):
                return await self._receive_and_start(user, options, key, file_name, None, messages)

    async def _receive_and_start(self, user, options, key, file_name, previous, messages) -> tpb.UploadResponse:
        task_id = self.gw.reservations.take() or names.new_task_id()
        job_dir = self.settings.jobs_dir / task_id
        created = False
        try:
            job_dir.mkdir(parents=True)
            path, size, digest = await self._receive(messages, job_dir)
            if previous is not None:
                return self._same_upload(key, previous, digest)
            async with self.probes:
                try:
                    probed = await asyncio.to_thread(media.probe, path, media.Limits.from_settings(self.settings))
                except media.NotAVideo as exc:
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"{validation.shorten(file_name, 60)}: {exc}") from None
            task = tpb.Task(task_id=task_id, state=tpb.TASK_STATE_QUEUED, file_name=file_name, options=options,
                            video=probed.video, created_at=timestamp(now_us()), upload_bytes=size,
                            warnings=probed.warnings)
            try:
                self.store.create(task, user, key, digest)
            except sqlite3.IntegrityError:
                # A concurrent upload with the same idempotency key won the race.
                winner = self.store.by_idempotency_key(user, key) if key else None
                if winner is None:
                    raise
                if winner[0].options != options:
                    raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                                  self._key_reused(key, winner[0], "different options")) from None
                return self._same_upload(key, winner, digest)
            created = True
            try:
                await asyncio.to_thread(self.gw.start_task, task, path)
            except Exception as exc:  # noqa: BLE001 - whatever failed, the task is removed and the client told
                log.warning("could not start task %s (%s); removing it", task_id, exc)
                await asyncio.to_thread(self.gw.abandon, task_id)
                created = False
                raise Refused(grpc.StatusCode.UNAVAILABLE,
                              "the message broker is unavailable: the upload was not kept and no task was made; "
                              "try again in a moment") from None
            return tpb.UploadResponse(task=self.store.get(task_id))
        finally:
            if not created:
                shutil.rmtree(job_dir, ignore_errors=True)
                self.gw.reservations.give_back(task_id)  # no task was made: the id stays reserved

    def _same_upload(self, key, previous, digest) -> tpb.UploadResponse:
        task, previous_digest = previous
        if previous_digest and previous_digest != digest:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, self._key_reused(key, task, "a different file"))
        return tpb.UploadResponse(task=task)

    @staticmethod
    def _key_reused(key: str, task: tpb.Task, what: str) -> str:
        return (f"idempotency key {validation.shorten(key)} was used for task {task.task_id} with {what}: "
                "use a new key for a new upload, or retry with exactly the same file and options")

    def _validated_options(self, options: tpb.TaskOptions) -> tpb.TaskOptions:
        if options.pose_model not in tpb.PoseModel.values():
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unknown pose_model {options.pose_model}")
        for kind in options.outputs:
            if kind not in tpb.ArtifactKind.values() or kind == tpb.ARTIFACT_KIND_UNSPECIFIED:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unknown output kind {kind}")
        if not 0.0 <= options.min_person_score < 1.0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "min_person_score must be in [0, 1)")
        disabled = {m.strip() for m in self.settings.disabled_pose_models.split(",") if m.strip()}
        chosen = POSE_MODEL_NAMES.get(options.pose_model)
        if chosen in disabled:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"pose model {chosen} is not available on this server: its weights are not installed "
                          f"(`posemesh models pull {chosen} --pin` where a network exists). Choose "
                          f"{' or '.join(sorted(set(POSE_MODEL_NAMES.values()) - disabled))}.")
        return options

    async def _receive(self, messages, job_dir: Path) -> tuple[Path, int, str]:
        """Stream the chunks to disk, enforcing the size limit as they come. Returns path, size, sha256."""
        limit = self.settings.max_upload_bytes
        size = 0
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=job_dir, prefix="upload-", suffix=".partial", delete=False) as out:
            async for message in messages:
                if message.WhichOneof("payload") != "chunk":
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "metadata may only be sent once, first")
                if len(message.chunk) > MAX_CHUNK:
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"chunk of {len(message.chunk)} bytes: chunks are at most {MAX_CHUNK} bytes")
                size += len(message.chunk)
                if size > limit:
                    raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"upload exceeds the limit of {limit} bytes; nothing was kept")
                digest.update(message.chunk)
                out.write(message.chunk)
        if size == 0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          "the upload has no bytes: send the video in `chunk` messages")
        path = job_dir / names.UPLOAD_FILE
        os.replace(out.name, path)
        return path, size, digest.hexdigest()

    # ------------------------------------------------------------------ reads

    @unary
    async def GetTask(self, request, context):
        _user, task = self._owned_task(request, context)
        return tpb.GetTaskResponse(task=task)

    @unary
    async def ListTasks(self, request, context):
        user = self.auth.user(context)
        if request.page_size < 0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
        if request.state not in tpb.TaskState.values():
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unknown state {request.state}")
        offset = validation.page_offset(request.page_token)
        if offset is None:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "invalid page_token: pass one from a ListTasks response")
        limit = min(request.page_size or 20, MAX_PAGE)
        tasks, more = self.store.list(user, offset, limit, request.state)
        return tpb.ListTasksResponse(tasks=tasks, next_page_token=validation.page_token(offset + limit) if more else "")

    @streaming
    async def WatchTask(self, request, context):
        user, task = self._owned_task(request, context)
        with self.limits.stream_slot(user, "another watch"):
            last = None
            while True:
                task = self.store.get(request.task_id, user)
                if task is None:  # deleted while watched
                    raise Refused(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} was deleted")
                if task != last:
                    yield tpb.WatchTaskResponse(task=task)
                    last = task
                if task.state in TERMINAL:
                    return
                await self.changes.wait(task.task_id, WATCH_POLL_S)

    @streaming
    async def WatchFrames(self, request, context):
        user, task = self._owned_task(request, context)
        if task.state in TERMINAL:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"task {task.task_id} is {TERMINAL_NAMES[task.state]}: there are no more frames to watch")
        with self.limits.stream_slot(user, "another frame watch"):
            viewer = await self.gw.views.join(task.task_id)
            try:
                while True:
                    try:
                        frame = await asyncio.wait_for(viewer.queue.get(), WATCH_POLL_S)
                    except TimeoutError:
                        current = self.store.get(task.task_id, user)
                        if current is None or current.state in TERMINAL:
                            return  # the task ended, and its last frames have been sent
                        continue
                    yield tpb.WatchFramesResponse(frame=frame, dropped=viewer.dropped)
            finally:
                await self.gw.views.leave(task.task_id, viewer)

    @unary
    async def StartLiveTask(self, request, context):
        user = self.auth.user(context)
        if not self.gw.broker_available():
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the message broker is unavailable, so no task can start: "
                                                       "try again in a moment")
        source = self.gw.source_policy.check(request.source.url)
        if request.source.transport not in tpb.RtspTransport.values():
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unknown source.transport {request.source.transport}")
        if not 0 <= request.max_lag_s <= 60:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "max_lag_s must be between 0 (the server's default) and 60")
        options = self._validated_options(request.options)
        name = validation.display_file_name(request.name) if request.name else source.shown[:255]
        with self.limits.upload_slot(user):
            try:
                video = await asyncio.to_thread(probe_source, source, request.source.transport, 10.0)
            except ValueError as exc:
                raise Refused(grpc.StatusCode.UNAVAILABLE,
                              f"{source.shown[:200]}: {exc}; try again once it streams") from None
            try:
                media.Limits.from_settings(self.settings).check_size(video.width, video.height)
            except media.NotAVideo as exc:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{source.shown[:200]}: {exc}") from None
            task_id = self.gw.reservations.take() or names.new_task_id()
            live = tpb.LiveStatus(source=source.shown, max_lag_s=request.max_lag_s or self.settings.live_max_lag_s)
            task = tpb.Task(task_id=task_id, state=tpb.TASK_STATE_QUEUED, file_name=name, options=options, video=video,
                            created_at=timestamp(now_us()), live=live, stream_url=self.gw.stream_url(task_id))
            try:
                self.store.create(task, user, None)
            except BaseException:
                self.gw.reservations.give_back(task_id)
                raise
            try:
                await asyncio.to_thread(self.gw.start_live_task, task, source, request.source.transport)
            except Exception as exc:  # noqa: BLE001 - whatever failed, the task is removed and the client told
                log.warning("could not start live task %s (%s); removing it", task_id, exc)
                await asyncio.to_thread(self.gw.abandon, task_id)
                raise Refused(grpc.StatusCode.UNAVAILABLE, "the message broker is unavailable: no task was made; "
                                                           "try again in a moment") from None
        return tpb.StartLiveTaskResponse(task=self.store.get(task_id))

    # ------------------------------------------------------------------ changes

    @unary
    async def CancelTask(self, request, context):
        _user, task = self._owned_task(request, context)
        if task.state in TERMINAL:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"task {task.task_id} is already {TERMINAL_NAMES[task.state]}; only queued or running "
                          "tasks can be cancelled")
        cancelled = await asyncio.to_thread(self.gw.cancel, task.task_id, "cancelled by the user")
        return tpb.CancelTaskResponse(task=cancelled or self.store.get(task.task_id))

    @unary
    async def DeleteTask(self, request, context):
        _user, task = self._owned_task(request, context)
        if task.state in ACTIVE:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"task {task.task_id} is still "
                          f"{'queued' if task.state == tpb.TASK_STATE_QUEUED else 'running'}:"
                          " cancel it first")
        await asyncio.to_thread(self.gw.delete, task.task_id)
        return tpb.DeleteTaskResponse()

    @streaming
    async def DownloadResult(self, request, context):
        user, task = self._owned_task(request, context)
        if request.kind not in tpb.ArtifactKind.values() or request.kind == tpb.ARTIFACT_KIND_UNSPECIFIED:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          "kind is required: ARTIFACT_KIND_ANNOTATED_VIDEO or ARTIFACT_KIND_KEYPOINTS")
        if task.state not in TERMINAL or not task.artifacts:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"task {task.task_id} is {tpb.TaskState.Name(task.state)}: "
                          "results exist once it is COMPLETED "
                          "(or, for a live task, once it has ended)")
        artifact = next((a for a in task.artifacts if a.kind == request.kind), None)
        if artifact is None:
            raise Refused(grpc.StatusCode.NOT_FOUND,
                          f"task {task.task_id} did not produce {tpb.ArtifactKind.Name(request.kind)} "
                          "(see its options.outputs)")
        path = self.settings.results_dir / task.task_id / artifact.file_name
        with self.limits.stream_slot(user, "another download"):
            try:
                f = open(path, "rb")
            except FileNotFoundError:
                raise Refused(grpc.StatusCode.NOT_FOUND,
                              f"the result file of task {task.task_id} is missing on the server") from None
            with f:
                yield tpb.DownloadResultResponse(artifact=artifact)
                while True:
                    chunk = f.read(DOWNLOAD_CHUNK)
                    if not chunk:
                        return
                    yield tpb.DownloadResultResponse(chunk=chunk)
