"""Which client asks the local broker for what: Kafka requests by client and API, idle and during uploads.

    .venv/bin/python bench/broker_requests.py [--uploads 2] [--idle-s 20]

The local broker's CPU goes by requests, not bytes (broker_cost.py). This starts the broker behind a proxy of
its own (the broker advertises the proxy's port, so every connection of every client goes through it), runs the
local stack against it, and reads each request's header as it passes: API key and client id (a worker's clients
carry its id; "rdkafka" is a client without one: the gateway's admin clients). The proxy also counts the bytes
of the broker's answers per client. Printed: requests a second by client and API, with the stack left idle for
`--idle-s` and then during `--uploads` concurrent uploads of towncentre; and the broker's CPU (ms a frame).

The proxy is Python in this process (not part of the stack's CPU); it adds a little latency to every request,
so frames/s here are not the stack's own.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.measure import idle_between_bursts, process_cpu, run_uploads
from posemesh.client import Client
from posemesh.devstack.broker import broker_command, broker_env
from posemesh.devstack.processes import free_port, stop_process, wait_for_port
from posemesh.devstack.stack import Stack, StackConfig
from posemesh.mesh.settings import default_media_dir

API_NAMES = {0: "Produce", 1: "Fetch", 2: "ListOffsets", 3: "Metadata", 8: "OffsetCommit", 9: "OffsetFetch",
             10: "FindCoordinator", 11: "JoinGroup", 12: "Heartbeat", 13: "LeaveGroup", 14: "SyncGroup",
             15: "DescribeGroups", 18: "ApiVersions", 19: "CreateTopics", 20: "DeleteTopics",
             22: "InitProducerId", 32: "DescribeConfigs", 60: "DescribeCluster", 71: "GetTelemetrySubscriptions"}
ANSWER_BYTES = "answer bytes"  # counted next to the APIs, per client


class RequestCounter:
    """A TCP proxy from `port` to the broker's `broker_port` that counts requests by (client id, API name)."""

    def __init__(self, port: int, broker_port: int):
        self.port, self.broker_port = port, broker_port
        self.counts: Counter = Counter()
        self.lock = threading.Lock()

    def snapshot(self) -> Counter:
        with self.lock:
            return Counter(self.counts)

    def start(self) -> RequestCounter:
        ready = threading.Event()

        async def serve():
            server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
            ready.set()
            async with server:
                await server.serve_forever()

        threading.Thread(target=lambda: asyncio.run(serve()), daemon=True).start()
        ready.wait(10)
        return self

    async def _connection(self, client_r, client_w) -> None:
        try:
            broker_r, broker_w = await asyncio.open_connection("127.0.0.1", self.broker_port)
        except OSError:
            client_w.close()
            return
        conn = {"client": "?"}
        await asyncio.gather(self._requests(client_r, broker_w, conn), self._answers(broker_r, client_w, conn))

    async def _requests(self, reader, writer, conn) -> None:
        """Client to broker: each request is a 4-byte size, then api_key (int16), api_version (int16),
        correlation_id (int32) and client_id (int16 length, then the bytes)."""
        pending = b""
        try:
            while data := await reader.read(1 << 20):
                writer.write(data)
                pending += data
                while len(pending) >= 4 and len(pending) >= 4 + (size := struct.unpack_from(">i", pending)[0]):
                    api, = struct.unpack_from(">h", pending, 4)
                    length, = struct.unpack_from(">h", pending, 12)
                    conn["client"] = pending[14:14 + length].decode(errors="replace") if length > 0 else ""
                    with self.lock:
                        self.counts[(conn["client"], API_NAMES.get(api, str(api)))] += 1
                    pending = pending[4 + size:]
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _answers(self, reader, writer, conn) -> None:
        try:
            while data := await reader.read(1 << 20):
                writer.write(data)
                with self.lock:
                    self.counts[(conn["client"], ANSWER_BYTES)] += len(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


def client_kind(client: str) -> str:
    """A client id without its process's and task's parts: "pose-<host>-<pid>-<id>-pixels" -> "pose pixels"."""
    parts = client.split("-")
    if parts[0] in ("detect", "pose", "track", "annotate", "ingest"):
        return parts[0] + (" " + parts[-1] if parts[-1] == "pixels" else "")
    if client.startswith("gateway-frames"):
        return "gateway frames"
    return client or "(no id)"


def report(title: str, before: Counter, after: Counter, seconds: float, frames: int) -> None:
    change = after - before
    by_client: dict[str, Counter] = {}
    for (client, api), n in change.items():
        by_client.setdefault(client_kind(client), Counter())[api] += n
    print(f"\n{title}: requests a second by client and API" + (", and per frame" if frames else ""))
    print("| client | requests/s | by API (requests/s) | answers kB/s |")
    print("|---|---|---|---|")
    total = 0
    for kind, apis in sorted(by_client.items(), key=lambda kv: -sum(v for a, v in kv[1].items() if a != ANSWER_BYTES)):
        n = sum(v for a, v in apis.items() if a != ANSWER_BYTES)
        total += n
        detail = ", ".join(f"{a} {v / seconds:.1f}" for a, v in apis.most_common() if a != ANSWER_BYTES and v)
        print(f"| {kind} | {n / seconds:.1f} | {detail} | {apis[ANSWER_BYTES] / seconds / 1000:.0f} |")
    print(f"| all | {total / seconds:.1f} | " + (f"{total / frames:.2f} a frame" if frames else "") + " | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--uploads", type=int, default=2)
    parser.add_argument("--idle-s", type=float, default=20.0)
    parser.add_argument("--clip", type=Path, default=default_media_dir() / "towncentre_1080p_302f.mp4")
    args = parser.parse_args()
    proxy_port, broker_port = free_port(), free_port()
    broker = subprocess.Popen(broker_command(broker_port, advertised_port=proxy_port), env=broker_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port("127.0.0.1", broker_port, 15)
        counter = RequestCounter(proxy_port, broker_port).start()
        with tempfile.TemporaryDirectory(prefix="posemesh-bench-requests-") as tmp:
            # The proxy fronts the local broker: the stack keeps the local broker's session timeout.
            stack = Stack(StackConfig(run_dir=Path(tmp) / "stack", kafka=f"127.0.0.1:{proxy_port}",
                                      kafka_session_timeout_ms=2000, rtsp_port=-1)).start()
            try:
                client = Client(stack.gateway_address, "posemesh-dev-key")
                idle_between_bursts()
                before, cpu0, t0 = counter.snapshot(), process_cpu(broker.pid), time.monotonic()
                time.sleep(args.idle_s)
                after, cpu1, t1 = counter.snapshot(), process_cpu(broker.pid), time.monotonic()
                report(f"idle, {args.idle_s:.0f} s (broker {100 * (cpu1 - cpu0) / (t1 - t0):.1f}% of a core)",
                       before, after, t1 - t0, 0)
                idle_between_bursts()
                before, cpu0, t0 = counter.snapshot(), process_cpu(broker.pid), time.monotonic()
                uploads, wall = run_uploads(client, args.clip, args.uploads, "blazepose_lite")
                after, cpu1, t1 = counter.snapshot(), process_cpu(broker.pid), time.monotonic()
                frames = sum(u.frames for u in uploads)
                report(f"{args.uploads} uploads of {args.clip.name}, {frames / wall:.2f} frames/s (broker "
                       f"{1000 * (cpu1 - cpu0) / frames:.1f} ms a frame)", before, after, t1 - t0, frames)
            finally:
                stack.stop()
    finally:
        stop_process(broker)


if __name__ == "__main__":
    main()
