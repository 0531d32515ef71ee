"""OpenTelemetry traces (mesh/tracing.py): one trace per run of a task, across the gateway and every stage
worker, each a separate process exporting over OTLP/HTTP to a receiver in this test (a real HTTP server
that decodes the OTLP protobuf the SDK sends), and nothing at all while no endpoint is configured."""

from __future__ import annotations

import gzip
import subprocess
import sys
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from posemesh.devstack.processes import free_port, stop_process
from posemesh.mesh import tracing
from posemesh.mesh.settings import REPO_ROOT
from posemesh.v1 import task_service_pb2 as tpb
from posemesh.v1 import task_service_pb2_grpc as tpb_grpc
from tests.conftest import Workers, auth, make_settings, media, settings_env
from tests.helpers import upload, wait_for, wait_state
from tests.mesh import _healthy

STAGES = ("detect", "pose", "track", "annotate")


class OtlpReceiver:
    """Collects the spans POSTed to /v1/traces: dicts of service, name, ids (hex) and attributes."""

    def __init__(self):
        self.spans: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver.take(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, request) -> None:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), "")
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                        self.spans.append({"service": service, "name": span.name, "trace": span.trace_id.hex(),
                                           "id": span.span_id.hex(), "parent": span.parent_span_id.hex(),
                                           "attributes": attributes})

    def trace_of(self, task_id: str) -> list[dict]:
        with self.lock:
            roots = [s for s in self.spans if s["name"] == "posemesh.task"
                     and s["attributes"].get("posemesh.task_id") == task_id]
            return [s for s in self.spans if roots and s["trace"] == roots[0]["trace"]]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_tracing_is_off_unless_an_endpoint_is_configured(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    assert not tracing.configured() and not tracing.setup("posemesh-test")
    with tracing.task_span("t1") as headers:
        assert headers == [] and tracing.current() is None
    assert tracing.context_of([("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert tracing.configured()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.configured()


@pytest.mark.slow
@pytest.mark.parametrize("ingest", ["gateway", "stage"])
def test_one_trace_covers_a_task_from_decoding_through_every_stage_and_its_triton_calls(broker, triton, tmp_path,
                                                                                       monkeypatch, ingest):
    """`ingest`: who decodes the upload (POSEMESH_INGEST): the gateway, or a replica of the ingest stage, whose
    decoding span joins the task's trace through TaskStarted's context."""
    receiver = OtlpReceiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export every 0.2 s, not every 5 s
    settings = make_settings(broker, tmp_path / "data", triton_url=triton.url,
                             group_prefix=f"trace{time.monotonic_ns()}", ingest=ingest)
    port = free_port()
    gateway = subprocess.Popen([sys.executable, "-m", "posemesh.gateway"], cwd=REPO_ROOT,
                               env={**settings_env(settings), "POSEMESH_GATEWAY_LISTEN": f"127.0.0.1:{port}"},
                               stdout=open(tmp_path / "gateway.log", "ab"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    workers = Workers(settings, tmp_path)
    try:
        for stage in (*STAGES, "ingest") if ingest == "stage" else STAGES:
            workers.start(stage)
        wait_for(lambda: _healthy(f"127.0.0.1:{port}"), 60, 0.1, "the gateway to serve")
        workers.wait_healthy()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = tpb_grpc.TaskServiceStub(channel)
            task = upload(stub, media("mmpose_demo_960x540_5f.mp4"), auth())
            done = wait_state(stub, task.task_id, auth(), {tpb.TASK_STATE_COMPLETED, tpb.TASK_STATE_FAILED}, 240)
        assert done.state == tpb.TASK_STATE_COMPLETED, done.error_message

        def whole() -> list[dict] | None:
            spans = receiver.trace_of(task.task_id)
            names = {s["name"] for s in spans}
            wanted = {"posemesh.task", "posemesh.decode", "posemesh.annotate.finish",
                      *(f"posemesh.{s}" for s in STAGES)}
            return spans if wanted <= names else None

        spans = wait_for(whole, 30, 0.2, "every stage's spans in the task's trace")
        by_id = {s["id"]: s for s in spans}
        root = next(s for s in spans if s["name"] == "posemesh.task")
        assert root["service"] == "posemesh-gateway" and root["parent"] == ""
        frames: dict[str, int] = defaultdict(int)
        for span in spans:
            if span["name"] in {f"posemesh.{s}" for s in STAGES}:
                stage = span["name"].split(".")[1]
                assert span["service"] == f"posemesh-{stage}", span
                assert span["parent"] == root["id"], "a stage's spans hang off the task's root"
                assert span["attributes"]["posemesh.task_id"] == task.task_id
                frames[stage] += span["attributes"]["posemesh.frames"]
        assert frames == dict.fromkeys(STAGES, 5), "every frame in exactly one batch span per stage"
        for model, stage in (("yolox", "detect"), ("blazepose_lite", "pose")):
            calls = [s for s in spans if s["name"] == f"triton {model}"]
            assert calls, f"{stage}'s Triton calls are in the trace"
            assert all(by_id[c["parent"]]["name"] == f"posemesh.{stage}" for c in calls)
        decode = next(s for s in spans if s["name"] == "posemesh.decode")
        decoder = "posemesh-ingest" if ingest == "stage" else "posemesh-gateway"
        assert decode["parent"] == root["id"] and decode["service"] == decoder, decode
    finally:
        workers.stop()
        stop_process(gateway, grace=15)
        receiver.stop()
