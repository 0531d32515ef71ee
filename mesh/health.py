"""Probe a posemesh process's gRPC health service (gateway or stage worker), for container health checks:

    python -m posemesh.mesh.health HOST:PORT [--timeout S]     exit 0 when SERVING, 1 otherwise

Kubernetes probes gRPC health natively (deploy/k8s); Docker Compose runs this (deploy/compose.yaml)."""

from __future__ import annotations

import argparse
import sys

import grpc


def grpc_healthy(address: str, timeout: float = 1.0) -> bool:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(address) as ch:
            status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status
            return status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posemesh.mesh.health", description=__doc__.splitlines()[0])
    parser.add_argument("address", help="HOST:PORT of the process's gRPC server")
    parser.add_argument("--timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    healthy = grpc_healthy(args.address, args.timeout)
    print("SERVING" if healthy else "NOT SERVING")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
