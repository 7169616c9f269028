"""The role table knows every RPC of every service, and only those."""

from __future__ import annotations

import importlib
import pkgutil

import cellmesh

from services.common import roles


def every_rpc() -> set[str]:
    """`/package.Service/Method` of every service in the generated code."""
    names: set[str] = set()
    for info in pkgutil.walk_packages(cellmesh.__path__, "cellmesh."):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(info.name)
        for service in module.DESCRIPTOR.services_by_name.values():
            names.update(f"/{service.full_name}/{method.name}" for method in service.methods)
    return names


def test_every_rpc_of_every_service_has_its_roles() -> None:
    rpcs = every_rpc()
    assert len(rpcs) >= 27, sorted(rpcs)
    missing = sorted(rpcs - roles.RPC_ROLES.keys())
    assert not missing, f"add these to services/common/roles.py RPC_ROLES: {missing}"
    unknown = sorted(roles.RPC_ROLES.keys() - rpcs)
    assert not unknown, f"RPC_ROLES names RPCs no service has: {unknown}"


def test_every_role_in_the_table_is_known_and_operators_may_call_everything() -> None:
    for method, allowed in roles.RPC_ROLES.items():
        assert allowed <= set(roles.ALL_ROLES), (method, allowed)
        assert roles.OPERATOR in allowed, method
        assert roles.CLIENT_ROLE not in allowed, method


def test_viewers_only_read() -> None:
    writes = {m for m, allowed in roles.RPC_ROLES.items() if "viewer" in allowed}
    verbs = {m.rsplit("/", 1)[1] for m in writes}
    assert all(v.startswith(("Get", "List", "Watch")) for v in verbs), sorted(verbs)
