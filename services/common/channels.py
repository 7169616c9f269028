"""gRPC channels from one service to another."""

from __future__ import annotations

import grpc

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


def insecure_channel(address: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
