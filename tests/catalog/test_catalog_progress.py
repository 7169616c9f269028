"""Progress (once and streamed), FinishAcquisition, reduce claims and
plate report versions."""

from __future__ import annotations

import asyncio

import grpc
from cellmesh import keys
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2
from sqlalchemy import text, update

from services.catalog.models import SiteJobRow
from tests.catalog.conftest import Catalog
from tests.catalog.kit import claim_all, image, new_plate, ready_sites, refused, run_to_done, sha, site_images

PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


async def progress(catalog: Catalog, plate: str = "P1") -> catalog_pb2.PlateProgress:
    return (await catalog.stub.GetPlateProgress(catalog_pb2.GetPlateProgressRequest(plate=plate))).progress


async def claim_runs(catalog: Catalog, scheduler: str = "s1", lease: int = 60) -> list[catalog_pb2.RunClaim]:
    reply = await catalog.stub.ClaimReducibleRuns(
        catalog_pb2.ClaimReducibleRunsRequest(scheduler_id=scheduler, max_runs=10, lease_seconds=lease)
    )
    return list(reply.claims)


def report(run: catalog_pb2.RunClaim, sites: int = 2) -> catalog_pb2.PlateReport:
    data = f"{run.plate}/{run.generation}".encode()
    return catalog_pb2.PlateReport(
        plate=run.plate,
        pipeline_sha256=run.pipeline.sha256,
        generation=run.generation,
        files=[
            catalog_pb2.ReportFile(
                name="Nuclei.parquet",
                kind=catalog_pb2.REPORT_FILE_KIND_OBJECT_TABLE_PARQUET,
                object=types_pb2.ObjectRef(
                    key=f"{keys.run_reports(run.plate, run.pipeline.sha256)}g{run.generation}/Nuclei.parquet",
                    size=len(data),
                    sha256=sha(data),
                ),
            )
        ],
        wells=sites,
        sites=sites,
    )


async def register_report(
    catalog: Catalog, run: catalog_pb2.RunClaim
) -> catalog_pb2.RegisterPlateReportResponse:
    return await catalog.stub.RegisterPlateReport(catalog_pb2.RegisterPlateReportRequest(report=report(run)))


async def test_progress_counts(catalog: Catalog) -> None:
    layout = catalog_pb2.PlateLayout(rows=8, columns=12, sites_per_well=1, wells=["A01", "A02", "A03", "A04"])
    _plate, pipe = await new_plate(catalog.stub, "P1", layout=layout)
    await ready_sites(catalog.stub, "P1", 3)
    a, b, c = await claim_all(catalog.stub, lease=60)
    await catalog.stub.MarkSitesQueued(
        catalog_pb2.MarkSitesQueuedRequest(
            scheduler_id="s1", sites=[catalog_pb2.QueuedSite(site_job_id=b.site_job_id, attempt=1)]
        )
    )
    await run_to_done(catalog.stub, c)
    p = await progress(catalog)
    assert (p.total, p.waiting, p.ready, p.queued, p.running, p.done, p.failed) == (4, 1, 1, 1, 0, 1, 0)
    assert p.pipeline_sha256 == pipe.ref.sha256 and p.report_version == 0 and not p.complete
    assert a.site.well == "A01"


async def test_kept_counts_follow_every_change_and_a_change_behind_them_is_found(catalog: Catalog) -> None:
    """Progress reads counts the database's triggers keep; a job changed with
    the triggers gone is reported by the check, and the count is put right
    again by hand (the fixture's teardown checks every test's runs)."""
    layout = catalog_pb2.PlateLayout(rows=8, columns=12, sites_per_well=1, wells=["A01", "A02", "A03"])
    await new_plate(catalog.stub, "P1", layout=layout)
    await ready_sites(catalog.stub, "P1", 3)
    for claim in await claim_all(catalog.stub):
        await run_to_done(catalog.stub, claim)
    p = await progress(catalog)
    assert (p.total, p.ready, p.done) == (3, 0, 3)
    assert await catalog.store.run_count_mismatches() == []
    async with catalog.store.engine.begin() as conn:
        await conn.execute(text("DROP TRIGGER run_counts_on_job_update"))
        await conn.execute(update(SiteJobRow).values(state=int(types_pb2.SITE_STATE_READY)))
    problems = await catalog.store.run_count_mismatches()
    assert len(problems) == 1 and "counted" in problems[0], problems
    async with catalog.store.engine.begin() as conn:
        await conn.execute(update(SiteJobRow).values(state=int(types_pb2.SITE_STATE_DONE)))
    assert await catalog.store.run_count_mismatches() == []


async def test_watch_sends_each_change_and_ends_when_complete(catalog: Catalog) -> None:
    layout = catalog_pb2.PlateLayout(rows=8, columns=12, sites_per_well=1, wells=["A01", "A02"])
    await new_plate(catalog.stub, "P1", layout=layout)
    stream = catalog.stub.WatchPlateProgress(catalog_pb2.WatchPlateProgressRequest(plate="P1"))
    received: list[catalog_pb2.PlateProgress] = []

    async def next_message(timeout: float = 0.4) -> catalog_pb2.PlateProgress:
        # Shorter than the server's poll: the change notification must wake it.
        reply = await asyncio.wait_for(stream.read(), timeout)
        assert isinstance(reply, catalog_pb2.WatchPlateProgressResponse)
        received.append(reply.progress)
        return reply.progress

    first = await next_message(2)
    assert (first.total, first.waiting) == (2, 2)
    await catalog.stub.RegisterImages(
        catalog_pb2.RegisterImagesRequest(images=site_images("P1", "A01", 0, ["DNA", "GFP"]))
    )
    assert (await next_message()).ready == 1
    await catalog.stub.RegisterImages(
        catalog_pb2.RegisterImagesRequest(images=site_images("P1", "A02", 0, ["DNA", "GFP"]))
    )
    assert (await next_message()).ready == 2
    for claim in await claim_all(catalog.stub):
        await run_to_done(catalog.stub, claim)
    while (await next_message()).done < 2:
        pass
    (run,) = await claim_runs(catalog)
    await register_report(catalog, run)
    while not (last := await next_message()).complete:
        pass
    assert last.report_version == 1 and last.done == 2
    assert await asyncio.wait_for(stream.read(), 2) is grpc.aio.EOF
    assert all(a != b for a, b in zip(received, received[1:], strict=False)), "only changes are sent"


async def test_watch_ends_when_the_client_hangs_up(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    stream = catalog.stub.WatchPlateProgress(catalog_pb2.WatchPlateProgressRequest(plate="P1"))
    first = await stream.read()
    assert isinstance(first, catalog_pb2.WatchPlateProgressResponse) and first.progress.total == 0
    stream.cancel()
    await asyncio.sleep(0.1)
    assert stream.cancelled()
    missing = catalog.stub.WatchPlateProgress(catalog_pb2.WatchPlateProgressRequest(plate="nope"))
    with refused(grpc.StatusCode.NOT_FOUND, "plate 'nope' does not exist"):
        await missing.read()


async def test_finish_acquisition_fails_incomplete_sites(catalog: Catalog) -> None:
    layout = catalog_pb2.PlateLayout(rows=8, columns=12, sites_per_well=1, wells=["A01", "A02", "A03"])
    await new_plate(catalog.stub, "P1", layout=layout, reduce_with_failures=True)
    await catalog.stub.RegisterImages(
        catalog_pb2.RegisterImagesRequest(
            images=[*site_images("P1", "A01", 0, ["DNA", "GFP"]), image("P1", "A02", 0, "DNA")]
        )
    )
    reply = await catalog.stub.FinishAcquisition(catalog_pb2.FinishAcquisitionRequest(plate="P1"))
    assert reply.plate.acquisition_finished and reply.plate.sites_known
    assert [(s.well, s.site) for s in reply.incomplete_sites] == [("A02", 0), ("A03", 0)]
    sites = {
        s.site.well: s for s in (await catalog.stub.ListSites(catalog_pb2.ListSitesRequest(plate="P1"))).sites
    }
    assert sites["A01"].state == types_pb2.SITE_STATE_READY
    for well, reason in (("A02", "missing channel(s) GFP"), ("A03", "never imaged")):
        assert sites[well].state == types_pb2.SITE_STATE_FAILED
        assert sites[well].failure_class == types_pb2.FAILURE_CLASS_INPUT_PROBLEM
        assert sites[well].failure_reason == reason
    again = await catalog.stub.FinishAcquisition(catalog_pb2.FinishAcquisitionRequest(plate="P1"))
    assert [(s.well, s.site) for s in again.incomplete_sites] == [("A02", 0), ("A03", 0)]
    (claim,) = await claim_all(catalog.stub)
    await run_to_done(catalog.stub, claim)
    (run,) = await claim_runs(catalog)  # failures allowed on this plate
    assert run.generation == 3


async def test_reduce_claims_once_and_versions_after_a_rerun(catalog: Catalog) -> None:
    _plate, pipe = await new_plate(catalog.stub, "P1")  # no layout: sites known only after FinishAcquisition
    await ready_sites(catalog.stub, "P1", 2)
    claims = await claim_all(catalog.stub)
    for claim in claims:
        await run_to_done(catalog.stub, claim)
    assert await claim_runs(catalog) == []
    await catalog.stub.FinishAcquisition(catalog_pb2.FinishAcquisitionRequest(plate="P1"))
    with refused(
        grpc.StatusCode.NOT_FOUND, f"plate P1 has no report yet for pipeline test ({pipe.ref.sha256[:12]})"
    ):
        await catalog.stub.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate="P1"))

    runs = await asyncio.gather(claim_runs(catalog, "s1"), claim_runs(catalog, "s2"))
    (run,) = runs[0] + runs[1]
    assert (run.plate, run.pipeline, run.generation) == ("P1", pipe.ref, 2)
    marked = await catalog.stub.MarkRunsQueued(
        catalog_pb2.MarkRunsQueuedRequest(scheduler_id="s1", runs=[run])
    )
    assert marked.marked == 1
    assert await claim_runs(catalog) == []

    first = await register_report(catalog, run)
    assert first.recorded and first.report.version == 1 and first.report.generation == 2
    replay = await register_report(catalog, run)
    assert replay.recorded and replay.report == first.report  # the same call again
    other = report(run)
    other.files[0].object.key = other.files[0].object.key.replace("Nuclei", "Other")
    duplicate = await catalog.stub.RegisterPlateReport(catalog_pb2.RegisterPlateReportRequest(report=other))
    assert not duplicate.recorded and duplicate.report == first.report  # another reducer's: not recorded
    assert (await progress(catalog)).complete
    assert await claim_runs(catalog) == []

    # Re-run one site: a new generation, reduced again into version 2.
    await catalog.stub.RequeueSites(catalog_pb2.RequeueSitesRequest(plate="P1", sites=[claims[0].site]))
    assert not (await progress(catalog)).complete
    assert await claim_runs(catalog) == []
    (claim,) = await claim_all(catalog.stub)
    await run_to_done(catalog.stub, claim)
    (rerun,) = await claim_runs(catalog)
    assert rerun.generation == 3
    second = await register_report(catalog, rerun)
    assert second.recorded and second.report.version == 2
    latest = (await catalog.stub.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate="P1"))).report
    assert latest.version == 2 and latest.generation == 3 and latest.files[0].name == "Nuclei.parquet"
    v1 = (await catalog.stub.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate="P1", version=1))).report
    assert v1 == first.report
    with refused(grpc.StatusCode.NOT_FOUND, "no report version 7", "the latest is 2"):
        await catalog.stub.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate="P1", version=7))
    with refused(PRECONDITION, "generation 1 is older than the latest report's generation 3"):
        await register_report(catalog, catalog_pb2.RunClaim(plate="P1", pipeline=pipe.ref, generation=1))
    with refused(PRECONDITION, "generation 9 is ahead"):
        await register_report(catalog, catalog_pb2.RunClaim(plate="P1", pipeline=pipe.ref, generation=9))
    with refused(grpc.StatusCode.INVALID_ARGUMENT, "generation is required"):
        await register_report(catalog, catalog_pb2.RunClaim(plate="P1", pipeline=pipe.ref, generation=0))


async def test_failed_sites_block_reduce_unless_the_plate_allows_them(catalog: Catalog) -> None:
    layout = catalog_pb2.PlateLayout(rows=8, columns=12, sites_per_well=1, wells=["A01", "A02"])
    for name, allow in (("strict", False), ("lenient", True)):
        await new_plate(catalog.stub, name, layout=layout, reduce_with_failures=allow)
        await ready_sites(catalog.stub, name, 2)
    for claim in await claim_all(catalog.stub):
        await catalog.stub.StartSiteJob(
            catalog_pb2.StartSiteJobRequest(site_job_id=claim.site_job_id, attempt=1)
        )
        if claim.site.well == "A01":
            await catalog.stub.FailSiteJob(
                catalog_pb2.FailSiteJobRequest(
                    site_job_id=claim.site_job_id,
                    attempt=1,
                    failure_class=types_pb2.FAILURE_CLASS_INPUT_PROBLEM,
                    reason="corrupt",
                )
            )
        else:
            await catalog.stub.CompleteSiteJob(
                catalog_pb2.CompleteSiteJobRequest(site_job_id=claim.site_job_id, attempt=1)
            )
    runs = await claim_runs(catalog, lease=1)
    assert [r.plate for r in runs] == ["lenient"]
    # An unconfirmed claim is released when its lease runs out.
    await asyncio.sleep(1.2)
    assert [r.plate for r in await claim_runs(catalog)] == ["lenient"]
    strict = await progress(catalog, "strict")
    assert (strict.done, strict.failed, strict.complete) == (1, 1, False)
