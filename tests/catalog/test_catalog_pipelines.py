"""RegisterPipeline, GetPipeline, ListPipelines through the real server."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from tests.catalog.conftest import Catalog
from tests.catalog.kit import pipeline, refused, register_pipeline, sha

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def test_example_human_is_accepted_and_stored(catalog: Catalog, shared_data: Path) -> None:
    content = (shared_data / "example_human" / "ExampleHuman.cppipe").read_bytes()
    reply = await catalog.stub.RegisterPipeline(
        catalog_pb2.RegisterPipelineRequest(name="example-human", content=content)
    )
    p = reply.pipeline
    assert not reply.already_registered
    assert p.ref.sha256 == sha(content)
    assert p.ref.key == f"pipelines/{sha(content)}.cppipe"
    assert list(p.image_names) == ["DNA", "PH3", "cellbody"]
    assert list(p.tables) == ["Image", "Nuclei", "PH3", "Cells", "Cytoplasm"]
    assert p.modules[0] == "Images" and p.modules[-1] == "ExportToSpreadsheet" and len(p.modules) == 14
    assert p.name == "example-human"
    assert await catalog.objects.get_bytes(p.ref.key, expected_sha256=p.ref.sha256) == content

    again = await catalog.stub.RegisterPipeline(
        catalog_pb2.RegisterPipelineRequest(name="other", content=content)
    )
    assert again.already_registered
    assert again.pipeline == p  # the first registration's name and time

    got = await catalog.stub.GetPipeline(catalog_pb2.GetPipelineRequest(sha256=p.ref.sha256))
    assert got.pipeline == p


async def test_example_sbs_is_a_plate_stage_for_calculate_statistics(
    catalog: Catalog, shared_data: Path
) -> None:
    folder = shared_data / "bbbc013_translocation_plate"
    # The plate map and illumination functions it reads, attached as its own files.
    files = [
        catalog_pb2.Attachment(name=n, content=(folder / "images" / n).read_bytes())
        for n in ("1049_Metadata.csv", "Channel1ILLUM.mat", "Channel2ILLUM.mat")
    ]
    for path in ("ExampleSBS.cppipe", "derived/ExampleSBS_cp4.cppipe"):
        content = (folder / path).read_bytes()
        with refused(INVALID, "--attach"):
            await register_pipeline(catalog.stub, content)
        reply = await catalog.stub.RegisterPipeline(
            catalog_pb2.RegisterPipelineRequest(name="sbs", content=content, attachments=files)
        )
        registered = reply.pipeline
        assert list(registered.image_names) == ["rawGFP", "rawDNA"]
        assert registered.scope == types_pb2.PIPELINE_SCOPE_PLATE
        assert list(registered.scope_reasons) == [
            "CalculateStatistics (module 18) computes statistics over all image sets"
        ]


@pytest.mark.parametrize("module", ["CreateBatchFiles", "ExportToDatabase"])
async def test_modules_that_need_the_whole_plate_are_refused(catalog: Catalog, module: str) -> None:
    content = pipeline(extra=[(module, [("Some setting", "x")])])
    with refused(INVALID, module, "runs across all image sets; cellmesh runs one site at a time"):
        await register_pipeline(catalog.stub, content)


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (
            pipeline(extra=[("RunImageJMacro", [("Executable directory", "Default Input Folder|")])]),
            (
                "RunImageJMacro (module 6) runs external programs",
                "an operator must enable it for this pipeline",
            ),
        ),
        (
            pipeline(extra=[("MyLabPlugin", [("x", "y")])]),
            ("MyLabPlugin (module 6) is not a stock CellProfiler 4.2 module (a plugin?)",),
        ),
        (
            pipeline(
                export=[
                    ("Select the column delimiter", 'Comma (",")'),
                    ("Output file location", "Default Output Folder sub-folder|../../../../tmp/x"),
                    ("Export all measurement types?", "Yes"),
                ]
            ),
            (
                "ExportToSpreadsheet (module 6) setting 'Output file location' names a sub-folder that leads out",
            ),
        ),
        (
            pipeline().replace(b"svn_version:'Unknown'", b"svn_version:__import__('os').getcwd()", 1),
            ("Images (module 1) has an attribute 'svn_version:__import__", "not a plain value"),
        ),
    ],
)
async def test_pipelines_that_would_act_outside_their_run_are_refused(
    catalog: Catalog, content: bytes, fragments: tuple[str, ...]
) -> None:
    with refused(INVALID, *fragments):
        await register_pipeline(catalog.stub, content)
    assert (await catalog.stub.ListPipelines(catalog_pb2.ListPipelinesRequest())).pipelines == []


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "first line must be 'CellProfiler Pipeline: "),
        (
            b"hello world\nnot a pipeline\n",
            "not a CellProfiler pipeline: first line must be 'CellProfiler Pipeline:",
        ),
        (b'{"modules": []}', "JSON"),
        (b"\x89HDF\r\n\x1a\n\x00\x00binary", ".cpproj"),
        (b"CellProfiler Pipeline: http://www.cellprofiler.org\nVersion:2\n\n", "Version:2 is not supported"),
        (pipeline().replace(b"ModuleCount:6", b"ModuleCount:9"), "ModuleCount:9 but 6 modules"),
        (pipeline(images=()), "assigns no image names"),
    ],
)
async def test_what_is_not_a_runnable_pipeline_is_refused(
    catalog: Catalog, content: bytes, fragment: str
) -> None:
    with refused(INVALID, fragment):
        await register_pipeline(catalog.stub, content)


async def test_a_pipeline_over_4_mib_is_refused(catalog: Catalog) -> None:
    content = pipeline(note="x" * (4 * 1024 * 1024))
    with refused(INVALID, "at most 4194304 (4 MiB)"):
        await register_pipeline(catalog.stub, content)


async def test_get_and_list(catalog: Catalog) -> None:
    with refused(grpc.StatusCode.NOT_FOUND, "register it with RegisterPipeline"):
        await catalog.stub.GetPipeline(catalog_pb2.GetPipelineRequest(sha256="0" * 64))
    with refused(INVALID, "64 lowercase hex digits"):
        await catalog.stub.GetPipeline(catalog_pb2.GetPipelineRequest(sha256="ABC"))
    first = await register_pipeline(catalog.stub, pipeline(note="one"), name="one")
    second = await register_pipeline(catalog.stub, pipeline(note="two"), name="two")
    listed = (await catalog.stub.ListPipelines(catalog_pb2.ListPipelinesRequest())).pipelines
    assert [p.ref.sha256 for p in listed] == [second.ref.sha256, first.ref.sha256]
