"""The TaskService API (grpc.aio). Each method: validate, act, answer with a precise code.

What every method shares runs around it as interceptors (gateway/interceptors.py): the caller is
authenticated before the method runs (the method reads the user with `auth.caller()`), streaming calls
hold one of the caller's stream slots, and a method refuses by raising `Refused` or `LimitExceeded`,
which become the call's status; anything else becomes INTERNAL without a server path or a traceback.

Streams (Upload, WatchTask, WatchFrames, DownloadResult) are coroutines on one event loop, not a thread
each, so one user's open streams cannot starve everyone else; per-user limits (gateway/limits.py) bound
what one user may hold. The loop never waits on the database or the broker: the task store (SQLite,
behind a lock the event reader and the sweep share) is reached only through threads of its own
(gateway/blocking.py), and probing a video or camera, starting, cancelling and deleting tasks run in the
default executor, so the loop always answers. Only small file operations stay on it (writing an upload's
chunks, reading a result's, removing a refused upload).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import grpc

from posemesh.gateway import validation
from posemesh.gateway.auth import bearer_key, caller, webhook_secret
from posemesh.gateway.blocking import AsyncTaskStore, run_to_the_end
from posemesh.gateway.interceptors import for_task_service
from posemesh.gateway.lifecycle import new_stream_token
from posemesh.gateway.sql import Conflict
from posemesh.gateway.stats import stats_response
from posemesh.gateway.store import ACTIVE, TERMINAL, now_us, timestamp
from posemesh.gateway.validation import Refused
from posemesh.gateway.webhooks import WebhookPolicy, shown
from posemesh.mesh import given_boxes, media, names
from posemesh.mesh.live import probe_source
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


class UploadPace:
    """An upload's messages, each awaited only as long as the upload keeps its minimum pace: after `grace_s`,
    `min_bytes_per_s` on average since the first message was awaited. A client that stalls or trickles
    (one byte a second) would otherwise hold one of its user's task slots for as long as it likes."""

    def __init__(self, messages, min_bytes_per_s: int, grace_s: float):
        self.messages, self.min_bytes_per_s, self.grace_s = messages, min_bytes_per_s, grace_s
        self.started = time.monotonic()
        self.received = 0

    def __aiter__(self):
        return self

    async def __anext__(self) -> tpb.UploadRequest:
        due = self.started + self.grace_s + self.received / self.min_bytes_per_s if self.min_bytes_per_s else None
        try:
            if due is None:
                message = await self.messages.__anext__()
            else:
                message = await asyncio.wait_for(self.messages.__anext__(), max(0.0, due - time.monotonic()))
        except TimeoutError:
            took = time.monotonic() - self.started
            raise Refused(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"the upload sent {self.received} bytes in {took:.0f} s; this server needs at least "
                          f"{self.min_bytes_per_s} bytes a second after the first {self.grace_s:.0f} s: nothing was "
                          "kept, send it again over a faster link") from None
        self.received += len(message.chunk)
        return message


class TaskService(tpb_grpc.TaskServiceServicer):
    @staticmethod
    def interceptors(gateway) -> list[grpc.aio.ServerInterceptor]:
        """What the server must run around this service's calls (auth, limits, statuses), outermost first."""
        return for_task_service(gateway.auth, gateway.limits)

    def __init__(self, gateway):
        self.gw = gateway
        self.store = gateway.store  # blocking: only from threads (_create_and_start ...)
        self.tasks = AsyncTaskStore(gateway.store)  # the same store, for coroutines
        self.settings = gateway.settings
        self.limits = gateway.limits
        self.changes = gateway.changes
        # Probing decodes: at most this many at once, whoever uploads.
        self.probes = asyncio.Semaphore(2)
        self.webhook_policy = WebhookPolicy(self.settings.webhook_targets)

    # ------------------------------------------------------------------ helpers

    async def _owned_task(self, request) -> tuple[str, tpb.Task]:
        user = caller()
        task_id = validation.task_id(request.task_id)
        task = await self.tasks.get(task_id, user)
        if task is None:  # someone else's task looks exactly like a missing one
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no task {task_id}")
        return user, task

    async def _webhook(self, url: str, context) -> tuple[str, str] | None:
        """A request's callback_url, checked (allow-list, and where its host resolves now), with the signing
        secret of the caller's API key; None when it names none."""
        if not url:
            return None
        await asyncio.to_thread(self.webhook_policy.check_now, url)
        key, _ = bearer_key(context.invocation_metadata())  # the authentication interceptor accepted it
        return url, webhook_secret(key)

    # ------------------------------------------------------------------ Upload

    async def Upload(self, request_iterator, context) -> tpb.UploadResponse:
        user = caller()
        if not self.gw.broker_available():
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the message broker is unavailable, so no task can start: "
                                                       "try again in a moment (nothing was kept)")
        messages = UploadPace(request_iterator.__aiter__(), self.settings.upload_min_bytes_per_s,
                              self.settings.upload_grace_s)
        try:
            first = await messages.__anext__()
        except StopAsyncIteration:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "empty upload stream: send metadata, then chunks") from None
        if first.WhichOneof("payload") != "metadata":
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          "the first upload message must be `metadata` (file name and options), then `chunk`s")
        meta = first.metadata
        options = self._validated_options(meta.options)
        # Kept with the upload, in frame order (the summary's hash does not depend on the order sent); the task
        # records their summary.
        given = sorted((tpb.FrameBoxes(frame_index=f.frame_index, boxes=f.boxes) for f in options.given_boxes),
                       key=lambda f: f.frame_index)
        given_blob = given_boxes.encode(given) if given else b""
        if given:
            options.boxes_given.CopyFrom(given_boxes.summary(given, given_blob))
            options.ClearField("given_boxes")
        webhook = await self._webhook(meta.callback_url, context)
        key = validation.idempotency_key(meta.idempotency_key)
        file_name = validation.display_file_name(meta.file_name)
        previous = await self.tasks.by_idempotency_key(user, key) if key else None
        if previous is not None and previous[0].options != options:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, self._key_reused(key, previous[0], "different options"))
        if previous is not None:  # a retry of an upload that made a task already: it needs no new slot
            return await self._receive_and_start(user, options, key, file_name, previous, messages, webhook)
        async with self.limits.task_slot(user):
            return await self._receive_and_start(user, options, key, file_name, None, messages, webhook, given_blob)

    async def _receive_and_start(self, user, options, key, file_name, previous, messages,
                                 webhook=None, given_blob: bytes = b"") -> tpb.UploadResponse:
        task_id = self.gw.reservations.take() or names.new_task_id()
        job_dir = self.settings.jobs_dir / task_id
        handed_over = False  # once true, _create_and_start makes the task or cleans up, whatever happens here
        try:
            job_dir.mkdir(parents=True)
            path, size, digest = await self._receive(messages, job_dir)
            if previous is not None:
                return self._same_upload(key, previous, digest)
            if given_blob:  # next to the upload: both go to the blob store as the task starts (TaskLifecycle)
                await asyncio.to_thread((job_dir / names.GIVEN_BOXES_FILE).write_bytes, given_blob)
            async with self.probes:
                try:
                    probed = await asyncio.to_thread(media.probe, path, media.Limits.from_settings(self.settings))
                except media.NotAVideo as exc:
                    raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"{validation.shorten(file_name, 60)}: {exc}") from None
            task = tpb.Task(task_id=task_id, state=tpb.TASK_STATE_QUEUED, file_name=file_name, options=options,
                            video=probed.video, created_at=timestamp(now_us()), upload_bytes=size,
                            warnings=probed.warnings)
            if webhook:
                task.webhook.url = shown(webhook[0])
            handed_over = True
            made, winner = await run_to_the_end(self._create_and_start, task, user, key, digest, path, webhook)
            if winner is None:
                return tpb.UploadResponse(task=made)
            # A concurrent upload with the same idempotency key won the race.
            if winner[0].options != options:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                              self._key_reused(key, winner[0], "different options"))
            return self._same_upload(key, winner, digest)
        finally:
            if not handed_over:
                self._discard(task_id, job_dir)

    def _create_and_start(self, task: tpb.Task, user: str, key: str, digest: str, path: Path, webhook=None):
        """In a thread (the task store, Kafka): make the task and start it. Returns (the task, None), or (None, (task,
        sha256)) when a concurrent upload with the same idempotency key made its task first. Whatever fails,
        nothing of this upload is left behind."""
        task_id = task.task_id
        try:
            self.store.create(task, user, key, digest, webhook, owner=self.gw.id)
        except Conflict:
            self._discard(task_id, path.parent)
            winner = self.store.by_idempotency_key(user, key) if key else None
            if winner is None:
                raise
            return None, winner
        except BaseException:
            self._discard(task_id, path.parent)
            raise
        try:
            self.gw.start_task(task, path)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the task is removed and the client told
            log.warning("could not start task %s (%s); removing it", task_id, exc)
            self.gw.abandon(task_id)
            self._discard(task_id, path.parent)
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          "the message broker is unavailable: the upload was not kept and no task was made; "
                          "try again in a moment") from None
        return self.store.get(task_id), None

    def _discard(self, task_id: str, job_dir: Path) -> None:
        """No task was made: the upload goes, and the id stays reserved."""
        shutil.rmtree(job_dir, ignore_errors=True)
        self.gw.reservations.give_back(task_id)

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
        seen: set[int] = set()
        for kind in options.outputs:  # each kind once: every GetTask carries the list back
            if kind not in tpb.ArtifactKind.values() or kind == tpb.ARTIFACT_KIND_UNSPECIFIED:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"options.outputs: unknown output kind {kind}")
            if kind in seen:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"options.outputs names {tpb.ArtifactKind.Name(kind)} "
                              "more than once: name each kind at most once")
            seen.add(kind)
        if not 0.0 <= options.min_person_score < 1.0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "min_person_score must be in [0, 1)")
        options.ClearField("boxes_given")  # the server's to set
        problem = validation.given_boxes_problem(options.given_boxes)
        if problem:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"options.{problem}")
        problem = validation.region_problem([(p.x, p.y) for p in options.region_of_interest])
        if problem:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"options.region_of_interest: {problem}")
        if options.max_persons > validation.MAX_PERSONS:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"options.max_persons must be at most {validation.MAX_PERSONS} (0: no limit)")
        if not (math.isfinite(options.sample_fps) and 0.0 <= options.sample_fps <= self.settings.max_fps):
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"options.sample_fps must be between 0 (every frame) and {self.settings.max_fps:g} frames "
                          "per second")
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

    async def GetTask(self, request, context):
        _user, task = await self._owned_task(request)
        return tpb.GetTaskResponse(task=task)

    async def ListTasks(self, request, context):
        user = caller()
        if request.page_size < 0:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
        if request.state not in tpb.TaskState.values():
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unknown state {request.state}")
        offset = validation.page_offset(request.page_token)
        if offset is None:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "invalid page_token: pass one from a ListTasks response")
        limit = min(request.page_size or 20, MAX_PAGE)
        tasks, more = await self.tasks.list(user, offset, limit, request.state)
        return tpb.ListTasksResponse(tasks=tasks, next_page_token=validation.page_token(offset + limit) if more else "")

    async def GetStats(self, request, context):
        user = caller()
        admins = {name.strip() for name in self.settings.admin_users.split(",") if name.strip()}
        if not self.settings.ingest_stage():  # the gateway decodes: it is alive (else ingest replicas are counted)
            self.gw.activity.heartbeat("decode", "this gateway", time.time())
        return await asyncio.to_thread(stats_response, self.gw.activity, self.store,
                                       None if user in admins else user)

    async def WatchTask(self, request, context):
        user, task = await self._owned_task(request)
        last = None
        with self.changes.subscribe(task.task_id) as changes:
            while True:
                task = await self.tasks.get(request.task_id, user)
                if task is None:  # deleted while watched
                    raise Refused(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} was deleted")
                if task != last:
                    yield tpb.WatchTaskResponse(task=task)
                    last = task
                if task.state in TERMINAL:
                    return
                await changes.wait(WATCH_POLL_S)

    async def WatchFrames(self, request, context):
        user, task = await self._owned_task(request)
        if task.state in TERMINAL:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"task {task.task_id} is {TERMINAL_NAMES[task.state]}: there are no more frames to watch")
        viewer = await self.gw.views.join(task.task_id)
        try:
            while True:
                try:
                    frame = await asyncio.wait_for(viewer.queue.get(), WATCH_POLL_S)
                except TimeoutError:
                    current = await self.tasks.get(task.task_id, user)
                    if current is None or current.state in TERMINAL:
                        return  # the task ended, and its last frames have been sent
                    continue
                yield tpb.WatchFramesResponse(frame=frame, dropped=viewer.dropped)
        finally:
            await self.gw.views.leave(task.task_id, viewer)

    async def StartLiveTask(self, request, context):
        user = caller()
        if not self.gw.broker_available():
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the message broker is unavailable, so no task can start: "
                                                       "try again in a moment")
        source = self.gw.source_policy.check(request.source.url)
        if request.source.transport not in tpb.RtspTransport.values():
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"unknown source.transport {request.source.transport}")
        if not 0 <= request.max_lag_s <= 60:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, "max_lag_s must be between 0 (the server's default) and 60")
        if request.options.given_boxes:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          "options.given_boxes applies to uploads: a live task's frames are not known ahead, so its "
                          "persons are detected")
        options = self._validated_options(request.options)
        if options.sample_fps:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          "options.sample_fps applies to uploads: a live task analyses the frames it can keep "
                          "within max_lag_s")
        webhook = await self._webhook(request.callback_url, context)
        name = validation.display_file_name(request.name) if request.name else source.shown[:255]
        async with self.limits.task_slot(user):
            try:
                video = await asyncio.to_thread(probe_source, source, request.source.transport, 10.0)
            except ValueError as exc:
                raise Refused(grpc.StatusCode.UNAVAILABLE, f"{source.shown[:200]}: {exc}; try again once it streams",
                              trailers=((validation.UNAVAILABLE_TRAILER, "source"),)) from None
            try:
                media.Limits.from_settings(self.settings).check_size(video.width, video.height)
            except media.NotAVideo as exc:
                raise Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{source.shown[:200]}: {exc}") from None
            task_id = self.gw.reservations.take() or names.new_task_id()
            live = tpb.LiveStatus(source=source.shown, max_lag_s=request.max_lag_s or self.settings.live_max_lag_s)
            task = tpb.Task(task_id=task_id, state=tpb.TASK_STATE_QUEUED, file_name=name, options=options, video=video,
                            created_at=timestamp(now_us()), live=live)
            if webhook:
                task.webhook.url = shown(webhook[0])
            if self.settings.live_publish_url:  # the stream's secret, in its URL path (gateway/lifecycle.py)
                task.stream_token = new_stream_token()
                task.stream_url = self.gw.stream_url(task)
            task = await run_to_the_end(self._create_and_start_live, task, user, source, request.source.transport,
                                        webhook)
        return tpb.StartLiveTaskResponse(task=task)

    def _create_and_start_live(self, task: tpb.Task, user: str, source, transport: int, webhook=None) -> tpb.Task:
        """In a thread (the task store, Kafka): make the live task and start reading its camera."""
        task_id = task.task_id
        try:
            self.store.create(task, user, None, webhook=webhook, owner=self.gw.id)
        except BaseException:
            self.gw.reservations.give_back(task_id)
            raise
        try:
            self.gw.start_live_task(task, source, transport)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the task is removed and the client told
            log.warning("could not start live task %s (%s); removing it", task_id, exc)
            self.gw.abandon(task_id)
            raise Refused(grpc.StatusCode.UNAVAILABLE, "the message broker is unavailable: no task was made; "
                                                       "try again in a moment") from None
        return self.store.get(task_id)

    # ------------------------------------------------------------------ changes

    async def CancelTask(self, request, context):
        _user, task = await self._owned_task(request)
        if task.state in TERMINAL:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"task {task.task_id} is already {TERMINAL_NAMES[task.state]}; only queued or running "
                          "tasks can be cancelled")
        cancelled = await asyncio.to_thread(self.gw.cancel, task.task_id, "cancelled by the user")
        return tpb.CancelTaskResponse(task=cancelled or await self.tasks.get(task.task_id))

    async def DeleteTask(self, request, context):
        _user, task = await self._owned_task(request)
        if task.state in ACTIVE:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"task {task.task_id} is still "
                          f"{'queued' if task.state == tpb.TASK_STATE_QUEUED else 'running'}:"
                          " cancel it first")
        await asyncio.to_thread(self.gw.delete, task.task_id)
        return tpb.DeleteTaskResponse()

    async def DownloadResult(self, request, context):
        _user, task = await self._owned_task(request)
        if request.kind not in tpb.ArtifactKind.values() or request.kind == tpb.ARTIFACT_KIND_UNSPECIFIED:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          "kind is required: one of " + ", ".join(
                              name for name in tpb.ArtifactKind.keys() if name != "ARTIFACT_KIND_UNSPECIFIED"))
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
        # From the blob store, a chunk at a time, each read in a thread: an object store's reads are network
        # calls, and the event loop serves every other call meanwhile.
        chunks = self.gw.blobs.read_chunks(names.results_prefix(task.task_id) + artifact.file_name, DOWNLOAD_CHUNK)
        try:
            first = await asyncio.to_thread(next, chunks, b"")
        except FileNotFoundError:
            raise Refused(grpc.StatusCode.NOT_FOUND,
                          f"the result file of task {task.task_id} is missing on the server") from None
        try:
            yield tpb.DownloadResultResponse(artifact=artifact)
            chunk = first
            while chunk:
                yield tpb.DownloadResultResponse(chunk=chunk)
                chunk = await asyncio.to_thread(next, chunks, b"")
        finally:
            chunks.close()
