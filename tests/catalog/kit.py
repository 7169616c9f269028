"""Helpers for the catalog's tests: synthetic pipelines, requests and an
assertion on gRPC errors."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import grpc
import pytest
from cellmesh import keys
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2

if TYPE_CHECKING:
    Stub = catalog_pb2_grpc.CatalogServiceAsyncStub
else:
    Stub = object

_HEAD = "[module_num:{n}|svn_version:'Unknown'|variable_revision_number:{rev}|show_window:False|notes:[{note}]|batch_state:array([], dtype=uint8)|enabled:{enabled}|wants_pause:False]"


def module(
    name: str, n: int, settings: Sequence[tuple[str, str]], rev: int = 1, enabled: bool = True, note: str = ""
) -> str:
    lines = [f"{name}:" + _HEAD.format(n=n, rev=rev, note=f"'{note}'" if note else "", enabled=enabled)]
    lines += [f"    {label}:{value}" for label, value in settings]
    return "\n".join(lines) + "\n"


def pipeline(
    images: Sequence[str] = ("DNA", "GFP"),
    objects: Sequence[str] = ("Nuclei",),
    extra: Sequence[tuple[str, Sequence[tuple[str, str]]]] = (),
    note: str = "",
    export: Sequence[tuple[str, str]] | None = None,
) -> bytes:
    """A small .cppipe (format 5) that names `images`, finds `objects` and
    exports everything; `extra` adds (module, settings) before the export."""
    blocks = []
    n = 0

    def add(name: str, settings: Sequence[tuple[str, str]], **kw: object) -> None:
        nonlocal n
        n += 1
        blocks.append(module(name, n, settings, **kw))  # type: ignore[arg-type]

    add("Images", [("Filter images?", "Images only")], note=note)
    add("Metadata", [("Extract metadata?", "No")])
    nat: list[tuple[str, str]] = [
        ("Assign a name to", "Images matching rules"),
        ("Select the image type", "Grayscale image"),
        ("Name to assign these images", "DNA"),
        ("Match metadata", "[]"),
        ("Image set matching method", "Order"),
        ("Set intensity range from", "Image metadata"),
        ("Assignments count", str(len(images))),
        ("Single images count", "0"),
        ("Maximum intensity", "255.0"),
        ("Process as 3D?", "No"),
    ]
    for image in images:
        nat += [
            ("Select the rule criteria", f'and (file does contain "{image}")'),
            ("Name to assign these images", image),
            ("Name to assign these objects", "Cell"),
            ("Select the image type", "Grayscale image"),
            ("Set intensity range from", "Image metadata"),
            ("Maximum intensity", "255.0"),
        ]
    add("NamesAndTypes", nat, rev=8)
    add("Groups", [("Do you want to group your images?", "No")])
    for obj in objects:
        add(
            "IdentifyPrimaryObjects",
            [
                ("Select the input image", images[0] if images else "None"),
                ("Name the primary objects to be identified", obj),
            ],
            rev=14,
        )
    for name, settings in extra:
        add(name, settings)
    add(
        "ExportToSpreadsheet",
        export
        or [
            ("Select the column delimiter", 'Comma (",")'),
            ("Output file location", "Default Output Folder|"),
            ("Export all measurement types?", "Yes"),
            ("Add a prefix to file names?", "No"),
            ("Filename prefix", "MyExpt_"),
            ("Data to export", "Do not use"),
            ("Combine these object measurements with those of the previous object?", "No"),
            ("File name", "DATA.csv"),
            ("Use the object name for the file name?", "Yes"),
        ],
        rev=13,
    )
    head = [
        "CellProfiler Pipeline: http://www.cellprofiler.org",
        "Version:5",
        "DateRevision:421",
        "GitHash:",
        f"ModuleCount:{n}",
        "HasImagePlaneDetails:False",
        "",
    ]
    return ("\n".join(head) + "\n" + "\n".join(blocks)).encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def image(
    plate: str,
    well: str,
    site: int,
    channel: str,
    content: bytes | None = None,
    replace: bool = False,
    key: str | None = None,
    file_name: str | None = None,
) -> catalog_pb2.ImageRegistration:
    data = content if content is not None else f"{plate}/{well}/{site}/{channel}".encode()
    return catalog_pb2.ImageRegistration(
        site=types_pb2.SiteRef(plate=plate, well=well, site=site),
        channel=channel,
        object=types_pb2.ObjectRef(
            key=key if key is not None else f"images/{plate}/{well}/s{site}/{channel}.tif",
            size=len(data),
            sha256=sha(data),
        ),
        file_name=file_name if file_name is not None else f"{well}_s{site}_{channel}.tif",
        replace=replace,
    )


def site_images(
    plate: str, well: str, site: int, channels: Sequence[str]
) -> list[catalog_pb2.ImageRegistration]:
    return [image(plate, well, site, c) for c in channels]


@contextlib.contextmanager
def refused(code: grpc.StatusCode, *fragments: str) -> Iterator[None]:
    """Asserts the block fails with `code` and a message containing every fragment."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        yield
    error = caught.value
    assert error.code() == code, f"{error.code()}: {error.details()}"
    for fragment in fragments:
        assert fragment in (error.details() or ""), f"{fragment!r} not in {error.details()!r}"


async def register_pipeline(stub: Stub, content: bytes, name: str = "test") -> catalog_pb2.Pipeline:
    reply = await stub.RegisterPipeline(catalog_pb2.RegisterPipelineRequest(name=name, content=content))
    return reply.pipeline


async def new_plate(
    stub: Stub,
    name: str,
    channels: Sequence[str] = ("DNA", "GFP"),
    layout: catalog_pb2.PlateLayout | None = None,
    content: bytes | None = None,
    reduce_with_failures: bool = False,
) -> tuple[catalog_pb2.Plate, catalog_pb2.Pipeline]:
    """A pipeline naming `channels` and a plate running it."""
    pipe = await register_pipeline(stub, content if content is not None else pipeline(images=channels))
    reply = await stub.CreatePlate(
        catalog_pb2.CreatePlateRequest(
            name=name,
            channels=list(channels),
            layout=layout,
            pipeline_sha256=pipe.ref.sha256,
            reduce_with_failures=reduce_with_failures,
        )
    )
    return reply.plate, pipe


def wells(n: int) -> list[str]:
    """The first n wells of a 384-well plate, row by row."""
    return [f"{chr(ord('A') + i // 24)}{i % 24 + 1:02d}" for i in range(n)]


async def ready_sites(stub: Stub, plate: str, n: int, channels: Sequence[str] = ("DNA", "GFP")) -> None:
    """Registers every channel of sites 0 of the first n wells."""
    regs = [img for w in wells(n) for img in site_images(plate, w, 0, channels)]
    for start in range(0, len(regs), 5000):
        await stub.RegisterImages(catalog_pb2.RegisterImagesRequest(images=regs[start : start + 5000]))


async def claim_all(stub: Stub, scheduler: str = "s1", lease: int = 60) -> list[catalog_pb2.SiteClaim]:
    reply = await stub.ClaimReadySites(
        catalog_pb2.ClaimReadySitesRequest(scheduler_id=scheduler, max_sites=1000, lease_seconds=lease)
    )
    return list(reply.claims)


async def run_to_done(stub: Stub, claim: catalog_pb2.SiteClaim, worker: str = "w1") -> None:
    """Start and complete a claimed site the way a worker does."""
    start = await stub.StartSiteJob(
        catalog_pb2.StartSiteJobRequest(
            site_job_id=claim.site_job_id, attempt=claim.attempt, worker_id=worker
        )
    )
    assert start.decision == catalog_pb2.START_DECISION_RUN, start.detail
    await stub.CompleteSiteJob(
        catalog_pb2.CompleteSiteJobRequest(
            site_job_id=claim.site_job_id,
            attempt=claim.attempt,
            worker_id=worker,
            results=[result_file(claim, "Image.csv")],
            provenance=catalog_pb2.Provenance(cellprofiler_version="4.2.8", worker_id=worker),
        )
    )


def claim_results(claim: catalog_pb2.SiteClaim) -> str:
    """The prefix a claim's results must lie under."""
    s = claim.site
    if not s.well:
        return keys.stage_results(s.plate, claim.pipeline.sha256)
    return keys.site_results(s.plate, claim.pipeline.sha256, s.well, s.site)


def result_file(claim: catalog_pb2.SiteClaim, name: str) -> catalog_pb2.ResultFile:
    data = f"{claim.site_job_id}/{claim.attempt}/{name}".encode()
    return catalog_pb2.ResultFile(
        name=name,
        object=types_pb2.ObjectRef(
            key=f"{keys.execution_results(claim_results(claim), claim.attempt, 'x')}/{name}",
            size=len(data),
            sha256=sha(data),
        ),
    )
