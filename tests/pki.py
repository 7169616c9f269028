"""The tests' own throw-away CA, a certificate per role and a token per user
role (services/common/pki.py), made once per test process, and the channels
and server credentials built from them."""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import grpc
from cellmesh.auth import Credentials, aio_channel

from services.common import pki
from services.common.auth import MeshAuth
from services.common.channels import CHANNEL_OPTIONS


@functools.cache
def local() -> pki.LocalPki:
    folder = Path(tempfile.mkdtemp(prefix="cellmesh-test-pki-"))
    atexit.register(shutil.rmtree, folder, True)
    return pki.local_mesh(folder / "pki")


def server_auth(role: str = "catalog") -> MeshAuth:
    """A server's credentials and the tokens it knows."""
    auth = MeshAuth.from_env(local().service_env(role))
    assert auth is not None
    return auth


def credentials(role: str = "operator", token: bool = False) -> Credentials:
    return local().credentials(role, token)


def channel(address: str, role: str = "operator", token: bool = False) -> grpc.aio.Channel:
    """A channel to a test's server as `role` (its certificate, or with
    `token` the role-less certificate and the role's token)."""
    return aio_channel(address, credentials(role, token), CHANNEL_OPTIONS)


def service_env(role: str) -> dict[str, str]:
    """The AUTH, TLS_*_FILE and AUTH_TOKENS_FILE variables of a service process."""
    return {"AUTH": "on", **local().service_env(role)}
