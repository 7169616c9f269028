"""Container health probe: `python -m services.common.healthcheck HOST:PORT [SERVICE]`.

Exits 0 if the server answers SERVING, 1 otherwise.
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str = "", timeout: float = 3.0) -> bool:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def main(argv: list[str]) -> int:
    if not argv:
        sys.stderr.write("usage: python -m services.common.healthcheck HOST:PORT [SERVICE]\n")
        return 2
    ok = check(argv[0], argv[1] if len(argv) > 1 else "")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
