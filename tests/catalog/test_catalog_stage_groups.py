"""Plate stages per group: a stage whose pipeline groups its image sets by a
metadata key has a job per group, run as soon as every site of that group is
in; the later stages' site jobs of a group wait for, and get the files of,
that group's job only, and a rerun of one group's job makes only that
group's later results stale."""

from __future__ import annotations

from typing import cast

import grpc
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from tests.catalog.conftest import Catalog
from tests.catalog.kit import Stub, claim_all, image, refused, register_pipeline, run_to_done
from tests.catalog.test_catalog_stages import ANALYSIS, ILLUM, complete, sites
from tests.common.test_cppipe import grouped

S = types_pb2
#: The batch of each well (a metadata key the microscope's file names carry).
BATCH = {"A01": "B1", "A02": "B1", "A03": "B2", "A04": "B2"}


async def workflow(stub: Stub, plate: str, *keys: str) -> tuple[catalog_pb2.Pipeline, catalog_pb2.Pipeline]:
    """A plate of 4 wells x 1 site running an illumination stage grouped by
    `keys`, then the analysis."""
    illum = await register_pipeline(stub, grouped(ILLUM.decode(), *keys).encode(), "illum")
    assert list(illum.group_by) == list(keys) and illum.scope == S.PIPELINE_SCOPE_PLATE
    analysis = await register_pipeline(stub, ANALYSIS, "analysis")
    await stub.CreatePlate(
        catalog_pb2.CreatePlateRequest(
            name=plate,
            channels=["DNA", "GFP"],
            layout=catalog_pb2.PlateLayout(rows=1, columns=4, sites_per_well=1),
            pipeline_sha256=illum.ref.sha256,
            reduce_with_failures=True,
        )
    )
    await stub.AddPlatePipeline(
        catalog_pb2.AddPlatePipelineRequest(plate=plate, pipeline_sha256=analysis.ref.sha256)
    )
    return illum, analysis


async def register(stub: Stub, plate: str, wells: list[str], channel: str) -> None:
    images = []
    for well in wells:
        img = image(plate, well, 0, channel)
        img.metadata["Batch"] = BATCH[well]
        images.append(img)
    await stub.RegisterImages(catalog_pb2.RegisterImagesRequest(images=images))


def groups(jobs: list[catalog_pb2.SiteJob]) -> dict[str, int]:
    return {j.metadata["Batch"]: j.state for j in jobs}


async def test_each_group_s_stage_runs_when_its_sites_are_in_and_releases_only_its_sites(
    catalog: Catalog,
) -> None:
    stub = catalog.stub
    illum, analysis = await workflow(stub, "G1", "Batch")
    await register(stub, "G1", ["A01", "A02"], "DNA")
    await register(stub, "G1", ["A01", "A02"], "GFP")
    # B1's sites are complete, but A03 and A04 have no image yet: they may be in B1 too.
    assert await claim_all(stub) == []
    assert groups(await sites(stub, "G1", illum.ref.sha256)) == {"B1": S.SITE_STATE_WAITING}
    await register(stub, "G1", ["A03", "A04"], "DNA")
    (stage,) = await claim_all(stub)
    assert stage.scope == S.PIPELINE_SCOPE_PLATE and stage.site.well == ""
    assert [(i.site.well, i.channel) for i in stage.images] == [
        ("A01", "DNA"),
        ("A01", "GFP"),
        ("A02", "DNA"),
        ("A02", "GFP"),
    ]
    assert groups(await sites(stub, "G1", illum.ref.sha256)) == {
        "B1": S.SITE_STATE_CLAIMED,
        "B2": S.SITE_STATE_WAITING,
    }
    await complete(stub, stage, "IllumDNA.npy")
    b1 = {f.name: f.object for f in (await sites(stub, "G1", illum.ref.sha256, True))[0].results}
    claims = await claim_all(stub)
    assert sorted(c.site.well for c in claims) == ["A01", "A02"]
    assert all({f.name: f.object for f in c.input_files} == b1 for c in claims)
    for claim in claims:
        await run_to_done(stub, claim)

    await register(stub, "G1", ["A03", "A04"], "GFP")
    (stage2,) = await claim_all(stub)  # B2's stage; its analysis sites wait for it
    assert sorted({i.site.well for i in stage2.images}) == ["A03", "A04"]
    assert [s.state for s in await sites(stub, "G1", analysis.ref.sha256)][2:] == [S.SITE_STATE_WAITING] * 2
    await complete(stub, stage2, "IllumDNA.npy")
    b2 = {f.name: f.object for f in (await sites(stub, "G1", illum.ref.sha256, True))[1].results}
    assert b2["IllumDNA.npy"].sha256 != b1["IllumDNA.npy"].sha256
    claims = await claim_all(stub)
    assert sorted(c.site.well for c in claims) == ["A03", "A04"]
    assert all({f.name: f.object for f in c.input_files} == b2 for c in claims)
    for claim in claims:
        await run_to_done(stub, claim)
    first = {s.site.well: s.results[0].object.key for s in await sites(stub, "G1", analysis.ref.sha256, True)}

    # A new illumination function for B2 only: B1's results stay, B2's run again.
    with refused(grpc.StatusCode.NOT_FOUND, "has no A09 site 0"):
        await stub.RequeueSites(
            catalog_pb2.RequeueSitesRequest(
                plate="G1",
                pipeline_sha256=illum.ref.sha256,
                sites=[S.SiteRef(plate="G1", well="A09", site=0)],
            )
        )
    reply = await stub.RequeueSites(
        catalog_pb2.RequeueSitesRequest(
            plate="G1", pipeline_sha256=illum.ref.sha256, sites=[S.SiteRef(plate="G1", well="A04", site=0)]
        )
    )
    assert reply.requeued == 1
    later = {s.site.well: s for s in await sites(stub, "G1", analysis.ref.sha256, True)}
    assert [later[w].state for w in ("A01", "A02")] == [S.SITE_STATE_DONE] * 2
    assert {w: later[w].results[0].object.key for w in ("A01", "A02")} == {
        w: first[w] for w in ("A01", "A02")
    }
    assert [later[w].state for w in ("A03", "A04")] == [S.SITE_STATE_WAITING] * 2
    assert not later["A03"].results and not later["A04"].results
    (again,) = await claim_all(stub)
    assert again.attempt == 2 and sorted({i.site.well for i in again.images}) == ["A03", "A04"]
    await complete(stub, again, "IllumDNA.npy")
    new_b2 = {f.name: f.object for f in (await sites(stub, "G1", illum.ref.sha256, True))[1].results}
    claims = await claim_all(stub)
    assert sorted(c.site.well for c in claims) == ["A03", "A04"]
    assert all({f.name: f.object for f in c.input_files} == new_b2 for c in claims)
    for claim in claims:
        await run_to_done(stub, claim)
    second = {
        s.site.well: s.results[0].object.key for s in await sites(stub, "G1", analysis.ref.sha256, True)
    }
    assert second["A01"] == first["A01"] and second["A03"] != first["A03"]
    keys = await catalog.store.registered_result_keys("G1")
    assert keys is not None and set(first.values()) | set(second.values()) <= keys  # nothing is forgotten


async def test_a_group_s_failed_stage_fails_only_that_group_s_sites(catalog: Catalog) -> None:
    stub = catalog.stub
    illum, analysis = await workflow(stub, "G2", "Well")
    # Groups by well are known from the layout: each well's stage runs once its site is in.
    await register(stub, "G2", ["A01"], "DNA")
    await register(stub, "G2", ["A01"], "GFP")
    (stage,) = await claim_all(stub)
    assert {i.site.well for i in stage.images} == {"A01"}
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
    wells = ["A02", "A03", "A04"]
    await register(stub, "G2", wells, "DNA")
    await register(stub, "G2", wells, "GFP")
    later = {s.site.well: s for s in await sites(stub, "G2", analysis.ref.sha256)}
    assert later["A01"].state == S.SITE_STATE_FAILED
    assert later["A01"].failure_class == S.FAILURE_CLASS_INPUT_PROBLEM
    assert "the plate stage 'illum' failed for Well=A01: IllumDNA cannot be calculated" in (
        later["A01"].failure_reason
    )
    assert all(later[w].state == S.SITE_STATE_WAITING for w in wells)
    claims = await claim_all(stub)
    assert len(claims) == 3 and all(c.scope == S.PIPELINE_SCOPE_PLATE for c in claims)
    for claim in claims:
        await complete(stub, claim, "IllumDNA.npy")
    claims = await claim_all(stub)
    assert sorted(c.site.well for c in claims) == wells
    # A replaced image of A02 runs A02's stage again, and only A02's analysis.
    for claim in claims:
        await run_to_done(stub, claim)
    replaced = image("G2", "A02", 0, "DNA", content=b"another")
    replaced.replace = True
    replaced.metadata["Batch"] = "B1"
    await stub.RegisterImages(catalog_pb2.RegisterImagesRequest(images=[replaced]))
    stage_jobs = {j.metadata["Well"]: j.state for j in await sites(stub, "G2", illum.ref.sha256)}
    assert stage_jobs == {
        "A01": S.SITE_STATE_FAILED,
        "A02": S.SITE_STATE_READY,
        "A03": S.SITE_STATE_DONE,
        "A04": S.SITE_STATE_DONE,
    }
    states = {s.site.well: s.state for s in await sites(stub, "G2", analysis.ref.sha256)}
    assert states == {
        "A01": S.SITE_STATE_FAILED,
        "A02": S.SITE_STATE_WAITING,
        "A03": S.SITE_STATE_DONE,
        "A04": S.SITE_STATE_DONE,
    }
    # Requeueing the failed group's stage reopens that group.
    reply = await stub.RequeueSites(
        catalog_pb2.RequeueSitesRequest(
            plate="G2", pipeline_sha256=illum.ref.sha256, sites=[S.SiteRef(plate="G2", well="A01", site=0)]
        )
    )
    assert reply.requeued == 1
    states = {s.site.well: s.state for s in await sites(stub, "G2", analysis.ref.sha256)}
    assert states["A01"] == S.SITE_STATE_WAITING
    assert sorted(c.images[0].site.well for c in await claim_all(stub)) == ["A01", "A02"]


async def test_a_site_without_the_key_waits_until_acquisition_finishes(catalog: Catalog) -> None:
    stub = catalog.stub
    illum = await register_pipeline(stub, grouped(ILLUM.decode(), "Batch").encode(), "illum")
    await stub.CreatePlate(
        catalog_pb2.CreatePlateRequest(name="G3", channels=["DNA", "GFP"], pipeline_sha256=illum.ref.sha256)
    )
    await register(stub, "G3", ["A01", "A03"], "DNA")
    await register(stub, "G3", ["A01"], "GFP")
    assert await claim_all(stub) == []  # more sites may come, of either batch
    await stub.FinishAcquisition(catalog_pb2.FinishAcquisitionRequest(plate="G3"))
    (stage,) = await claim_all(stub)
    assert {i.site.well for i in stage.images} == {"A01"}
    # A03 failed incomplete, so B2 has no site left: its job fails, and the plate settles.
    jobs = {j.metadata["Batch"]: j for j in await sites(stub, "G3", illum.ref.sha256)}
    assert jobs["B1"].state == S.SITE_STATE_CLAIMED
    assert jobs["B2"].state == S.SITE_STATE_FAILED
    assert jobs["B2"].failure_class == S.FAILURE_CLASS_INPUT_PROBLEM
    assert "no site of Batch=B2 has every channel" in jobs["B2"].failure_reason
