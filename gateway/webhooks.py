"""Completion webhooks: when a task that named a `callback_url` ends (COMPLETED, FAILED or CANCELLED), the
gateway POSTs its outcome there, signed, at least once.

- **Where to**: the URL must match the operator's allow-list POSEMESH_WEBHOOK_TARGETS (`scheme://host:port`
  patterns, http or https; the live sources' allow-list code, gateway/sources.py), else the request is
  INVALID_ARGUMENT naming `callback_url`. The host is resolved when the task is made and again at every
  attempt, and the POST goes to an address checked then (pinned: no second lookup between the check and
  the connection, so a name that rebinds to an inner address is caught). A private, loopback, link-local
  or otherwise non-global address is reached only when a pattern names it as an address
  (`http://10.0.0.*:*`); a name that resolves to one is refused. Redirects are not followed.
- **When**: the task's terminal transition marks the webhook due in the same database write (gateway/store.py
  `update`), so a gateway stopped at any moment leaves it pending, and the next gateway delivers it.
- **What**: JSON {"type": "task.ended", "task_id", "state", "artifacts": [{"kind", "file_name",
  "size_bytes", "sha256"}], "error_message", "finished_at"}, made once at the first attempt (sha256 as
  annotate computed it while writing the file, else computed here, streaming) and stored, so every retry
  sends the same bytes. Header `Posemesh-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
  keyed with the signing secret of the API key that made the task (gateway/auth.py); receivers reject a
  `t` older than 5 minutes (replay window). `Posemesh-Delivery: <task id>` names the delivery: the same on
  every retry, so a receiver can drop what it already has (at least once means it may come twice).
- **Retries**: a 2xx answer delivers; a 4xx other than 408 and 429 gives up at once (and so do a 3xx and an
  address outside the allow-list); anything else (5xx, 408, 429, timeout, connection error, name not
  resolving) is tried again after an exponential back-off (WEBHOOK_BACKOFF_S, doubled each time, at most 10
  minutes, with jitter) until WEBHOOK_RETRY_S after the task ended; then FAILED. Each attempt is recorded
  on the task (`Task.webhook`: attempts, last status and error, when the next is due, delivered_at).
- **Never in the way**: POSTs run on a pool of WEBHOOK_WORKERS threads, each bounded by WEBHOOK_TIMEOUT_S,
  one attempt per task at a time; a slow receiver holds one thread, not the gateway nor other tasks.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import random
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import grpc

from posemesh.gateway.sources import Source, UrlPolicy
from posemesh.gateway.store import PendingWebhook, TaskStore, now_us, timestamp
from posemesh.gateway.validation import Refused
from posemesh.mesh import names
from posemesh.mesh.at_rest import redact
from posemesh.mesh.blobs import BlobStore, blob_sha256
from posemesh.mesh.settings import Settings
from posemesh.v1 import task_service_pb2 as tpb

log = logging.getLogger("posemesh.gateway")

SIGNATURE_HEADER = "Posemesh-Signature"
MAX_BACKOFF_S = 600.0
MAX_ERROR = 300  # characters of an error kept on the task


class WebhookPolicy(UrlPolicy):
    """Callback URLs: http:// or https://, inside POSEMESH_WEBHOOK_TARGETS, at an allowed address."""

    schemes = {"http": 80, "https": 443}
    field = "callback_url"
    setting = "POSEMESH_WEBHOOK_TARGETS"
    denied = grpc.StatusCode.INVALID_ARGUMENT
    example = "https://hooks.example.com:443"

    def wrong_scheme(self, echo: str) -> str:
        return f"callback_url {echo} is not an http:// or https:// URL"

    def outside(self, source: Source) -> str:
        if not self.patterns:
            return "callback_url: this server delivers no webhooks (its operator allows none: POSEMESH_WEBHOOK_TARGETS)"
        return (f"callback_url {source.scheme}://{source.host[:60]}:{source.port} is not allowed: this server's "
                "operator allows webhooks to certain hosts only (POSEMESH_WEBHOOK_TARGETS)")

    def address(self, target: Source) -> str:
        """An address `target`'s host resolves to now that the allow-list accepts: a global address, or one a
        pattern names. Raises Refused (INVALID_ARGUMENT) when it resolves only to others, OSError when it does
        not resolve."""
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
            if ip.is_global or self.allows(target.scheme, str(ip), target.port):
                return address
        raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                      f"callback_url host {target.host[:60]} resolves to {', '.join(addresses)[:80]}, which this "
                      "server may not reach: private, loopback and link-local addresses only where "
                      "POSEMESH_WEBHOOK_TARGETS names them as addresses")

    def check_now(self, url: str) -> Source:
        """`check`, and the host resolves now to an address the server may reach (blocking: DNS)."""
        target = self.check(url)
        try:
            self.address(target)
        except OSError:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT,
                          f"callback_url host {target.host[:60]} does not resolve") from None
        return target


def sign(secret: str, body: bytes, at: int | None = None) -> str:
    """The Posemesh-Signature header's value for `body` sent at `at` (Unix seconds)."""
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def body_of(task: tpb.Task, blobs: BlobStore) -> str:
    """The JSON a task's webhook sends (made once)."""
    artifacts = []
    for a in task.artifacts:
        digest = a.sha256
        if not digest:  # annotate hashes while writing; an older result may lack it: once, streaming
            try:
                digest = blob_sha256(blobs, names.results_prefix(task.task_id) + a.file_name)
            except OSError:
                digest = ""
        artifacts.append({"kind": tpb.ArtifactKind.Name(a.kind).removeprefix("ARTIFACT_KIND_"),
                          "file_name": a.file_name, "size_bytes": a.size_bytes, "sha256": digest})
    return json.dumps({
        "type": "task.ended", "task_id": task.task_id,
        "state": tpb.TaskState.Name(task.state).removeprefix("TASK_STATE_"),
        "artifacts": artifacts, "error_message": task.error_message,
        "finished_at": task.finished_at.ToJsonString() if task.HasField("finished_at") else None,
    }, separators=(",", ":"))


class _Pinned(http.client.HTTPConnection):
    """HTTP to the address that was checked, with the URL's host in the Host header."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.address = address

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedTls(http.client.HTTPSConnection):
    """HTTPS to the address that was checked; the certificate is verified against the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self):
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class Outcome:
    def __init__(self, status: int = 0, error: str = "", retry: bool = True):
        self.status, self.error, self.retry = status, error[:MAX_ERROR], retry

    @property
    def delivered(self) -> bool:
        return 200 <= self.status < 300


class WebhookSender:
    """Delivers due webhooks from the task store: a scheduler thread hands each due one to a thread pool."""

    def __init__(self, settings: Settings, store: TaskStore, policy: WebhookPolicy | None = None,
                 blobs: BlobStore | None = None):
        self.settings, self.store = settings, store
        self.blobs = blobs or settings.blob_store()  # for a result's sha256 that annotate did not give
        self.policy = policy or WebhookPolicy(settings.webhook_targets)
        self.pool = ThreadPoolExecutor(max(1, settings.webhook_workers), thread_name_prefix="webhook")
        self.in_flight: set[str] = set()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.running = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Deliver what is due, from now on: pending deliveries of an earlier gateway included."""
        self.running.set()
        self.store.listeners.append(self._changed)
        self.thread = threading.Thread(target=self._loop, name="webhooks", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop handing out attempts; those under way are abandoned (still due: the next gateway sends them)."""
        self.running.clear()
        self.wake.set()
        if self._changed in self.store.listeners:
            self.store.listeners.remove(self._changed)
        if self.thread:
            self.thread.join(5)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _changed(self, _task_id) -> None:
        self.wake.set()  # a task may have ended: look for due webhooks now

    def _loop(self) -> None:
        while self.running.is_set():
            try:
                for task_id in self.store.webhooks_due(now_us()):
                    with self.lock:
                        if task_id in self.in_flight:
                            continue
                        self.in_flight.add(task_id)
                    self.pool.submit(self._deliver, task_id)
            except Exception:  # the store is closing, or a passing error: look again
                if self.running.is_set():
                    log.exception("webhooks: could not read what is due; retrying")
            try:  # sleep until the soonest attempt is due (or a change wakes us), at most 1 s
                due = self.store.next_webhook_us()
            except Exception:  # noqa: BLE001 - the store is closing (its database's own error)
                due = None
            self.wake.wait(1.0 if due is None else min(1.0, max(0.01, (due - now_us()) / 1e6)))
            self.wake.clear()

    def _deliver(self, task_id: str) -> None:
        try:
            if self.running.is_set():
                self._attempt(task_id)
        except Exception:  # it stays due and is tried again
            if self.running.is_set():
                log.exception("webhook of task %s: attempt failed", task_id)
        finally:
            with self.lock:
                self.in_flight.discard(task_id)
            self.wake.set()

    def _attempt(self, task_id: str) -> None:
        pending = self.store.pending_webhook(task_id)
        if pending is None:
            return
        body = pending.body or body_of(pending.task, self.blobs)
        outcome = self.post(pending, body.encode()) if pending.url else Outcome(
            error="the callback URL was sealed under a key this server no longer has", retry=False)
        if not self.running.is_set():
            return  # the gateway is stopping: it stays due as it was
        delivery = tpb.WebhookDelivery()
        delivery.CopyFrom(pending.task.webhook)
        delivery.attempts += 1
        delivery.last_status = outcome.status
        delivery.ClearField("next_attempt_at")
        now = now_us()
        due = None
        if outcome.delivered:
            delivery.state, delivery.last_error = tpb.WEBHOOK_STATE_DELIVERED, ""
            delivery.delivered_at.CopyFrom(timestamp(now))
        else:
            delivery.last_error = outcome.error
            backoff = min(self.settings.webhook_backoff_s * 2 ** (delivery.attempts - 1), MAX_BACKOFF_S)
            due = now + int(backoff * random.uniform(0.8, 1.2) * 1e6)
            give_up_at = pending.task.finished_at.ToMicroseconds() + int(self.settings.webhook_retry_s * 1e6)
            if not outcome.retry or due > give_up_at:
                if outcome.retry:
                    delivery.last_error = (f"gave up after {delivery.attempts} attempts over "
                                           f"{(now - pending.task.finished_at.ToMicroseconds()) / 1e6:.0f} s: "
                                           f"{outcome.error}")[:MAX_ERROR]
                delivery.state, due = tpb.WEBHOOK_STATE_FAILED, None
            else:
                delivery.next_attempt_at.CopyFrom(timestamp(due))
        self.store.record_webhook(task_id, delivery, due, body)
        log.info("webhook of task %s: attempt %d to %s: %s", task_id, delivery.attempts, delivery.url,
                 tpb.WebhookState.Name(delivery.state) + (f" ({outcome.status or outcome.error})"
                                                          if not outcome.delivered else ""))

    def post(self, pending: PendingWebhook, body: bytes) -> Outcome:
        """One POST; what came of it."""
        try:
            target = self.policy.check(pending.url)  # the allow-list may have changed since the task was made
            address = self.policy.address(target)
        except Refused as exc:
            return Outcome(error=exc.message, retry=False)
        except OSError as exc:
            return Outcome(error=f"{pending.task.webhook.url}: cannot resolve its host ({exc})")
        parts = urlsplit(pending.url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        kind = _PinnedTls if target.scheme == "https" else _Pinned
        connection = kind(target.host, target.port, address, self.settings.webhook_timeout_s)
        headers = {"Content-Type": "application/json", "User-Agent": "posemesh-webhook/1",
                   SIGNATURE_HEADER: sign(pending.secret, body), "Posemesh-Delivery": pending.task.task_id}
        try:
            connection.request("POST", path, body=body, headers=headers)
            response = connection.getresponse()
            response.read(64 * 1024)  # the answer's body is not used; reading a little lets the socket close
            status = response.status
        except TimeoutError:
            return Outcome(error=f"no answer within {self.settings.webhook_timeout_s:g} s")
        except (OSError, http.client.HTTPException) as exc:
            return Outcome(error=f"connection failed: {type(exc).__name__}: {exc}")
        finally:
            connection.close()
        if 200 <= status < 300:
            return Outcome(status)
        if status in (408, 429) or status >= 500:
            return Outcome(status, f"HTTP {status}")
        if 300 <= status < 400:
            return Outcome(status, f"HTTP {status}: redirects are not followed", retry=False)
        return Outcome(status, f"HTTP {status}: the receiver refused it", retry=False)


def shown(url: str) -> str:
    """The callback URL as the task shows it: no credentials."""
    return redact(url)
