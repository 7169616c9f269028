"""gRPC channels from one service to another."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from cellmesh.auth import aio_channel

from services.common.auth import MeshAuth
from services.common.server import MAX_MESSAGE_BYTES

CHANNEL_OPTIONS = [
    # Large plates list many sites with their result files in one reply.
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Keep connections alive through load balancers that drop idle ones
    # (Swarm's virtual IPs do after about 15 minutes).
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
]


def channel(address: str, auth: MeshAuth | None) -> grpc.aio.Channel:
    """A channel to another service, presenting this service's certificate
    (plain text when `auth` is None: AUTH=off)."""
    return aio_channel(address, auth.client() if auth is not None else None, CHANNEL_OPTIONS)


def service_channel(address: str, settings: Mapping[str, Any]) -> grpc.aio.Channel:
    """`channel` with this service's credentials from its loaded settings (COMMON_VARS)."""
    return channel(address, MeshAuth.from_settings(settings))
