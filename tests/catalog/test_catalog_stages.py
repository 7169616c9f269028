"""Workflows of stages: a plate-scope pipeline runs once per plate when every
site is in, and the stages after it wait for its files (the plate's
artifacts), get them as input files, and run again when it does."""

from __future__ import annotations

from typing import cast

import grpc
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from tests.catalog.conftest import Catalog
from tests.catalog.kit import (
    Stub,
    claim_all,
    pipeline,
    refused,
    register_pipeline,
    result_file,
    run_to_done,
    site_images,
)

ALL = "Calculate function for each image individually, or based on all images?"
ILLUM = pipeline(extra=[("CorrectIlluminationCalculate", [(ALL, "All: Across cycles")])], note="illum")
ANALYSIS = pipeline(note="analysis")
S = types_pb2


async def workflow(stub: Stub, plate: str = "W1") -> tuple[catalog_pb2.Pipeline, catalog_pb2.Pipeline]:
    """A plate of 2 wells x 1 site running the illumination stage, then the analysis."""
    illum = await register_pipeline(stub, ILLUM, "illum")
    analysis = await register_pipeline(stub, ANALYSIS, "analysis")
    await stub.CreatePlate(
        catalog_pb2.CreatePlateRequest(
            name=plate,
            channels=["DNA", "GFP"],
            layout=catalog_pb2.PlateLayout(rows=1, columns=2, sites_per_well=1),
            pipeline_sha256=illum.ref.sha256,
            reduce_with_failures=True,
        )
    )
    added = await stub.AddPlatePipeline(
        catalog_pb2.AddPlatePipelineRequest(plate=plate, pipeline_sha256=analysis.ref.sha256)
    )
    assert list(added.plate.pipeline_sha256) == [illum.ref.sha256, analysis.ref.sha256]
    return illum, analysis


async def register(stub: Stub, plate: str, well: str) -> None:
    await stub.RegisterImages(
        catalog_pb2.RegisterImagesRequest(images=site_images(plate, well, 0, ["DNA", "GFP"]))
    )


async def sites(stub: Stub, plate: str, sha: str, with_results: bool = False) -> list[catalog_pb2.SiteJob]:
    reply = await stub.ListSites(
        catalog_pb2.ListSitesRequest(plate=plate, pipeline_sha256=sha, with_results=with_results)
    )
    return list(reply.sites)


async def complete(stub: Stub, claim: catalog_pb2.SiteClaim, *names: str) -> None:
    start = await stub.StartSiteJob(
        catalog_pb2.StartSiteJobRequest(site_job_id=claim.site_job_id, attempt=claim.attempt, worker_id="w1")
    )
    assert start.decision == catalog_pb2.START_DECISION_RUN
    await stub.CompleteSiteJob(
        catalog_pb2.CompleteSiteJobRequest(
            site_job_id=claim.site_job_id,
            attempt=claim.attempt,
            worker_id="w1",
            results=[result_file(claim, n) for n in names],
            execution_id=start.execution_id,
        )
    )


async def test_the_scope_is_read_from_the_modules_or_asked_for(catalog: Catalog) -> None:
    illum = await register_pipeline(catalog.stub, ILLUM, "illum")
    assert illum.scope == S.PIPELINE_SCOPE_PLATE
    assert list(illum.scope_reasons) == [
        "CorrectIlluminationCalculate (module 6) calculates its illumination function from all images "
        "('All: Across cycles')"
    ]
    analysis = await register_pipeline(catalog.stub, ANALYSIS)
    assert analysis.scope == S.PIPELINE_SCOPE_SITE and not analysis.scope_reasons
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "cannot run one site at a time", "CorrectIllumination"):
        await catalog.stub.RegisterPipeline(
            catalog_pb2.RegisterPipelineRequest(
                content=pipeline(extra=[("CorrectIlluminationCalculate", [(ALL, "All: First cycle")])]),
                scope=S.PIPELINE_SCOPE_SITE,
            )
        )
    asked = await catalog.stub.RegisterPipeline(
        catalog_pb2.RegisterPipelineRequest(content=pipeline(note="asked"), scope=S.PIPELINE_SCOPE_PLATE)
    )
    assert asked.pipeline.scope == S.PIPELINE_SCOPE_PLATE
    assert list(asked.pipeline.scope_reasons) == ["asked for at registration"]
    with refused(grpc.StatusCode.FAILED_PRECONDITION, "registered with scope PLATE already"):
        await catalog.stub.RegisterPipeline(
            catalog_pb2.RegisterPipelineRequest(content=pipeline(note="asked"), scope=S.PIPELINE_SCOPE_SITE)
        )


async def test_a_plate_stage_runs_once_every_site_is_in_and_releases_the_next_stage(catalog: Catalog) -> None:
    stub = catalog.stub
    illum, analysis = await workflow(stub)
    await register(stub, "W1", "A01")
    # A01 is complete, but the stage needs the whole plate and the analysis needs the stage.
    assert await claim_all(stub) == []
    (analysis_a01, analysis_a02) = await sites(stub, "W1", analysis.ref.sha256)
    assert analysis_a01.state == S.SITE_STATE_WAITING
    await register(stub, "W1", "A02")
    (stage,) = await claim_all(stub)
    assert stage.scope == S.PIPELINE_SCOPE_PLATE
    assert (stage.site.plate, stage.site.well) == ("W1", "")
    assert [(i.site.well, i.channel) for i in stage.images] == [
        ("A01", "DNA"),
        ("A01", "GFP"),
        ("A02", "DNA"),
        ("A02", "GFP"),
    ]
    assert not stage.input_files
    (job,) = await sites(stub, "W1", illum.ref.sha256)
    assert job.scope == S.PIPELINE_SCOPE_PLATE and job.site.well == "" and job.state == S.SITE_STATE_CLAIMED

    await complete(stub, stage, "IllumDNA.npy", "IllumGFP.npy")
    claims = await claim_all(stub)
    assert sorted(c.site.well for c in claims) == ["A01", "A02"]
    artifacts = {f.name: f.object for f in (await sites(stub, "W1", illum.ref.sha256, True))[0].results}
    for claim in claims:
        assert claim.scope == S.PIPELINE_SCOPE_SITE and claim.pipeline.sha256 == analysis.ref.sha256
        assert {f.name: f.object for f in claim.input_files} == artifacts
        await run_to_done(stub, claim)
    # The plate's progress follows the analysis, not the stage before it.
    progress = (await stub.GetPlateProgress(catalog_pb2.GetPlateProgressRequest(plate="W1"))).progress
    assert progress.pipeline_sha256 == analysis.ref.sha256 and progress.done == 2
    stage_progress = (
        await stub.GetPlateProgress(
            catalog_pb2.GetPlateProgressRequest(plate="W1", pipeline_sha256=illum.ref.sha256)
        )
    ).progress
    assert stage_progress.complete and stage_progress.report_version == 0
    # Only the analysis is reduced.
    runs = await stub.ClaimReducibleRuns(
        catalog_pb2.ClaimReducibleRunsRequest(scheduler_id="s1", max_runs=10)
    )
    assert [r.pipeline.sha256 for r in runs.claims] == [analysis.ref.sha256]


async def test_a_stage_run_again_makes_the_later_results_stale(catalog: Catalog) -> None:
    stub = catalog.stub
    illum, analysis = await workflow(stub)
    await register(stub, "W1", "A01")
    await register(stub, "W1", "A02")
    (stage,) = await claim_all(stub)
    await complete(stub, stage, "IllumDNA.npy")
    for claim in await claim_all(stub):
        await run_to_done(stub, claim)
    first = {s.site.well: s.results[0].object.key for s in await sites(stub, "W1", analysis.ref.sha256, True)}

    with refused(grpc.StatusCode.INVALID_ARGUMENT, "is a plate stage", "requeue it without sites"):
        await stub.RequeueSites(
            catalog_pb2.RequeueSitesRequest(
                plate="W1",
                pipeline_sha256=illum.ref.sha256,
                sites=[S.SiteRef(plate="W1", well="A01", site=0)],
            )
        )
    reply = await stub.RequeueSites(
        catalog_pb2.RequeueSitesRequest(plate="W1", pipeline_sha256=illum.ref.sha256)
    )
    assert reply.requeued == 1
    # The analysis waits for the new illumination function; its results are past results now.
    later = await sites(stub, "W1", analysis.ref.sha256, True)
    assert [s.state for s in later] == [S.SITE_STATE_WAITING] * 2 and not any(s.results for s in later)
    (again,) = await claim_all(stub)
    assert again.scope == S.PIPELINE_SCOPE_PLATE and again.attempt == 2
    await complete(stub, again, "IllumDNA.npy")
    claims = await claim_all(stub)
    assert len(claims) == 2
    (new_artifact,) = (await sites(stub, "W1", illum.ref.sha256, True))[0].results
    assert all([f.object for f in c.input_files] == [new_artifact.object] for c in claims)
    for claim in claims:
        await run_to_done(stub, claim)
    second = {
        s.site.well: s.results[0].object.key for s in await sites(stub, "W1", analysis.ref.sha256, True)
    }
    assert set(first.values()).isdisjoint(second.values())
    keys = await catalog.store.registered_result_keys("W1")
    assert keys is not None and set(first.values()) | set(second.values()) <= keys  # nothing is forgotten


async def test_a_stage_that_fails_for_good_fails_the_later_stages_with_its_reason(catalog: Catalog) -> None:
    stub = catalog.stub
    illum, analysis = await workflow(stub)
    await register(stub, "W1", "A01")
    await register(stub, "W1", "A02")
    (stage,) = await claim_all(stub)
    start = await stub.StartSiteJob(
        catalog_pb2.StartSiteJobRequest(site_job_id=stage.site_job_id, attempt=stage.attempt, worker_id="w1")
    )
    await stub.FailSiteJob(
        catalog_pb2.FailSiteJobRequest(
            site_job_id=stage.site_job_id,
            attempt=stage.attempt,
            worker_id="w1",
            failure_class=cast("types_pb2.FailureClass.ValueType", S.FAILURE_CLASS_INPUT_PROBLEM),
            reason="IllumDNA cannot be calculated",
            execution_id=start.execution_id,
        )
    )
    later = await sites(stub, "W1", analysis.ref.sha256)
    assert [s.state for s in later] == [S.SITE_STATE_FAILED] * 2
    assert all(
        s.failure_class == S.FAILURE_CLASS_INPUT_PROBLEM
        and "the plate stage 'illum' failed: IllumDNA cannot be calculated" in s.failure_reason
        for s in later
    )
    progress = (await stub.GetPlateProgress(catalog_pb2.GetPlateProgressRequest(plate="W1"))).progress
    assert progress.failed == 2  # settled: the plate is not stuck
    # Requeueing the stage opens the way again.
    await stub.RequeueSites(catalog_pb2.RequeueSitesRequest(plate="W1", pipeline_sha256=illum.ref.sha256))
    assert [s.state for s in await sites(stub, "W1", analysis.ref.sha256)] == [S.SITE_STATE_WAITING] * 2
    (again,) = await claim_all(stub)
    await complete(stub, again, "IllumDNA.npy")
    assert len(await claim_all(stub)) == 2


async def test_a_plate_without_a_layout_runs_its_stage_when_acquisition_finishes(catalog: Catalog) -> None:
    stub = catalog.stub
    illum = await register_pipeline(stub, ILLUM, "illum")
    await stub.CreatePlate(
        catalog_pb2.CreatePlateRequest(name="W2", channels=["DNA", "GFP"], pipeline_sha256=illum.ref.sha256)
    )
    await register(stub, "W2", "B03")
    assert await claim_all(stub) == []  # more sites may come
    await stub.FinishAcquisition(catalog_pb2.FinishAcquisitionRequest(plate="W2"))
    (stage,) = await claim_all(stub)
    assert [i.site.well for i in stage.images] == ["B03", "B03"]


async def test_a_replaced_image_runs_the_stage_and_everything_after_it_again(catalog: Catalog) -> None:
    stub = catalog.stub
    illum, analysis = await workflow(stub)
    await register(stub, "W1", "A01")
    await register(stub, "W1", "A02")
    (stage,) = await claim_all(stub)
    await complete(stub, stage, "IllumDNA.npy")
    for claim in await claim_all(stub):
        await run_to_done(stub, claim)
    replaced = site_images("W1", "A01", 0, ["DNA"])[0]
    replaced.object.sha256 = "0" * 64
    replaced.replace = True
    await stub.RegisterImages(catalog_pb2.RegisterImagesRequest(images=[replaced]))
    (job,) = await sites(stub, "W1", illum.ref.sha256)
    assert job.state == S.SITE_STATE_READY
    assert [s.state for s in await sites(stub, "W1", analysis.ref.sha256)] == [S.SITE_STATE_WAITING] * 2
    (again,) = await claim_all(stub)
    assert again.scope == S.PIPELINE_SCOPE_PLATE


async def test_registration_reports_the_keys_the_groups_module_groups_by(catalog: Catalog) -> None:
    from tests.common.test_cppipe import grouped

    text = ILLUM.decode()
    by_well = await register_pipeline(catalog.stub, grouped(text, "Well").encode(), "illum-per-well")
    assert list(by_well.group_by) == ["Well"]
    assert by_well.scope == S.PIPELINE_SCOPE_PLATE
    two = await register_pipeline(catalog.stub, grouped(text, "Plate", "Compound").encode(), "illum-2")
    assert list(two.group_by) == ["Plate", "Compound"]
    got = await catalog.stub.GetPipeline(catalog_pb2.GetPipelineRequest(sha256=by_well.ref.sha256))
    assert list(got.pipeline.group_by) == ["Well"]
    assert list((await register_pipeline(catalog.stub, ILLUM, "illum")).group_by) == []
