"""The TaskService API. Each method: authenticate, validate, act, answer with a precise status code."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import sqlite3
import tempfile
import uuid
from pathlib import Path

import grpc

from posemesh.models import pose_model_names
from posemesh.v1 import task_service_pb2 as tpb
from posemesh.v1 import task_service_pb2_grpc as tpb_grpc
from posemesh import media
from posemesh.gateway import validation
from posemesh.gateway.limits import LimitExceeded
from posemesh.gateway.metrics import UPLOAD_BYTES, UPLOADS
from posemesh.gateway.store import ACTIVE, TERMINAL, now_us, timestamp

log = logging.getLogger("posemesh.gateway")

POSE_MODEL_NAMES = pose_model_names()
MAX_CHUNK = 1024 * 1024
DOWNLOAD_CHUNK = 256 * 1024
MAX_PAGE = 100
# The stored upload's name: never derived from the user's file name (FFmpeg must not guess by it).
UPLOAD_FILE = "upload"
TERMINAL_NAMES = {tpb.TASK_STATE_COMPLETED: "completed", tpb.TASK_STATE_FAILED: "failed",
                  tpb.TASK_STATE_CANCELLED: "cancelled"}


class TaskService(tpb_grpc.TaskServiceServicer):
    def __init__(self, gateway):
        self.gw = gateway
        self.auth = gateway.auth
        self.store = gateway.store
        self.settings = gateway.settings
        self.limits = gateway.limits

    # ------------------------------------------------------------------ helpers

    def _owned_task(self, request, context) -> tuple[str, tpb.Task]:
        user = self.auth.user(context)
        task_id = validation.task_id(request.task_id, context)
        task = self.store.get(task_id, user)
        if task is None:  # someone else's task looks exactly like a missing one
            context.abort(grpc.StatusCode.NOT_FOUND, f"no task {task_id}")
        return user, task

    # ------------------------------------------------------------------ Upload

    def Upload(self, request_iterator, context):
        try:
            response = self._upload(request_iterator, context)
        except Exception:
            code = context.code() if hasattr(context, "code") else None
            UPLOADS.labels(code.name.lower() if code else "error").inc()
            raise
        UPLOADS.labels("accepted").inc()
        UPLOAD_BYTES.inc(response.task.upload_bytes)
        return response

    def _upload(self, request_iterator, context):
        user = self.auth.user(context)
        first = next(request_iterator, None)
        if first is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "empty upload stream: send metadata, then chunks")
        if first.WhichOneof("payload") != "metadata":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "the first upload message must be `metadata` (file name and options), then `chunk`s")
        meta = first.metadata
        options = self._validated_options(meta.options, context)
        key = validation.idempotency_key(meta.idempotency_key, context)
        file_name = validation.display_file_name(meta.file_name)
        previous = self.store.by_idempotency_key(user, key) if key else None
        if previous is not None and previous[0].options != options:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, self._key_reused(key, previous[0], "different options"))
        try:
            with self.limits.stream_slot(user, "another upload"), \
                    (contextlib.nullcontext() if previous else self.limits.upload_slot(user)):
                return self._receive_and_start(user, meta, options, key, file_name, previous, request_iterator, context)
        except LimitExceeded as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))

    def _receive_and_start(self, user, meta, options, key, file_name, previous, request_iterator, context):
        task_id = uuid.uuid4().hex
        job_dir = self.settings.jobs_dir / task_id
        job_dir.mkdir(parents=True)
        created = False
        try:
            path, size, digest = self._receive(request_iterator, job_dir, context)
            if previous is not None:  # a retry of an upload that made a task already
                return self._same_upload(key, previous, digest, context)
            try:
                probed = media.probe(path, media.Limits.from_settings(self.settings))
            except media.NotAVideo as exc:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{validation.shorten(file_name, 60)}: {exc}")
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
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, self._key_reused(key, winner[0], "different options"))
                return self._same_upload(key, winner, digest, context)
            created = True
            try:
                self.gw.start_task(task, path)
            except Exception:
                log.exception("could not start task %s; removing it", task_id)
                self.gw.abandon(task_id)
                created = False
                context.abort(grpc.StatusCode.UNAVAILABLE,
                              "the message broker is unavailable: the upload was not kept and no task was made; "
                              "try again in a moment")
            return tpb.UploadResponse(task=self.store.get(task_id))
        finally:
            if not created:
                shutil.rmtree(job_dir, ignore_errors=True)

    def _same_upload(self, key, previous, digest, context):
        task, previous_digest = previous
        if previous_digest and previous_digest != digest:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, self._key_reused(key, task, "a different file"))
        return tpb.UploadResponse(task=task)

    @staticmethod
    def _key_reused(key: str, task: tpb.Task, what: str) -> str:
        return (f"idempotency key {validation.shorten(key)} was used for task {task.task_id} with {what}: "
                "use a new key for a new upload, or retry with exactly the same file and options")

    def _validated_options(self, options: tpb.TaskOptions, context) -> tpb.TaskOptions:
        if options.pose_model not in tpb.PoseModel.values():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown pose_model {options.pose_model}")
        for kind in options.outputs:
            if kind not in tpb.ArtifactKind.values() or kind == tpb.ARTIFACT_KIND_UNSPECIFIED:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown output kind {kind}")
        if not 0.0 <= options.min_person_score < 1.0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "min_person_score must be in [0, 1)")
        disabled = {m.strip() for m in self.settings.disabled_pose_models.split(",") if m.strip()}
        chosen = POSE_MODEL_NAMES.get(options.pose_model)
        if chosen in disabled:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"pose model {chosen} is not available on this server: its weights are not installed "
                          f"(`posemesh models pull {chosen} --pin` where a network exists). Choose "
                          f"{' or '.join(sorted(set(POSE_MODEL_NAMES.values()) - disabled))}.")
        return options

    def _receive(self, request_iterator, job_dir: Path, context) -> tuple[Path, int, str]:
        """Stream the chunks to disk, enforcing the size limit as they come. Returns path, size, sha256."""
        limit = self.settings.max_upload_bytes
        size = 0
        digest = hashlib.sha256()
        with tempfile.NamedTemporaryFile(dir=job_dir, prefix="upload-", suffix=".partial", delete=False) as out:
            for message in request_iterator:
                if message.WhichOneof("payload") != "chunk":
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "metadata may only be sent once, first")
                if len(message.chunk) > MAX_CHUNK:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"chunk of {len(message.chunk)} bytes: chunks are at most {MAX_CHUNK} bytes")
                size += len(message.chunk)
                if size > limit:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"upload exceeds the limit of {limit} bytes; nothing was kept")
                digest.update(message.chunk)
                out.write(message.chunk)
        if size == 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the upload has no bytes: send the video in `chunk` messages")
        path = job_dir / UPLOAD_FILE
        os.replace(out.name, path)
        return path, size, digest.hexdigest()

    # ------------------------------------------------------------------ reads

    def GetTask(self, request, context):
        _user, task = self._owned_task(request, context)
        return tpb.GetTaskResponse(task=task)

    def ListTasks(self, request, context):
        user = self.auth.user(context)
        if request.page_size < 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
        if request.state not in tpb.TaskState.values():
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown state {request.state}")
        offset = validation.page_offset(request.page_token)
        if offset is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "invalid page_token: pass one from a ListTasks response")
        limit = min(request.page_size or 20, MAX_PAGE)
        tasks, more = self.store.list(user, offset, limit, request.state)
        return tpb.ListTasksResponse(tasks=tasks, next_page_token=validation.page_token(offset + limit) if more else "")

    def WatchTask(self, request, context):
        user, task = self._owned_task(request, context)
        version = -1
        last = None
        while context.is_active():
            task = self.store.get(request.task_id, user)
            if task is None:  # deleted while watched
                context.abort(grpc.StatusCode.NOT_FOUND, f"task {request.task_id} was deleted")
            if task != last:
                yield tpb.WatchTaskResponse(task=task)
                last = task
            if task.state in TERMINAL:
                return
            version = self.store.wait_for_change(version, timeout=1.0)

    # ------------------------------------------------------------------ changes

    def CancelTask(self, request, context):
        _user, task = self._owned_task(request, context)
        if task.state in TERMINAL:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"task {task.task_id} is already {TERMINAL_NAMES[task.state]}; only queued or running "
                          "tasks can be cancelled")
        cancelled = self.gw.cancel(task.task_id, "cancelled by the user")
        return tpb.CancelTaskResponse(task=cancelled or self.store.get(task.task_id))

    def DeleteTask(self, request, context):
        _user, task = self._owned_task(request, context)
        if task.state in ACTIVE:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"task {task.task_id} is still {'queued' if task.state == tpb.TASK_STATE_QUEUED else 'running'}:"
                          " cancel it first")
        self.gw.delete(task.task_id)
        return tpb.DeleteTaskResponse()

    def DownloadResult(self, request, context):
        _user, task = self._owned_task(request, context)
        if request.kind not in tpb.ArtifactKind.values() or request.kind == tpb.ARTIFACT_KIND_UNSPECIFIED:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          "kind is required: ARTIFACT_KIND_ANNOTATED_VIDEO or ARTIFACT_KIND_KEYPOINTS")
        if task.state != tpb.TASK_STATE_COMPLETED:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"task {task.task_id} is {tpb.TaskState.Name(task.state)}: results exist once it is COMPLETED")
        artifact = next((a for a in task.artifacts if a.kind == request.kind), None)
        if artifact is None:
            context.abort(grpc.StatusCode.NOT_FOUND,
                          f"task {task.task_id} did not produce {tpb.ArtifactKind.Name(request.kind)} (see its options.outputs)")
        path = self.settings.results_dir / task.task_id / artifact.file_name
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"the result file of task {task.task_id} is missing on the server")
        with f:
            yield tpb.DownloadResultResponse(artifact=artifact)
            while context.is_active():
                chunk = f.read(DOWNLOAD_CHUNK)
                if not chunk:
                    return
                yield tpb.DownloadResultResponse(chunk=chunk)
