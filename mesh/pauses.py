"""Pauses of a whole process or of its host, said in its log, as Hadoop's JvmPauseMonitor does for a JVM.

A thread sleeps SLEEP_S at a time and warns when it woke more than PAUSE_WARN_S late: nothing of the process
ran meanwhile (the host oversubscribed or swapping, the VM descheduled, the process stopped, or one call that
held Python's GIL). Whatever the process was doing was held up by that long: a live task's lag grows by it, a
heartbeat comes late. Without the line, its log cannot tell a paused process from a slow mesh.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("posemesh.pauses")

SLEEP_S = 1.0  # one wake-up a second: an idle process's cost stays where it was
PAUSE_WARN_S = 1.0


def start() -> threading.Thread:
    """Watch this process for pauses, on a daemon thread of its own."""
    thread = threading.Thread(target=_watch, name="pause-monitor", daemon=True)
    thread.start()
    return thread


def _watch() -> None:
    while True:
        before = time.monotonic()
        time.sleep(SLEEP_S)
        late = time.monotonic() - before - SLEEP_S
        if late > PAUSE_WARN_S:
            log.warning("paused for %.2f s: nothing of this process ran (its host oversubscribed or swapping, "
                        "or a call that held Python's GIL)", late)
