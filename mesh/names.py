"""Names that cross process boundaries, defined once: task ids, and where a task's files live under the
data directory (the gateway writes the upload and serves the results; annotate reads the upload's audio and
writes the results)."""

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


def new_task_id() -> str:
    """Milliseconds since the epoch, then 80 random bits. Ids (and so topic names) sort by creation time,
    which keeps the consumer groups' round-robin assignment of older tasks where it was when a new task
    starts."""
    return f"{int(time.time() * 1000):012x}{secrets.token_hex(10)}"


def upload_path(jobs_dir: Path, task_id: str) -> Path:
    return jobs_dir / task_id / UPLOAD_FILE


def partial_results_dir(results_dir: Path, task_id: str, epoch: int) -> Path:
    """Where a task's results grow while it runs (one folder per run of the task), before annotate publishes
    them as results/<task>/."""
    return results_dir / f".partial-{task_id}-e{epoch}"


def partial_results_dirs(results_dir: Path, task_id: str) -> list[Path]:
    """Every run's partial folder of a task (what a crashed annotate worker may have left)."""
    return list(results_dir.glob(f".partial-{task_id}-e*"))
