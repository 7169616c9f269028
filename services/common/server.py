"""gRPC server bootstrap shared by every service.

Registers the standard health service and server reflection beside the
service's own servicers, serves TLS with client certificates and checks
every call's role (services/common/auth.py) unless AUTH=off, holds every
request to its RPC's size limit and users to a call rate
(services/common/limits.py), and stops in order: health goes NOT_SERVING, new RPCs
are refused, in-flight RPCs get a grace period to finish.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.auth import MeshAuth
from services.common.limits import MAX_REQUEST_BYTES, Limits

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Registration:
    """One servicer: the generated `add_XServicer_to_server` function, the
    servicer instance and its full service name (for health and reflection)."""

    add: Callable[[Any, grpc.aio.Server], None]
    servicer: object
    service_name: str


class GrpcServer:
    """An asyncio gRPC server with health and reflection."""

    def __init__(
        self,
        registrations: Sequence[Registration],
        host: str = "0.0.0.0",
        port: int = 0,
        grace_seconds: float = 20.0,
        *,
        auth: MeshAuth | None,
        limits: Limits | None = None,
    ) -> None:
        """`auth` None serves plain text with no checks (AUTH=off). Every
        request is held to its RPC's size limit; `limits` adds a call rate
        per user (services/common/limits.py; none by default)."""
        limits = limits or Limits()
        self._registrations = list(registrations)
        self._auth = auth
        self._address = f"{host}:{port}"
        self._grace = grace_seconds
        self._server = grpc.aio.server(
            options=[
                # The largest request any RPC takes; each RPC's own limit is
                # checked per call (services/common/limits.py).
                ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Accept the clients' keepalive pings (services/common/channels.py).
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
            ],
            # Auth first: the limits know who calls.
            interceptors=[*([auth.interceptor()] if auth is not None else []), limits.interceptor()],
        )
        self._health = health.aio.HealthServicer()
        self.port = 0

    @property
    def service_names(self) -> list[str]:
        return [r.service_name for r in self._registrations]

    async def start(self) -> int:
        """Binds and starts; returns the bound port. Health starts NOT_SERVING
        until `set_serving(True)` says the dependencies answer."""
        for r in self._registrations:
            r.add(r.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        names = [
            *self.service_names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, self._server)
        if self._auth is None:
            self.port = self._server.add_insecure_port(self._address)
        else:
            self.port = self._server.add_secure_port(self._address, self._auth.server_credentials())
        if self.port == 0:
            raise RuntimeError(f"cannot bind gRPC server to {self._address}")
        await self._server.start()
        await self.set_serving(False)
        log.info("gRPC serving %s on port %d", ", ".join(self.service_names), self.port)
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set("", status)
        for name in self.service_names:
            await self._health.set(name, status)

    async def stop(self) -> None:
        """NOT_SERVING, then refuse new RPCs and let in-flight ones finish."""
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self._grace)
        log.info("gRPC server stopped")

    async def wait(self) -> None:
        await self._server.wait_for_termination()


def service_server(
    add: Callable[[Any, grpc.aio.Server], None],
    servicer: object,
    file_descriptor: Any,
    service: str,
    settings: dict[str, Any],
) -> GrpcServer:
    """A server for one service of a generated `*_pb2` module (its
    DESCRIPTOR), bound by the common settings GRPC_HOST, GRPC_PORT and
    GRACE_SECONDS, secured by AUTH, TLS_* and AUTH_TOKENS."""
    name = file_descriptor.services_by_name[service].full_name
    return GrpcServer(
        [Registration(add, servicer, name)],
        settings["GRPC_HOST"],
        settings["GRPC_PORT"],
        settings["GRACE_SECONDS"],
        auth=MeshAuth.from_settings(settings),
        limits=Limits.from_settings(settings),
    )


def stop_event_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT (call from inside the running loop)."""
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, event.set)
    return event
