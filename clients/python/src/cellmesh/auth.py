"""Credentials for calling a mesh, in one place: the `cellmesh` command, the
Python client, the services and the tests all open their channels here.

Every port of a mesh speaks TLS and asks for a client certificate signed by
the mesh's CA (gRPC Python servers cannot ask for one without requiring it).
The caller's role is its bearer token's when it sends one (metadata
`authorization: Bearer <token>`), else its certificate's (`OU=<role>`).

`Credentials.from_env()` reads, for a user: `CELLMESH_CA` (the CA's
certificate), `CELLMESH_CERT` and `CELLMESH_KEY` (a client certificate and
its key) and `CELLMESH_TOKEN` (a token, or `CELLMESH_TOKEN_FILE`, a file
holding it); `cellmesh.meshconfig` gives the same from the file `cellmesh
up` writes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc

__all__ = ["Credentials", "aio_channel", "sync_channel"]

Options = Sequence[tuple[str, Any]]


def _read(path: str | os.PathLike[str] | None) -> bytes | None:
    if not path:
        return None
    return Path(path).expanduser().read_bytes()


class _Bearer(grpc.AuthMetadataPlugin):
    def __init__(self, token: str) -> None:
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        callback(self._metadata, None)


@dataclass(frozen=True)
class Credentials:
    """A mesh's CA and the caller's certificate, key and token (any may be
    missing; the server says what it needs)."""

    ca: bytes
    cert: bytes | None = None
    key: bytes | None = None
    token: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | os.PathLike[str],
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
    ) -> Credentials:
        data = _read(ca)
        assert data is not None
        if token is None and token_file:
            token = Path(token_file).expanduser().read_text().strip() or None
        return cls(data, _read(cert), _read(key), token)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Credentials | None:
        """The user's credentials from `CELLMESH_CA`, `CELLMESH_CERT`,
        `CELLMESH_KEY`, `CELLMESH_TOKEN` (`CELLMESH_TOKEN_FILE`); None when
        `CELLMESH_CA` is not set."""
        env = os.environ if env is None else env
        if not env.get("CELLMESH_CA"):
            return None
        return cls.from_files(
            env["CELLMESH_CA"],
            env.get("CELLMESH_CERT") or None,
            env.get("CELLMESH_KEY") or None,
            env.get("CELLMESH_TOKEN") or None,
            env.get("CELLMESH_TOKEN_FILE") or None,
        )

    def with_token(self, token: str | None) -> Credentials:
        return replace(self, token=token)

    def without_certificate(self) -> Credentials:
        return replace(self, cert=None, key=None)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        tls = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
        if not self.token:
            return tls
        return grpc.composite_channel_credentials(tls, grpc.metadata_call_credentials(_Bearer(self.token)))


def aio_channel(address: str, credentials: Credentials | None, options: Options = ()) -> grpc.aio.Channel:
    """An asyncio channel to `address`: TLS with `credentials`, or plain
    text when they are None (a mesh run with AUTH=off)."""
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    return grpc.aio.secure_channel(address, credentials.channel_credentials(), options=list(options))


def sync_channel(address: str, credentials: Credentials | None, options: Options = ()) -> grpc.Channel:
    """A blocking channel, as `aio_channel`."""
    if credentials is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, credentials.channel_credentials(), options=list(options))
