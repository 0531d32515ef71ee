"""Completion webhooks (gateway/webhooks.py) against a real HTTP receiver on a free port and real gateways
on the real broker: signed bodies, retries, giving up, slow receivers, a gateway restart mid-delivery, and
the allow-list (in process, gateway/service.py's validation)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import pytest

from posemesh.devstack.processes import free_port
from posemesh.gateway.auth import webhook_secret
from posemesh.gateway.webhooks import WebhookPolicy
from posemesh.v1 import pipeline_pb2 as pb
from posemesh.v1 import task_service_pb2 as tpb
from tests.conftest import USERS, auth, media
from tests.helpers import wait_for

CLIP = "mmpose_demo_960x540_5f.mp4"
ALICE_SECRET = webhook_secret(USERS["alice"])


def verify(secret: str, header: str, body: bytes, tolerance_s: int = 300) -> bool:
    """The receiver's check, as README "Using the results" shows it."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    t = int(fields["t"])
    expected = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return abs(time.time() - t) <= tolerance_s and hmac.compare_digest(expected, fields["v1"])


class Receiver:
    """A real HTTP server: each POST to a path is answered with the next status of that path's script (the
    last one again once the script is used up), after `slow[path]` seconds."""

    def __init__(self, port: int = 0):
        self.got: dict[str, list[tuple[float, dict, bytes]]] = {}
        self.script: dict[str, list[int]] = {}
        self.slow: dict[str, float] = {}
        self.released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                path = self.path
                seen = receiver.got.setdefault(path, [])
                seen.append((time.monotonic(), dict(self.headers), body))
                receiver.released.wait(receiver.slow.get(path, 0))
                statuses = receiver.script.get(path, [200])
                self.send_response(statuses[min(len(seen), len(statuses)) - 1])
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def webhook_gateway(gateway_factory, data_dir=None, **overrides):
    settings = dict(webhook_targets="http://127.0.0.1:*", webhook_backoff_s=0.2, webhook_retry_s=30.0,
                    reserved_tasks=0)
    return gateway_factory(data_dir, **{**settings, **overrides})


def upload(gw, callback_url: str) -> tpb.Task:
    path = media(CLIP)

    def requests():
        yield tpb.UploadRequest(metadata=tpb.UploadMetadata(file_name=path.name, callback_url=callback_url))
        yield tpb.UploadRequest(chunk=path.read_bytes())
    return gw.stub.Upload(requests(), metadata=auth()).task


def webhook_of(gw, task_id: str) -> tpb.WebhookDelivery:
    return gw.stub.GetTask(tpb.GetTaskRequest(task_id=task_id), metadata=auth()).task.webhook


def settled(gw, task_id: str, timeout: float = 30.0) -> tpb.WebhookDelivery:
    return wait_for(lambda: (w := webhook_of(gw, task_id)).state in (tpb.WEBHOOK_STATE_DELIVERED,
                                                                     tpb.WEBHOOK_STATE_FAILED) and w,
                    timeout, 0.1, "the webhook to be delivered or given up")


def test_a_completed_task_posts_its_outcome_signed(gateway_factory, receiver):
    gw = webhook_gateway(gateway_factory)
    task = upload(gw, receiver.url("/hook?token=s3cret"))
    assert task.webhook.url == receiver.url("/hook?token=***")  # no query secret shown back
    assert task.webhook.state == tpb.WEBHOOK_STATE_UNSPECIFIED  # not ended yet
    # The task's results as annotate reports them (no sha256: the gateway computes it, streaming).
    folder = gw.settings.results_dir / task.task_id
    folder.mkdir(parents=True)
    (folder / "keypoints.jsonl").write_bytes(b'{"index": 0, "persons": []}\n' * 1000)
    (folder / "annotated.mp4").write_bytes(b"\0mp4" * 50_000)
    gw.gateway.lifecycle.complete(pb.TaskResult(task_id=task.task_id, frames_written=5, artifacts=[
        tpb.Artifact(kind=tpb.ARTIFACT_KIND_ANNOTATED_VIDEO, file_name="annotated.mp4", size_bytes=200_000),
        tpb.Artifact(kind=tpb.ARTIFACT_KIND_KEYPOINTS, file_name="keypoints.jsonl", size_bytes=28_000)]))
    delivery = settled(gw, task.task_id)
    assert (delivery.state, delivery.attempts, delivery.last_status) == (tpb.WEBHOOK_STATE_DELIVERED, 1, 200)
    assert delivery.HasField("delivered_at") and not delivery.last_error
    [(_, headers, body)] = receiver.got["/hook?token=s3cret"]
    assert verify(ALICE_SECRET, headers["Posemesh-Signature"], body)
    assert not verify(ALICE_SECRET, headers["Posemesh-Signature"], body.replace(b"COMPLETED", b"FAILED"))
    assert not verify(webhook_secret(USERS["bob"]), headers["Posemesh-Signature"], body)
    assert headers["Posemesh-Delivery"] == task.task_id
    sent = json.loads(body)
    done = gw.stub.GetTask(tpb.GetTaskRequest(task_id=task.task_id), metadata=auth()).task
    assert sent == {
        "type": "task.ended", "task_id": task.task_id, "state": "COMPLETED", "error_message": "",
        "finished_at": done.finished_at.ToJsonString(),
        "artifacts": [{"kind": "ANNOTATED_VIDEO", "file_name": "annotated.mp4", "size_bytes": 200_000,
                       "sha256": hashlib.sha256((folder / "annotated.mp4").read_bytes()).hexdigest()},
                      {"kind": "KEYPOINTS", "file_name": "keypoints.jsonl", "size_bytes": 28_000,
                       "sha256": hashlib.sha256((folder / "keypoints.jsonl").read_bytes()).hexdigest()}]}


def test_retried_after_500s_until_delivered_and_4xx_gives_up_at_once(gateway_factory, receiver):
    gw = webhook_gateway(gateway_factory)
    receiver.script["/flaky"] = [500, 500, 200]
    receiver.script["/gone"] = [404]
    flaky, gone = upload(gw, receiver.url("/flaky")), upload(gw, receiver.url("/gone"))
    for task in (flaky, gone):
        gw.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth())
    delivery = settled(gw, flaky.task_id)
    assert (delivery.state, delivery.attempts, delivery.last_status) == (tpb.WEBHOOK_STATE_DELIVERED, 3, 200)
    sent = receiver.got["/flaky"]
    assert len(sent) == 3 and len({body for _t, _h, body in sent}) == 1, "every retry sends the same body"
    gaps = [sent[1][0] - sent[0][0], sent[2][0] - sent[1][0]]
    assert 0.15 < gaps[0] < gaps[1] < 1.0, f"backed off 0.2 s, then 0.4 s (+-20%): {gaps}"
    assert json.loads(sent[0][2])["state"] == "CANCELLED"
    assert json.loads(sent[0][2])["error_message"] == "cancelled by the user"
    refused = settled(gw, gone.task_id)
    assert (refused.state, refused.attempts, refused.last_status) == (tpb.WEBHOOK_STATE_FAILED, 1, 404)
    assert "refused" in refused.last_error
    time.sleep(1.0)
    assert len(receiver.got["/gone"]) == 1, "a 404 is not tried again"


def test_given_up_after_the_retry_time_and_recorded_on_the_task(gateway_factory, receiver):
    gw = webhook_gateway(gateway_factory, webhook_retry_s=2.0)
    receiver.script["/down"] = [503]
    task = upload(gw, receiver.url("/down"))
    gw.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth())
    pending = wait_for(lambda: (w := webhook_of(gw, task.task_id)).attempts >= 1 and w, 10, 0.05, "an attempt")
    assert pending.state == tpb.WEBHOOK_STATE_PENDING and pending.HasField("next_attempt_at")
    delivery = settled(gw, task.task_id)
    assert (delivery.state, delivery.last_status) == (tpb.WEBHOOK_STATE_FAILED, 503)
    assert delivery.last_error.startswith(f"gave up after {delivery.attempts} attempts")
    assert "HTTP 503" in delivery.last_error
    assert delivery.attempts == len(receiver.got["/down"]) >= 3  # backed off: 0.2, 0.4, 0.8, ... within 2 s
    ended = gw.stub.GetTask(tpb.GetTaskRequest(task_id=task.task_id), metadata=auth()).task.finished_at
    assert receiver.got["/down"][-1][0] - receiver.got["/down"][0][0] <= 2.5
    assert ended.ToMicroseconds() > 0


def test_a_slow_receiver_does_not_delay_another_tasks_delivery(gateway_factory, receiver):
    gw = webhook_gateway(gateway_factory, webhook_timeout_s=40.0)
    receiver.slow["/slow"] = 30.0
    slow, quick = upload(gw, receiver.url("/slow")), upload(gw, receiver.url("/quick"))
    gw.stub.CancelTask(tpb.CancelTaskRequest(task_id=slow.task_id), metadata=auth())
    wait_for(lambda: receiver.got.get("/slow"), 10, 0.05, "the slow receiver to be called")
    started = time.monotonic()
    gw.stub.CancelTask(tpb.CancelTaskRequest(task_id=quick.task_id), metadata=auth())
    assert settled(gw, quick.task_id, timeout=10).state == tpb.WEBHOOK_STATE_DELIVERED
    took = time.monotonic() - started
    assert took < 3.0, f"the quick receiver's webhook took {took:.1f} s"
    assert webhook_of(gw, slow.task_id).state == tpb.WEBHOOK_STATE_PENDING  # still waiting on its answer
    print(f"delivered to the quick receiver {took:.2f} s after its task ended, the slow one still answering")


def test_a_pending_delivery_survives_a_gateway_restart(gateway_factory, tmp_path):
    port = free_port()  # nothing listens there yet: connection refused, tried again later
    data = tmp_path / "restart"
    first = webhook_gateway(gateway_factory, data, webhook_backoff_s=1.0)
    task = upload(first, f"http://127.0.0.1:{port}/later")
    first.stub.CancelTask(tpb.CancelTaskRequest(task_id=task.task_id), metadata=auth())
    failed = wait_for(lambda: (w := webhook_of(first, task.task_id)).attempts >= 1 and w, 10, 0.05, "an attempt")
    assert failed.state == tpb.WEBHOOK_STATE_PENDING and failed.last_status == 0
    assert "connection failed" in failed.last_error
    first.stop()
    receiver = Receiver(port)
    try:
        second = webhook_gateway(gateway_factory, data)
        delivery = settled(second, task.task_id)
        assert delivery.state == tpb.WEBHOOK_STATE_DELIVERED and delivery.attempts >= 2
        [(_, headers, body)] = receiver.got["/later"]
        assert verify(ALICE_SECRET, headers["Posemesh-Signature"], body)
        assert json.loads(body)["task_id"] == task.task_id
    finally:
        receiver.close()


# ---------------------------------------------------------------------- the allow-list (in process)

@pytest.mark.parametrize("url, says", [
    ("http://203.0.113.7:8080/hook", "not allowed"),  # a host outside the list
    ("ftp://127.0.0.1/hook", "not an http:// or https:// URL"),
    ("file:///etc/passwd", "not an http:// or https:// URL"),
    ("http://localhost:9/hook", "resolves to"),  # allowed by name, but to a loopback address no pattern names
    ("http://no-such-host.invalid:80/hook", "does not resolve"),
])
def test_a_callback_url_outside_the_allow_list_is_invalid_argument(api_factory, url, says):
    api = api_factory(webhook_targets="http://localhost:*,http://*.invalid:*")

    def requests():
        yield tpb.UploadRequest(metadata=tpb.UploadMetadata(file_name="clip.mp4", callback_url=url))
        yield tpb.UploadRequest(chunk=b"x")
    with pytest.raises(grpc.RpcError) as err:
        api.stub.Upload(requests(), metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "callback_url" in err.value.details() and says in err.value.details(), err.value.details()
    assert not api.store.list("alice", 0, 10)[0], "nothing was made"


def test_no_webhooks_unless_the_operator_allows_some(api_factory):
    api = api_factory(live_sources="rtsp://127.0.0.1:*")  # the camera is allowed; no webhook target is
    with pytest.raises(grpc.RpcError) as err:
        api.stub.StartLiveTask(tpb.StartLiveTaskRequest(source=tpb.LiveSource(url="rtsp://127.0.0.1:1/x"),
                                                        callback_url="http://127.0.0.1:1/hook"), metadata=auth())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "callback_url" in err.value.details() and "delivers no webhooks" in err.value.details()


def test_private_addresses_only_where_a_pattern_names_them():
    by_name = WebhookPolicy("http://localhost:*")
    with pytest.raises(Exception, match="resolves to"):  # the name is allowed; where it points is not
        by_name.address(by_name.check("http://localhost:8080/x"))
    by_address = WebhookPolicy("http://localhost:*,http://127.0.0.*:*")
    assert by_address.address(by_address.check("http://localhost:8080/x")) == "127.0.0.1"
    assert by_address.address(by_address.check("http://127.0.0.1:8080/x")) == "127.0.0.1"
    with pytest.raises(ValueError):
        WebhookPolicy("gopher://x:70")
