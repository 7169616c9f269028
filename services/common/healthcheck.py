"""Container health probe: `python -m services.common.healthcheck HOST:PORT [SERVICE]`.

Exits 0 if the server answers SERVING, 1 otherwise. It connects with the
service's own credentials (AUTH, TLS_CA, TLS_CERT, TLS_KEY of its
environment; services/common/auth.py): health is open to every role, but
every port asks for a certificate of the mesh's CA.
"""

from __future__ import annotations

import os
import sys

import grpc
from cellmesh.auth import Credentials, sync_channel
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.auth import MeshAuth


def check(
    address: str, service: str = "", timeout: float = 3.0, credentials: Credentials | None = None
) -> bool:
    if credentials is None:
        auth = MeshAuth.from_env(os.environ)
        credentials = auth.client() if auth is not None else None
    with sync_channel(address, credentials) as channel:
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
