"""The result sweep: deletes objects under `results/` that no catalog record
points at, once they are older than a grace period.

Every execution of a site writes under keys of its own
(`results/<plate>/<pipeline>/<well>/s<site>/a<attempt>-<execution>/…`) and
only the execution the catalog accepts is registered. The others (a worker
cut off by the network that finished after its task went to another worker,
a worker killed between its uploads and CompleteSiteJob, a run that failed
after uploading) leave orphans behind. They are never written over
registered objects; this sweep reclaims their space. The grace period keeps
objects whose execution may still register them (a worker waits out a
catalog outage before CompleteSiteJob), so it must be longer than any such
wait.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cellmesh import keys

from services.catalog.store import CatalogStore
from services.common.s3 import ObjectStore

log = logging.getLogger(__name__)

RESULTS_PREFIX = keys.RESULTS


@dataclass
class SweepReport:
    scanned: int = 0
    registered: int = 0
    too_young: int = 0
    orphans: int = 0
    deleted: int = 0

    def describe(self) -> str:
        return (
            f"{self.scanned} result objects: {self.registered} registered, "
            f"{self.orphans} orphans ({self.deleted} deleted), {self.too_young} orphans within the grace period kept"
        )


async def sweep_results(
    store: CatalogStore,
    objects: ObjectStore,
    grace_seconds: float,
    dry_run: bool = False,
    now: datetime | None = None,
) -> SweepReport:
    """One pass over `results/`. Objects registered in the catalog (as a
    site's current or past results) are never touched."""
    cutoff = (now or datetime.now(UTC)) - timedelta(seconds=grace_seconds)
    report = SweepReport()
    registered: dict[str, set[str] | None] = {}
    async for obj, modified in objects.list_objects(RESULTS_PREFIX):
        report.scanned += 1
        plate = obj.key[len(RESULTS_PREFIX) :].split("/", 1)[0]
        if plate not in registered:
            registered[plate] = await store.registered_result_keys(plate)
        keys = registered[plate]
        if keys is not None and obj.key in keys:
            report.registered += 1
            continue
        if modified.tzinfo is None:
            modified = modified.replace(tzinfo=UTC)
        if modified > cutoff:
            report.too_young += 1
            continue
        report.orphans += 1
        if not dry_run:
            await objects.delete(obj.key)
            report.deleted += 1
            log.info("swept orphan %s (%d bytes, written %s)", obj.key, obj.size, modified.isoformat())
    return report


async def sweep_periodically(
    store: CatalogStore,
    objects: ObjectStore,
    interval_seconds: float,
    grace_seconds: float,
    stop: asyncio.Event,
) -> None:
    """Runs a sweep every `interval_seconds` until `stop`; a failed pass is
    logged and tried again at the next interval."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), interval_seconds)
            return
        except TimeoutError:
            pass
        try:
            report = await sweep_results(store, objects, grace_seconds)
        except Exception as exc:
            log.warning("result sweep failed: %s; trying again in %.0f s", exc, interval_seconds)
            continue
        log.info("result sweep: %s", report.describe())
