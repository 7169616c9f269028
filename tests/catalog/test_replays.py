"""Every mutating RPC replayed: a call whose reply was lost is made again by
its caller, and the second answer must be the first one (or say, in a field
meant for it, that nothing new happened), never a refusal or a different
outcome. Over a real gRPC server on SQLite and MariaDB."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2
from google.protobuf.message import Message

from tests.catalog.conftest import Catalog
from tests.catalog.kit import claim_all, pipeline, result_file, site_images
from tests.catalog.test_catalog_progress import claim_runs, report

FC = types_pb2


async def twice(call: Callable[[Any], Awaitable[Message]], request: Message, *ignore: str) -> Message:
    """Makes the call twice; the answers must be equal but for `ignore`d fields."""
    first = await call(request)
    second = await call(request)
    a, b = type(first)(), type(second)()
    a.CopyFrom(first)
    b.CopyFrom(second)
    for name in ignore:
        a.ClearField(name)  # type: ignore[arg-type]
        b.ClearField(name)  # type: ignore[arg-type]
    assert a == b, f"{type(request).__name__} replayed answered\n{second}\nafter\n{first}"
    return first


async def test_every_mutating_rpc_answers_a_replay_as_the_first_call(catalog: Catalog) -> None:
    stub = catalog.stub
    content = pipeline(images=("DNA", "GFP"))
    # RegisterPipeline: the same pipeline; `already_registered` says the replay added nothing.
    pipe = await twice(
        stub.RegisterPipeline,
        catalog_pb2.RegisterPipelineRequest(name="replayed", content=content),
        "already_registered",
    )
    sha = pipe.pipeline.ref.sha256  # type: ignore[attr-defined]
    layout = catalog_pb2.PlateLayout(rows=8, columns=12, sites_per_well=1, wells=["A01", "A02"])
    await twice(
        stub.CreatePlate,
        catalog_pb2.CreatePlateRequest(
            name="R1", channels=["DNA", "GFP"], layout=layout, pipeline_sha256=sha
        ),
    )
    images = [img for w in ("A01", "A02") for img in site_images("R1", w, 0, ["DNA", "GFP"])]
    # RegisterImages: the replay registers nothing new and says so per image
    # (UNCHANGED: same key, size and checksum); no site becomes ready twice.
    request = catalog_pb2.RegisterImagesRequest(images=images)
    first = await stub.RegisterImages(request)
    second = await stub.RegisterImages(request)
    assert [o for o in first.outcomes] == [catalog_pb2.REGISTRATION_OUTCOME_CREATED] * 4
    assert [o for o in second.outcomes] == [catalog_pb2.REGISTRATION_OUTCOME_UNCHANGED] * 4
    assert (first.sites_ready, second.sites_ready) == (2, 0)
    await twice(stub.FinishAcquisition, catalog_pb2.FinishAcquisitionRequest(plate="R1"))
    a, b = await claim_all(stub)
    await twice(
        stub.MarkSitesQueued,
        catalog_pb2.MarkSitesQueuedRequest(
            scheduler_id="s1",
            sites=[catalog_pb2.QueuedSite(site_job_id=c.site_job_id, attempt=c.attempt) for c in (a, b)],
        ),
    )
    for claim in (a, b):
        await twice(
            stub.StartSiteJob,
            catalog_pb2.StartSiteJobRequest(
                site_job_id=claim.site_job_id, attempt=1, worker_id="w1", execution_id=f"e{claim.site_job_id}"
            ),
            "detail",  # words for people; the decision and execution are the answer
        )
    await twice(
        stub.RenewSiteLease,
        catalog_pb2.RenewSiteLeaseRequest(
            site_job_id=a.site_job_id,
            attempt=1,
            worker_id="w1",
            lease_seconds=60,
            execution_id=f"e{a.site_job_id}",
        ),
    )
    done = await twice(
        stub.CompleteSiteJob,
        catalog_pb2.CompleteSiteJobRequest(
            site_job_id=a.site_job_id,
            attempt=1,
            worker_id="w1",
            execution_id=f"e{a.site_job_id}",
            results=[result_file(a, "Image.csv")],
        ),
    )
    assert done.recorded  # type: ignore[attr-defined]
    failed = await twice(
        stub.FailSiteJob,
        catalog_pb2.FailSiteJobRequest(
            site_job_id=b.site_job_id,
            attempt=1,
            worker_id="w1",
            execution_id=f"e{b.site_job_id}",
            failure_class=FC.FAILURE_CLASS_INPUT_PROBLEM,
            reason="unreadable",
        ),
    )
    assert failed.state == types_pb2.SITE_STATE_FAILED  # type: ignore[attr-defined]
    # RequeueSites of named sites puts them back once; a replay finds them back already.
    requeued = await twice(
        stub.RequeueSites,
        catalog_pb2.RequeueSitesRequest(plate="R1", sites=[b.site]),
    )
    assert requeued.requeued == 1  # type: ignore[attr-defined]
    (b2,) = await claim_all(stub)
    await stub.StartSiteJob(
        catalog_pb2.StartSiteJobRequest(site_job_id=b2.site_job_id, attempt=b2.attempt, worker_id="w1")
    )
    await stub.CompleteSiteJob(
        catalog_pb2.CompleteSiteJobRequest(
            site_job_id=b2.site_job_id,
            attempt=b2.attempt,
            worker_id="w1",
            results=[result_file(b2, "Image.csv")],
        )
    )
    (run,) = await claim_runs(catalog)
    await twice(stub.MarkRunsQueued, catalog_pb2.MarkRunsQueuedRequest(scheduler_id="s1", runs=[run]))
    registered_report = await twice(
        stub.RegisterPlateReport, catalog_pb2.RegisterPlateReportRequest(report=report(run))
    )
    assert registered_report.report.version == 1  # type: ignore[attr-defined]
