"""Probe a posemesh process's gRPC health service (gateway or stage worker), for container health checks:

    python -m posemesh.mesh.health HOST:PORT [--service NAME] [--timeout S]   exit 0 when SERVING, 1 otherwise

Kubernetes probes gRPC health natively (deploy/k8s); Docker Compose runs this (deploy/compose.yaml).

Two questions, two answers. The server's own status ("") says whether the process can do its work now (ready):
not while the broker is gone, Triton fails, or a worker's consumer group has not answered yet. LIVENESS says only
whether the process itself still works, so that a restart could help: a gateway whose server runs, a worker whose
loop turns. Kubernetes restarts a container on its liveness probe: asked "", it would restart every worker while
Triton is down and every gateway while the broker is, which mends nothing and adds rebalances."""

from __future__ import annotations

import argparse
import sys

import grpc

LIVENESS = "liveness"  # the health service name that answers "does this process still work?"


def grpc_healthy(address: str, timeout: float = 1.0, service: str = "") -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as ch:
            request = health_pb2.HealthCheckRequest(service=service)
            status = health_pb2_grpc.HealthStub(ch).Check(request, timeout=timeout).status
            return status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posemesh.mesh.health", description=__doc__.splitlines()[0])
    parser.add_argument("address", help="HOST:PORT of the process's gRPC server")
    parser.add_argument("--service", default="", help=f"'' (ready: the default) or {LIVENESS!r} (alive)")
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    healthy = grpc_healthy(args.address, args.timeout, args.service)
    print("SERVING" if healthy else "NOT SERVING")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
