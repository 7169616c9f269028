"""The result sweep deletes objects no catalog record points at, after a grace
period, and never a registered one (current or past results)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cellmesh import keys as cellmesh_keys
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.common.v1 import types_pb2

from services.catalog.sweep import sweep_results
from services.common.s3 import ObjectExists, ObjectStore
from services.common.settings import S3Settings
from tests.catalog.conftest import Catalog
from tests.catalog.kit import claim_all, claim_results, new_plate, ready_sites

LATER = datetime.now(UTC) + timedelta(hours=2)


async def finish_with(
    catalog: Catalog, claim: catalog_pb2.SiteClaim, execution: str, body: bytes
) -> list[str]:
    """Starts the claim as `execution`, stores two result objects under its
    own prefix and registers them; returns their keys."""
    await catalog.stub.StartSiteJob(
        catalog_pb2.StartSiteJobRequest(
            site_job_id=claim.site_job_id, attempt=claim.attempt, worker_id="w", execution_id=execution
        )
    )
    files = []
    for name in ("Image.csv", "Nuclei.csv"):
        key = f"{cellmesh_keys.execution_results(claim_results(claim), claim.attempt, execution)}/{name}"
        obj = await catalog.objects.put_bytes(key, body + name.encode(), if_absent=True)
        files.append(
            catalog_pb2.ResultFile(
                name=name, object=types_pb2.ObjectRef(key=key, size=obj.size, sha256=obj.sha256)
            )
        )
    await catalog.stub.CompleteSiteJob(
        catalog_pb2.CompleteSiteJobRequest(
            site_job_id=claim.site_job_id,
            attempt=claim.attempt,
            worker_id="w",
            results=files,
            execution_id=execution,
        )
    )
    return [f.object.key for f in files]


async def keys(objects: ObjectStore) -> set[str]:
    return {o.key async for o in objects.list_keys("results/")}


async def test_sweep_removes_orphans_and_nothing_registered(catalog: Catalog) -> None:
    await new_plate(catalog.stub, "P1")
    await ready_sites(catalog.stub, "P1", 2)
    first, second = await claim_all(catalog.stub)
    registered = await finish_with(catalog, first, "e1", b"winner")
    # A losing execution of the same attempt (cut off, finished late): its
    # objects sit beside the winner's, under keys of their own.
    loser = f"{cellmesh_keys.execution_results(claim_results(first), first.attempt, 'e0')}/Image.csv"
    await catalog.objects.put_bytes(loser, b"late bytes")
    # A site that was done, then requeued and run again: both runs stay registered.
    past = await finish_with(catalog, second, "e2", b"first run")
    await catalog.stub.RequeueSites(catalog_pb2.RequeueSitesRequest(plate="P1", sites=[second.site]))
    (again,) = await claim_all(catalog.stub)
    current = await finish_with(catalog, again, "e3", b"second run")
    # Objects of a plate the catalog does not know are orphans too.
    stray = "results/NOPLATE/p/A01/s0/a1-e9/Image.csv"
    await catalog.objects.put_bytes(stray, b"stray")

    young = await sweep_results(catalog.store, catalog.objects, grace_seconds=3600)
    assert (young.orphans, young.too_young, young.deleted) == (0, 2, 0)
    assert {loser, stray} <= await keys(catalog.objects)

    dry = await sweep_results(catalog.store, catalog.objects, grace_seconds=3600, dry_run=True, now=LATER)
    assert (dry.orphans, dry.deleted) == (2, 0)

    swept = await sweep_results(catalog.store, catalog.objects, grace_seconds=3600, now=LATER)
    assert (swept.scanned, swept.registered, swept.orphans, swept.deleted) == (8, 6, 2, 2)
    assert await keys(catalog.objects) == {*registered, *past, *current}
    for key in [*registered, *past, *current]:
        data = await catalog.objects.get_bytes(key)
        assert data.endswith((b"Image.csv", b"Nuclei.csv"))


async def test_a_registered_object_is_never_written_over(catalog: Catalog) -> None:
    key = "results/P1/p/A01/s0/a1-e1/Image.csv"
    first = await catalog.objects.put_bytes(key, b"registered bytes", if_absent=True)
    # The same bytes again (a put retried after its reply was lost) is fine.
    assert (await catalog.objects.put_bytes(key, b"registered bytes", if_absent=True)) == first
    with pytest.raises(ObjectExists, match="another object is stored under this key"):
        await catalog.objects.put_bytes(key, b"other bytes", if_absent=True)
    assert await catalog.objects.get_bytes(key, expected_sha256=first.sha256) == b"registered bytes"


def test_sweep_command_reports_what_it_would_delete(tmp_path: Path, s3_settings: S3Settings) -> None:
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/c.db",
        "S3_ENDPOINT_URL": s3_settings.endpoint_url or "",
        "S3_BUCKET": s3_settings.bucket,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "PATH": "/usr/bin:/bin",
    }

    def catalog_command(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.catalog", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    migrated = catalog_command("migrate")
    assert migrated.returncode == 0, migrated.stderr
    no_bucket = catalog_command("sweep", "--dry-run")
    assert no_bucket.returncode == 2
    assert "sweep stopped: object store misconfigured (list results/" in no_bucket.stderr
    assert "NoSuchBucket" in no_bucket.stderr and "set S3_BUCKET" in no_bucket.stderr
    assert "check S3_ENDPOINT_URL and S3_BUCKET" in no_bucket.stderr

    async def make_bucket() -> None:
        async with ObjectStore(s3_settings) as objects:
            await objects.ensure_bucket()
            await objects.put_bytes("results/P9/p/A01/s0/a1-e1/Image.csv", b"orphan")

    asyncio.run(make_bucket())
    ran = catalog_command("sweep", "--dry-run", "--grace-seconds", "0")
    assert ran.returncode == 0, ran.stderr
    assert "dry run, nothing deleted: 1 result objects: 0 registered, 1 orphans (0 deleted)" in ran.stdout
