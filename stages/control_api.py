"""The control API every worker serves: StageService (status, tasks, stop one task here) and gRPC health.

Health ("" and the StageService) says whether the worker can do its work, not merely that the process runs:
NOT_SERVING until its consumer group first answers, while Triton fails its calls, while the broker cannot be
reached, or when the work loop has not turned for a long time. LIVENESS (mesh/health.py) says only the last: what a
restart could mend. A health thread re-evaluates both twice a second.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from posemesh.mesh.health import LIVENESS
from posemesh.mesh.names import TASK_ID_RE
from posemesh.v1 import stage_service_pb2 as spb
from posemesh.v1 import stage_service_pb2_grpc as spb_grpc

SERVICE = "posemesh.v1.StageService"


class StageServiceServicer(spb_grpc.StageServiceServicer):
    def __init__(self, worker):
        self.worker = worker

    def GetStatus(self, request, context):
        return self.worker.status()

    def ListStageTasks(self, request, context):
        return spb.ListStageTasksResponse(tasks=self.worker.status().tasks)

    def StopTask(self, request, context):
        if not TASK_ID_RE.match(request.task_id):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "not a task id: task ids are 32 lowercase hex characters")
        return spb.StopTaskResponse(was_active=self.worker.stop_task_here(request.task_id))


class ControlApi:
    def __init__(self, worker, port: int):
        self.worker = worker
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        spb_grpc.add_StageServiceServicer_to_server(StageServiceServicer(worker), self.server)
        self.health = health.HealthServicer()
        # grpc's servicer says SERVING for "" until told otherwise: nothing is until the first look at problem().
        self._say(False, "", SERVICE, LIVENESS)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        host = worker.settings.control_host  # 0.0.0.0 under Kubernetes probes
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        self.halt = threading.Event()
        self.serving: bool | None = None
        self.alive: bool | None = None

    def start(self) -> None:
        self.server.start()
        self._update()
        threading.Thread(target=self._watch, name="health", daemon=True).start()

    def _update(self) -> None:
        serving, alive = not self.worker.problem(), not self.worker.stalled()
        if serving != self.serving:
            self._say(serving, "", SERVICE)
            self.serving = serving
        if alive != self.alive:
            self._say(alive, LIVENESS)
            self.alive = alive

    def _say(self, serving: bool, *names: str) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in names:
            self.health.set(name, status)

    def _watch(self) -> None:
        while not self.halt.wait(0.5):
            self._update()

    def stop(self) -> None:
        self.halt.set()
        self._say(False, "", SERVICE, LIVENESS)
        self.server.stop(1)
