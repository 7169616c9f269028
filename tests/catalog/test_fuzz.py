"""Fuzzing the user-facing catalog RPCs: hypothesis builds protobuf requests
from their descriptors (any field set or not, odd strings, out-of-range
numbers, nested messages), over a real gRPC server on SQLite and MariaDB.
No call may end in INTERNAL or UNKNOWN, and a refused call stores nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from cellmesh.catalog.v1 import catalog_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from tests.catalog.conftest import Catalog
from tests.catalog.kit import image, new_plate, pipeline

TABLES = ("pipelines", "plates", "runs", "sites", "images", "site_jobs", "reports")
# What a user (not the mesh) calls, with the request type of each.
USER_RPCS = {
    "RegisterPipeline": catalog_pb2.RegisterPipelineRequest,
    "GetPipeline": catalog_pb2.GetPipelineRequest,
    "ListPipelines": catalog_pb2.ListPipelinesRequest,
    "CreatePlate": catalog_pb2.CreatePlateRequest,
    "GetPlate": catalog_pb2.GetPlateRequest,
    "ListPlates": catalog_pb2.ListPlatesRequest,
    "FinishAcquisition": catalog_pb2.FinishAcquisitionRequest,
    "AddPlatePipeline": catalog_pb2.AddPlatePipelineRequest,
    "RegisterImages": catalog_pb2.RegisterImagesRequest,
    "ListImages": catalog_pb2.ListImagesRequest,
    "ListSites": catalog_pb2.ListSitesRequest,
    "RequeueSites": catalog_pb2.RequeueSitesRequest,
    "GetPlateProgress": catalog_pb2.GetPlateProgressRequest,
    "GetPlateReport": catalog_pb2.GetPlateReportRequest,
    "SetPlateMap": catalog_pb2.SetPlateMapRequest,
}
BAD_STATUS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS)

# Strings a user might send, and some no one should: real names first, so
# that calls get past the first check often enough to reach deeper ones.
TEXT = st.one_of(
    st.sampled_from(
        ["P1", "A01", "A1", "H12", "DNA", "GFP", "images/P1/A01/s0/DNA/a.tif", "", "..", "a" * 70]
    ),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
)
INTS = st.one_of(st.integers(-3, 20), st.integers(-(2**31), 2**31 - 1))


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[dict[str, Any]]:
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for f in descriptor.fields:
        one = field_values(f, depth)
        if one is None:
            continue
        if f.is_repeated:
            fields[f.name] = st.lists(one, max_size=3)
        else:
            fields[f.name] = one
    return st.fixed_dictionaries({}, optional=fields)


def field_values(f: FieldDescriptor, depth: int) -> st.SearchStrategy[Any] | None:
    t = f.type
    if t == FieldDescriptor.TYPE_MESSAGE:
        if f.message_type.GetOptions().map_entry:
            return None
        if depth >= 3 or f.message_type.full_name.startswith("google.protobuf"):
            return None
        return messages(f.message_type, depth + 1)
    if t == FieldDescriptor.TYPE_STRING:
        if f.name == "sha256" or f.name.endswith("_sha256"):
            return st.one_of(TEXT, st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))
        return TEXT
    if t == FieldDescriptor.TYPE_BYTES:
        return st.one_of(
            st.binary(max_size=200),
            st.just(pipeline(images=("DNA", "GFP"))),
            st.just(b"Well,Dose,Control\nA01,0,-1\nH12,10,1\n"),  # a plate map
            st.text(alphabet='AB01,\n\t"xW', max_size=60).map(lambda t: ("Well,x\n" + t).encode()),
        )
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_ENUM:
        return st.integers(-1, len(f.enum_type.values) + 1)
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True)
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    return INTS


def build(cls: type[Message], values: dict[str, Any]) -> Message:
    msg = cls()
    fill(msg, values)
    return msg


def fill(msg: Message, values: dict[str, Any]) -> None:
    for name, value in values.items():
        f = msg.DESCRIPTOR.fields_by_name[name]
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            if f.is_repeated:
                for v in value:
                    fill(getattr(msg, name).add(), v)
            else:
                fill(getattr(msg, name), value)
        elif f.is_repeated:
            getattr(msg, name).extend(value)
        else:
            setattr(msg, name, value)


async def counts(catalog: Catalog) -> dict[str, int]:
    async with catalog.store.engine.connect() as conn:
        return {t: int((await conn.execute(text(f"SELECT COUNT(*) FROM {t}"))).scalar_one()) for t in TABLES}


TRIED: dict[str, int] = {}


def fuzz_one(catalog: Catalog, loop: asyncio.AbstractEventLoop, rpc: str, cls: type[Message]) -> None:
    method = getattr(catalog.stub, rpc)

    @settings(
        max_examples=150,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        database=None,
    )
    @given(values=messages(cls.DESCRIPTOR))
    def one(values: dict[str, Any]) -> None:
        request = build(cls, values)

        async def call() -> None:
            before = await counts(catalog)
            try:
                await method(request, timeout=30)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() not in BAD_STATUS, f"{rpc}({request}) -> {exc.code()}: {exc.details()}"
                assert exc.details(), f"{rpc}({request}) refused without a message"
                assert await counts(catalog) == before, f"{rpc}({request}) was refused but stored something"
            TRIED[rpc] = TRIED.get(rpc, 0) + 1

        asyncio.run_coroutine_threadsafe(call(), loop).result()

    one()


async def test_user_rpcs_never_fail_inside_and_refusals_store_nothing(catalog: Catalog) -> None:
    # A plate with a pipeline and one image, so that some generated calls find things.
    await new_plate(catalog.stub, "P1")
    await catalog.stub.RegisterImages(
        catalog_pb2.RegisterImagesRequest(images=[image("P1", "A01", 0, "DNA")])
    )
    loop = asyncio.get_running_loop()
    for rpc, request_type in USER_RPCS.items():
        await asyncio.to_thread(fuzz_one, catalog, loop, rpc, request_type)
    print("inputs tried per RPC:", TRIED, "total", sum(TRIED.values()))
    assert all(TRIED.get(rpc, 0) >= 100 or not cls.DESCRIPTOR.fields for rpc, cls in USER_RPCS.items()), TRIED
