"""GetStats: the mesh at a glance, from what the gateway already hears.

Workers send a heartbeat every second (and within 0.5 s of a change) and report the frames they finish on
posemesh.events (EventReader); the gateway's own frame producers report decoded frames. MeshActivity keeps the
last minute of that, by the events' own send times (a gateway that restarts and reads old events again counts
none of them).
Backlogs come from the task store: the frames the step before has done and a step has not.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

from posemesh.mesh.pipeline import STAGE_NAMES
from posemesh.v1 import task_service_pb2 as tpb

STEPS = ["decode", *STAGE_NAMES]  # what a frame goes through, in order
WINDOW_S = 60.0  # frames per second are averaged over this much of the recent past
ALIVE_S = 5.0  # a worker whose heartbeat is older than this is not counted


class MeshActivity:
    """Who is alive and how many frames each step finished lately; fed from the events reader's thread."""

    def __init__(self, window_s: float = WINDOW_S, alive_s: float = ALIVE_S, clock=time.time):
        self.window_s, self.alive_s, self.clock = window_s, alive_s, clock
        self.lock = threading.Lock()
        self.seen: dict[str, dict[str, float]] = defaultdict(dict)  # step -> worker -> last heartbeat
        self.frames: dict[str, deque[tuple[float, int]]] = defaultdict(deque)  # step -> (at, frames)

    def heartbeat(self, step: str, worker: str, at: float) -> None:
        with self.lock:
            self.seen[step][worker] = max(at, self.seen[step].get(worker, 0.0))

    def finished(self, step: str, frames: int, at: float) -> None:
        oldest = self.clock() - self.window_s
        if frames <= 0 or at < oldest:
            return
        with self.lock:  # bounded by the window even if nobody asks for the stats
            done = self.frames[step]
            done.append((at, frames))
            while done and done[0][0] < oldest:
                done.popleft()

    def snapshot(self, now: float | None = None) -> dict[str, tuple[int, float]]:
        """{step: (workers alive, frames per second over the window)}."""
        now = self.clock() if now is None else now
        out = {}
        with self.lock:
            for step in STEPS:
                done = self.frames[step]
                while done and done[0][0] < now - self.window_s:
                    done.popleft()
                alive = sum(1 for at in self.seen[step].values() if at >= now - self.alive_s)
                out[step] = (alive, sum(n for _at, n in done) / self.window_s)
        return out


def stats_response(activity: MeshActivity, store, user: str | None, now: float | None = None) -> tpb.GetStatsResponse:
    """The caller's task counts (everyone's when `user` is None: an admin) and every step's figures."""
    now = time.time() if now is None else now
    response = tpb.GetStatsResponse(window_s=activity.window_s)
    response.at.FromMicroseconds(int(now * 1e6))
    for who, states in sorted(store.task_counts(user).items()):
        response.tasks.add(user=who, queued=states.get(tpb.TASK_STATE_QUEUED, 0),
                           running=states.get(tpb.TASK_STATE_RUNNING, 0),
                           completed=states.get(tpb.TASK_STATE_COMPLETED, 0),
                           failed=states.get(tpb.TASK_STATE_FAILED, 0),
                           cancelled=states.get(tpb.TASK_STATE_CANCELLED, 0))
    waiting = store.frames_waiting(STEPS)
    for step, (alive, fps) in activity.snapshot(now).items():
        response.stages.add(stage=step, workers_alive=alive, frames_per_second=round(fps, 3),
                            frames_waiting=waiting.get(step, 0))
    return response
