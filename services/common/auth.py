"""Authentication and roles on every port: the servers' TLS credentials,
the services' own client credentials, and the interceptor that checks each
call's role against `services.common.roles.RPC_ROLES`.

Settings (every service, `COMMON_VARS`; each may be given as `X_FILE`, a
file holding it, which is how Docker secrets arrive):

- `AUTH`: `on` (the default) or `off` (plain text, no checks; for a
  developer's own machine only, logged loudly);
- `TLS_CA`: the mesh CA's certificate (PEM): callers' certificates must be
  signed by it;
- `TLS_CERT`, `TLS_KEY`: this service's certificate (its role in
  `OU=`) and key, presented when it serves and when it calls another service;
- `AUTH_TOKENS`: the users' tokens, one `role sha256-of-token name` line each
  (`python -m services.common.pki token` makes them); may be empty.

A call's role: its bearer token's when it sends `authorization: Bearer
<token>`, else its certificate's. A token no line knows is UNAUTHENTICATED
(even beside a good certificate); a role the RPC does not allow is
PERMISSION_DENIED; both messages say what is missing.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from cellmesh.auth import Credentials
from cryptography import x509
from cryptography.x509.oid import NameOID

from services.common import roles
from services.common.settings import AUTH_VARS, SettingsError, read_env

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Caller:
    """Who calls: a role and a name for messages and logs."""

    role: str
    name: str
    via: str  # "token" or "certificate"


def parse_tokens(text: str) -> dict[str, Caller]:
    """A tokens file: sha256 hex digest -> caller. Raises ValueError naming a bad line."""
    tokens: dict[str, Caller] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        if len(parts) < 2 or parts[0] not in roles.USER_ROLES or len(parts[1]) != 64:
            raise ValueError(
                f"line {number} is not `role sha256 name` with a role of {', '.join(roles.USER_ROLES)}"
            )
        tokens[parts[1].lower()] = Caller(parts[0], parts[2] if len(parts) > 2 else parts[0], "token")
    return tokens


@dataclass(frozen=True)
class MeshAuth:
    """A service's credentials: what it serves with and calls with."""

    ca: bytes
    cert: bytes
    key: bytes
    tokens: Mapping[str, Caller] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, values: Mapping[str, Any]) -> MeshAuth | None:
        """From the loaded `AUTH_VARS`; None when AUTH=off. Raises
        SettingsError naming every missing variable."""
        mode = str(values.get("AUTH", "on")).strip().lower()
        if mode in ("off", "0", "false", "no"):
            log.warning("AUTH=off: this service answers anyone, in plain text")
            return None
        if mode not in ("on", "1", "true", "yes"):
            raise SettingsError(f"AUTH={mode!r} is not valid: on or off")
        missing = [n for n in ("TLS_CA", "TLS_CERT", "TLS_KEY") if not values.get(n)]
        if missing:
            raise SettingsError(
                "missing or invalid settings:\n  "
                + "\n  ".join(f"{n} is not set (or {n}_FILE); AUTH=on needs it" for n in missing)
            )
        try:
            tokens = parse_tokens(str(values.get("AUTH_TOKENS") or ""))
        except ValueError as exc:
            raise SettingsError(f"AUTH_TOKENS is not valid: {exc}") from None
        return cls(
            str(values["TLS_CA"]).encode() + b"\n",
            str(values["TLS_CERT"]).encode() + b"\n",
            str(values["TLS_KEY"]).encode() + b"\n",
            tokens,
        )

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> MeshAuth | None:
        values = {v.name: read_env(v.name, env) or v.default for v in AUTH_VARS}
        return cls.from_settings(values)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def client(self) -> Credentials:
        """This service's credentials for calling another service."""
        return Credentials(self.ca, self.cert, self.key)

    def interceptor(self) -> AuthInterceptor:
        return AuthInterceptor(self.tokens)


@functools.lru_cache(maxsize=1024)
def certificate_caller(pem: bytes) -> Caller | None:
    """The role and name a (TLS-verified) certificate states, None without a
    known role."""
    cert = x509.load_pem_x509_certificate(pem)
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    name = str(names[0].value) if names else "?"
    role = str(units[0].value) if units else ""
    if role not in roles.ALL_ROLES:
        return None
    return Caller(role, name, "certificate")


def _bearer(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("cellmesh_caller", default=None)


def current_caller() -> Caller | None:
    """Who makes the call being served (None with AUTH=off, or outside a call)."""
    return _CALLER.get()


class Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def identify(tokens: Mapping[str, Caller], metadata: Any, auth_context: Mapping[str, Any]) -> Caller:
    """The caller (role `client` for a certificate that names no role), or
    Refusal(UNAUTHENTICATED) saying what is missing."""
    token = _bearer(metadata)
    if token is not None:
        if not token:
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "the authorization metadata is not `Bearer <token>`: send `authorization: Bearer <token>`",
            )
        caller = tokens.get(hashlib.sha256(token.encode()).hexdigest())
        if caller is None:
            raise Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "the bearer token is not one this mesh knows (mistyped, or revoked): ask an operator for a"
                " token (`python -m services.common.pki token`)",
            )
        return caller
    pems = auth_context.get("x509_pem_cert") or []
    if pems:
        caller = certificate_caller(bytes(pems[0]))
        if caller is not None:
            return caller
        names = auth_context.get("x509_common_name") or [b"?"]
        return Caller(roles.CLIENT_ROLE, bytes(names[0]).decode(errors="replace"), "certificate")
    raise Refusal(
        grpc.StatusCode.UNAUTHENTICATED,
        "no credentials: send a token as `authorization: Bearer <token>` or connect with a client"
        " certificate of this mesh's CA that names a role",
    )


def check(method: str, caller: Caller) -> None:
    """Refusal(UNAUTHENTICATED) for a certificate without a role and no
    token (reflection excepted), Refusal(PERMISSION_DENIED) unless `caller`'s
    role may call `method`."""
    if method.startswith(roles.REFLECTION_PREFIXES):
        return
    if caller.role == roles.CLIENT_ROLE:
        raise Refusal(
            grpc.StatusCode.UNAUTHENTICATED,
            f"the client certificate {caller.name!r} names no role (OU=viewer, scientist, operator or a"
            " service's): send a token as `authorization: Bearer <token>`",
        )
    allowed = roles.allowed(method)
    if allowed is None:
        raise Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method.lstrip('/')} is in no role's list (services/common/roles.py): no one may call it",
        )
    if caller.role not in allowed:
        raise Refusal(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{method.lstrip('/')} needs the role {' or '.join(sorted(allowed))}; the caller"
            f" ({caller.via} {caller.name!r}) has the role {caller.role}",
        )


Behaviour = Callable[..., Any]


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks every call but health's before its handler runs."""

    def __init__(self, tokens: Mapping[str, Caller]) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(roles.HEALTH_PREFIX):
            return handler
        return _guarded(handler, method, details.invocation_metadata, self._tokens)


def _guarded(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, metadata: Any, tokens: Mapping[str, Caller]
) -> grpc.RpcMethodHandler[Any, Any]:
    async def admit(context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            caller = identify(tokens, metadata, context.auth_context())
            check(method, caller)
        except Refusal as refusal:
            log.info("refused %s: %s", method, refusal.message)
            await context.abort(refusal.code, refusal.message)
        _CALLER.set(caller)

    return admitted(handler, lambda _request, context: admit(context))


def admitted(
    handler: grpc.RpcMethodHandler[Any, Any],
    admit: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]],
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with `admit(request, context)` awaited before its behaviour
    runs (it aborts the call to refuse it); for server interceptors."""

    def unary(inner: Behaviour) -> Behaviour:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await admit(request, context)
            result = inner(request, context)
            return await result if hasattr(result, "__await__") else result

        return call

    def streaming(inner: Behaviour) -> Behaviour:
        async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
            await admit(request, context)
            result = inner(request, context)
            if hasattr(result, "__aiter__"):
                async for item in result:
                    yield item
            elif hasattr(result, "__await__"):
                await result
            else:
                for item in result:
                    yield item

        return call

    kinds: dict[
        str, tuple[Callable[..., grpc.RpcMethodHandler[Any, Any]], Callable[[Behaviour], Behaviour]]
    ] = {
        "unary_unary": (grpc.unary_unary_rpc_method_handler, unary),
        "stream_unary": (grpc.stream_unary_rpc_method_handler, unary),
        "unary_stream": (grpc.unary_stream_rpc_method_handler, streaming),
        "stream_stream": (grpc.stream_stream_rpc_method_handler, streaming),
    }
    for attribute, (make, wrap) in kinds.items():
        inner = getattr(handler, attribute)
        if inner is not None:
            return make(
                wrap(inner),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
    return handler
