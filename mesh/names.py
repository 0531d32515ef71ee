"""Names that cross process boundaries, defined once: task ids, and the blob keys of a task's files
(mesh/blobs.py: the gateway stores the upload and serves the results; annotate reads the upload's audio and
stores the segments and the results). With the default store, a key is a path under the data directory."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path

# A task id: 32 lowercase hex characters (new_task_id). Every API checks ids against it, and per-task topic
# names embed it (posemesh.mesh.kafka).
TASK_ID_PATTERN = "[0-9a-f]{32}"
TASK_ID_RE = re.compile(rf"^{TASK_ID_PATTERN}$")

# A task's upload, as stored: jobs/<task>/upload. Never the client's file name (that is display only).
UPLOAD_FILE = "upload"
# The boxes a client gave with its upload instead of running the detector (posemesh.mesh.given_boxes).
GIVEN_BOXES_FILE = "given_boxes"


def new_task_id() -> str:
    """Milliseconds since the epoch, then 80 random bits. Ids (and so topic names) sort by creation time,
    which keeps the consumer groups' round-robin assignment of older tasks where it was when a new task
    starts."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def upload_path(jobs_dir: Path, task_id: str) -> Path:
    """Where the gateway writes an upload as it arrives (its own disk), before storing it as upload_key."""
    return jobs_dir / task_id / UPLOAD_FILE


def upload_key(task_id: str) -> str:
    return f"jobs/{task_id}/{UPLOAD_FILE}"


def given_boxes_key(task_id: str) -> str:
    return f"jobs/{task_id}/{GIVEN_BOXES_FILE}"


def uploads_prefix(task_id: str) -> str:
    return f"jobs/{task_id}/"


def results_prefix(task_id: str) -> str:
    """The folder of a task's published results: results/<task>/annotated.mp4, ..."""
    return f"results/{task_id}/"


def partial_prefix(task_id: str, epoch: int) -> str:
    """Where a task's result segments gather while it runs (one folder per run of the task), before
    annotate publishes the result under results_prefix."""
    return f"results/.partial-{task_id}-e{epoch}/"


def partials_prefix(task_id: str) -> str:
    """What every run's partial folder of a task starts with (what a crashed annotate worker may have left)."""
    return f"results/.partial-{task_id}-e"
