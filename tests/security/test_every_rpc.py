"""Every RPC of every service of a running mesh (real processes, TLS, the
mesh's own throw-away CA), called by everyone who may not call it: refused
with the right status and a message that says what is missing, and nothing
changes (every row of the catalog's database, every object of the store).
Then each RPC called by a role that may: admitted."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cellmesh.auth import Credentials, aio_channel
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2
from cellmesh.reducer.v1 import reducer_pb2, reducer_pb2_grpc
from cellmesh.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from cellmesh.worker.v1 import worker_pb2, worker_pb2_grpc
from google.protobuf import message as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common import pki, roles
from services.common.s3 import ObjectStore
from services.mesh.demo import Mesh, start_mesh, stop_mesh
from tests.e2e.meshkit import NUCLEI, options
from tests.security.test_role_table import every_rpc

pytestmark = pytest.mark.e2e

PLATE = "SEC1"
CHANNELS = ["DNA", "GFP"]


def requests(sha: str) -> dict[str, pb.Message]:
    """A request for each RPC that would do its work if the caller may call it."""
    site = types_pb2.SiteRef(plate=PLATE, well="A01", site=0)
    image = catalog_pb2.ImageRegistration(
        site=site,
        channel="DNA",
        object=types_pb2.ObjectRef(key=f"images/{PLATE}/A01/s0/DNA/a.tif", sha256="0" * 64, size=10),
        file_name="a.tif",
    )
    c = catalog_pb2
    return {
        "RegisterPipeline": c.RegisterPipelineRequest(name="other", content=NUCLEI.read_bytes() + b"\n"),
        "GetPipeline": c.GetPipelineRequest(sha256=sha),
        "ListPipelines": c.ListPipelinesRequest(),
        "CreatePlate": c.CreatePlateRequest(name="SEC2", channels=CHANNELS, pipeline_sha256=sha),
        "SetPlateMap": c.SetPlateMapRequest(
            plate=PLATE,
            plate_map=c.PlateMapUpload(content=b"Well,treatment\nA01,dmso\n", source_name="map.csv"),
        ),
        "GetPlate": c.GetPlateRequest(name=PLATE),
        "ListPlates": c.ListPlatesRequest(),
        "FinishAcquisition": c.FinishAcquisitionRequest(plate=PLATE),
        "AddPlatePipeline": c.AddPlatePipelineRequest(plate=PLATE, pipeline_sha256=sha),
        "RegisterImages": c.RegisterImagesRequest(images=[image]),
        "ListImages": c.ListImagesRequest(plate=PLATE),
        "ClaimReadySites": c.ClaimReadySitesRequest(scheduler_id="intruder", max_sites=10, lease_seconds=60),
        "MarkSitesQueued": c.MarkSitesQueuedRequest(),
        "StartSiteJob": c.StartSiteJobRequest(),
        "CompleteSiteJob": c.CompleteSiteJobRequest(),
        "FailSiteJob": c.FailSiteJobRequest(),
        "RenewSiteLease": c.RenewSiteLeaseRequest(),
        "ListSites": c.ListSitesRequest(plate=PLATE),
        "RequeueSites": c.RequeueSitesRequest(plate=PLATE, reduce=True),
        "GetPlateProgress": c.GetPlateProgressRequest(plate=PLATE),
        "WatchPlateProgress": c.WatchPlateProgressRequest(plate=PLATE),
        "ClaimReducibleRuns": c.ClaimReducibleRunsRequest(
            scheduler_id="intruder", max_runs=10, lease_seconds=60
        ),
        "MarkRunsQueued": c.MarkRunsQueuedRequest(),
        "RegisterPlateReport": c.RegisterPlateReportRequest(),
        "GetPlateReport": c.GetPlateReportRequest(plate=PLATE),
        "GetSchedulerStatus": scheduler_pb2.GetSchedulerStatusRequest(),
        "GetWorkerStatus": worker_pb2.GetWorkerStatusRequest(),
        "ReducePlate": reducer_pb2.ReducePlateRequest(plate=PLATE),
    }


Stubs = dict[str, Any]


def stubs(channels: dict[str, grpc.aio.Channel]) -> Stubs:
    return {
        "catalog": catalog_pb2_grpc.CatalogServiceStub(channels["catalog"]),
        "scheduler": scheduler_pb2_grpc.SchedulerServiceStub(channels["scheduler"]),
        "worker": worker_pb2_grpc.WorkerServiceStub(channels["worker"]),
        "reducer": reducer_pb2_grpc.ReducerServiceStub(channels["reducer"]),
    }


def service_of(method: str) -> str:
    return {
        roles.CATALOG: "catalog",
        roles.SCHEDULER: "scheduler",
        roles.WORKER: "worker",
        roles.REDUCER: "reducer",
    }[method.rsplit("/", 1)[0] + "/"]


async def call(stub_set: Stubs, method: str, request: pb.Message) -> grpc.StatusCode:
    """The call's status (OK when it answered)."""
    name = method.rsplit("/", 1)[1]
    rpc = getattr(stub_set[service_of(method)], name)
    try:
        if name == "WatchPlateProgress":
            stream = rpc(request, timeout=10)
            async for _ in stream:
                break
            stream.cancel()
        else:
            await rpc(request, timeout=30)
    except grpc.aio.AioRpcError as exc:
        call.details[method] = exc.details() or ""  # type: ignore[attr-defined]
        return exc.code()
    return grpc.StatusCode.OK


call.details = {}  # type: ignore[attr-defined]


def database_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(map(repr, db.execute(f'SELECT * FROM "{t}"'))) for t in tables}  # type: ignore[misc]


async def objects(mesh: Mesh) -> list[str]:
    async with ObjectStore(mesh.s3) as store:
        return sorted([f"{o.key} {o.sha256} {o.size}" async for o in store.list_keys("")])


class Caller:
    def __init__(self, label: str, make: Callable[[str], grpc.aio.Channel]) -> None:
        self.label = label
        self.make = make


async def test_every_rpc_refuses_whoever_may_not_call_it_and_changes_nothing(tmp_path: Path) -> None:
    mesh = await start_mesh(options(tmp_path, workers=1, sites=1, rows=1, columns=1))
    assert mesh.pki is not None
    local = mesh.pki
    addresses = {
        "catalog": mesh.catalog_addr,
        "reducer": mesh.reducer_addr,
        **{
            ("worker" if p.name.startswith("cpworker") else p.name): p.grpc_addr
            for p in mesh.procs.procs
            if p.name in ("scheduler", "cpworker-0")
        },
    }
    forger = pki.Authority.create("not this mesh's CA")
    forged_cert, forged_key = forger.issue("operator", "forged-operator", ["127.0.0.1", "localhost"])
    ca = local.ca.read_bytes()
    try:
        # The plate is a scientist's own (a scientist requeues only their plates).
        async with mesh.channel(role="scientist") as channel:
            scientist = catalog_pb2_grpc.CatalogServiceStub(channel)
            sha = (
                await scientist.RegisterPipeline(
                    catalog_pb2.RegisterPipelineRequest(name="nuclei", content=NUCLEI.read_bytes())
                )
            ).pipeline.ref.sha256
            await scientist.CreatePlate(
                catalog_pb2.CreatePlateRequest(
                    name=PLATE,
                    channels=CHANNELS,
                    pipeline_sha256=sha,
                    layout=catalog_pb2.PlateLayout(rows=1, columns=2, sites_per_well=1),
                )
            )
        every = requests(sha)
        assert {m.rsplit("/", 1)[1] for m in every_rpc()} == set(every), "a request for every RPC"

        def tls(creds: Credentials) -> Callable[[str], grpc.aio.Channel]:
            return lambda address: aio_channel(address, creds)

        unknown_token = Credentials(
            ca, local.cert("client").read_bytes(), local.key("client").read_bytes(), "cm_made-up"
        )
        refused_at_handshake = [
            Caller("plain text", lambda address: grpc.aio.insecure_channel(address)),
            Caller("TLS without a certificate", tls(Credentials(ca))),
            Caller(
                "TLS without a certificate, operator's token",
                tls(Credentials(ca, token=local.token("operator"))),
            ),
            Caller("a certificate of another CA", tls(Credentials(ca, forged_cert, forged_key))),
            Caller(
                "a certificate of another CA with the operator's token",
                tls(Credentials(ca, forged_cert, forged_key, local.token("operator"))),
            ),
        ]
        unauthenticated = [
            Caller("a certificate with no role and no token", tls(local.credentials("client"))),
            Caller("an unknown token", tls(unknown_token)),
            Caller(
                "an operator's certificate with an unknown token",
                tls(local.credentials("operator").with_token("cm_made-up")),
            ),
        ]
        by_role = {
            **{f"certificate {r}": (r, tls(local.credentials(r))) for r in roles.ALL_ROLES},
            **{f"token {r}": (r, tls(local.credentials(r, token=True))) for r in roles.USER_ROLES},
        }
        before = (database_rows(tmp_path / "catalog.db"), await objects(mesh))

        async def refused(caller: Caller, expected: grpc.StatusCode, methods: list[str], words: str) -> int:
            channels = {name: caller.make(address) for name, address in addresses.items()}
            try:
                s = stubs(channels)
                for method in methods:
                    code = await call(s, method, every[method.rsplit("/", 1)[1]])
                    assert code == expected, f"{caller.label}: {method} answered {code}, not {expected}"
                    details = call.details[method]  # type: ignore[attr-defined]
                    assert words in details, f"{caller.label}: {method}: {details!r}"
            finally:
                for c in channels.values():
                    await c.close()
            return len(methods)

        tried = 0
        methods = sorted(every_rpc())
        for caller in refused_at_handshake:
            tried += await refused(caller, grpc.StatusCode.UNAVAILABLE, methods, "")
        for caller in unauthenticated:
            words = "no role" if "no role" in caller.label else "not one this mesh knows"
            tried += await refused(caller, grpc.StatusCode.UNAUTHENTICATED, methods, words)
        for label, (role, make) in by_role.items():
            denied = [m for m in methods if role not in roles.RPC_ROLES[m]]
            tried += await refused(
                Caller(label, make), grpc.StatusCode.PERMISSION_DENIED, denied, f"role {role}"
            )
        after = (database_rows(tmp_path / "catalog.db"), await objects(mesh))
        assert after == before, "a refused call changed the catalog or the object store"
        print(f"{tried} refused calls over {len(methods)} RPCs of 4 services")

        # Health answers every certificate of the CA; reflection needs a role.
        for label, make in [
            ("no role", tls(local.credentials("client"))),
            ("viewer", tls(local.credentials("viewer"))),
        ]:
            async with make(mesh.catalog_addr) as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, label
                stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")])
                )
                if label == "unknown token":
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        [r async for r in stream]
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                else:
                    names = [s.name async for r in stream for s in r.list_services_response.service]
                    assert "cellmesh.catalog.v1.CatalogService" in names

        # Whoever the table allows is let through (the call may still fail on its merits).
        for method in methods:
            allowed = sorted(roles.RPC_ROLES[method] - {roles.OPERATOR})
            role = allowed[0] if allowed else roles.OPERATOR
            channels = {
                name: by_role[f"certificate {role}"][1](address) for name, address in addresses.items()
            }
            try:
                code = await call(stubs(channels), method, every[method.rsplit("/", 1)[1]])
            finally:
                for c in channels.values():
                    await c.close()
            assert code not in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
                grpc.StatusCode.UNAVAILABLE,
            ), f"{method} as {role}: {code} {call.details.get(method)}"  # type: ignore[attr-defined]
    finally:
        await stop_mesh(mesh)
