"""Settings from environment variables, shared by every service.

Each service describes the variables it needs with `Var`s; `load` reads them
all and reports every missing or malformed variable in one error. A variable
`X` may instead be given as `X_FILE`, the path of a file holding the value
(Docker secrets).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SettingsError(RuntimeError):
    """One or more settings are missing or malformed."""


@dataclass(frozen=True)
class Var:
    """One environment variable: its name, default (None = required) and parser."""

    name: str
    default: str | None = None
    parse: Callable[[str], Any] = str
    help: str = ""


def read_env(name: str, env: Mapping[str, str]) -> str | None:
    """Returns `name` from the environment, or the contents of `name_FILE`."""
    value = env.get(name)
    if value is not None and value != "":
        return value
    path = env.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise SettingsError(f"{name}_FILE={path}: cannot read it ({exc.strerror})") from exc
    return None


def load(variables: Iterable[Var], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Reads every variable; raises one SettingsError that lists all problems."""
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    problems: list[str] = []
    for var in variables:
        try:
            raw = read_env(var.name, source)
        except SettingsError as exc:
            problems.append(str(exc))
            continue
        if raw is None:
            raw = var.default
        if raw is None:
            hint = f" ({var.help})" if var.help else ""
            problems.append(f"{var.name} is not set (or {var.name}_FILE){hint}")
            continue
        try:
            values[var.name] = var.parse(raw)
        except ValueError as exc:
            problems.append(f"{var.name}={raw!r} is not valid: {exc}")
    if problems:
        raise SettingsError("missing or invalid settings:\n  " + "\n  ".join(problems))
    return values


def positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def positive_float(raw: str) -> float:
    value = float(raw)
    if value <= 0:
        raise ValueError("must be a positive number")
    return value


def non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number 0-65535")
    return value


@dataclass(frozen=True)
class S3Settings:
    """How to reach the object store."""

    endpoint_url: str | None
    bucket: str
    region: str
    access_key: str
    secret_key: str

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        v = load(S3_VARS, env)
        return cls(
            endpoint_url=v["S3_ENDPOINT_URL"] or None,
            bucket=v["S3_BUCKET"],
            region=v["S3_REGION"],
            access_key=v["AWS_ACCESS_KEY_ID"],
            secret_key=v["AWS_SECRET_ACCESS_KEY"],
        )


S3_VARS = (
    Var("S3_ENDPOINT_URL", "", help="e.g. http://127.0.0.1:9000; empty for AWS"),
    Var("S3_BUCKET", "cellmesh"),
    Var("S3_REGION", "us-east-1"),
    Var("AWS_ACCESS_KEY_ID", help="object store access key"),
    Var("AWS_SECRET_ACCESS_KEY", help="object store secret key"),
)

#: Authentication (services/common/auth.py reads them).
AUTH_VARS = (
    Var("AUTH", "on", help="on (TLS, certificates, roles) or off"),
    Var("TLS_CA", "", help="the mesh CA's certificate (PEM)"),
    Var("TLS_CERT", "", help="this service's certificate (PEM)"),
    Var("TLS_KEY", "", help="this service's private key (PEM)"),
    Var("AUTH_TOKENS", "", help="the users' tokens: `role sha256 name` lines"),
)

COMMON_VARS = (
    *AUTH_VARS,
    Var("LOG_LEVEL", "INFO"),
    Var("GRPC_HOST", "0.0.0.0"),
    Var("GRACE_SECONDS", "20", positive_float, "seconds in-flight RPCs get to finish on SIGTERM"),
    Var(
        "RATE_LIMIT_PER_S",
        "100",
        non_negative_float,
        "calls per second each user may make to the user-facing RPCs (0: no limit); the mesh's services are not limited",
    ),
    Var(
        "RATE_LIMIT_BURST",
        "500",
        positive_int,
        "calls a user may make at once before RATE_LIMIT_PER_S applies",
    ),
)
