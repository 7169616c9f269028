"""The catalog service: settings, wiring and the serve/stop sequence."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cellmesh.catalog.v1 import catalog_pb2_grpc

from services.catalog import migrate
from services.catalog.lifecycle import Policy
from services.catalog.servicer import SERVICE_NAME, CatalogServicer
from services.catalog.store import CatalogStore
from services.catalog.sweep import sweep_periodically, sweep_results
from services.common.auth import MeshAuth
from services.common.limits import Limits
from services.common.s3 import ObjectStore, ObjectStoreError, ObjectStoreMisconfigured
from services.common.server import GrpcServer, Registration, stop_event_on_signals
from services.common.settings import (
    COMMON_VARS,
    S3_VARS,
    S3Settings,
    Var,
    load,
    port,
    positive_float,
    positive_int,
)

log = logging.getLogger(__name__)

DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///var/catalog.db"
HEALTH_INTERVAL_S = 10.0


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 1 or 0")


def _seconds(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError("must be 0 or more seconds")
    return value


DATABASE_VARS = (
    Var("DATABASE_URL", DEFAULT_DATABASE_URL, help="e.g. mysql+asyncmy://user:pass@host:3306/cellmesh"),
    Var("LOG_LEVEL", "INFO"),
)
CATALOG_VARS = (
    *COMMON_VARS,
    *S3_VARS,
    Var("DATABASE_URL", DEFAULT_DATABASE_URL, help="e.g. mysql+asyncmy://user:pass@host:3306/cellmesh"),
    Var("GRPC_PORT", "50051", port),
    Var("MAX_ATTEMPTS", "3", positive_int, "CellProfiler attempts per site before it fails for good"),
    Var("CATALOG_MIGRATE_ON_START", "1", _flag, "1 to upgrade the database schema before serving"),
    Var(
        "RETRY_BASE_S",
        "5",
        positive_float,
        "first retry delay of a failed site; doubles per attempt, jittered",
    ),
    Var("RETRY_MAX_S", "300", positive_float, "longest retry delay of a failed site"),
    Var(
        "SITE_TRANSIENT_BUDGET_S",
        "900",
        positive_float,
        "how long a site may keep failing transiently (store or network trouble) before it is charged as TIMEOUT",
    ),
    Var(
        "QUEUE_DEADLINE_S",
        "1800",
        positive_float,
        "a queued site no worker started within this is presumed lost by the broker and issued again",
    ),
    Var(
        "REDUCE_DEADLINE_S",
        "1800",
        positive_float,
        "a queued reduce that registered no report within this is issued again (keep it above the longest reduce); "
        "after MAX_ATTEMPTS it fails",
    ),
    Var(
        "START_LEASE_S",
        "600",
        positive_float,
        "deadline of a started site whose worker gave no lease of its own",
    ),
    Var(
        "SWEEP_INTERVAL_S",
        "3600",
        _seconds,
        "seconds between sweeps of unregistered result objects; 0 turns it off",
    ),
    Var(
        "SWEEP_GRACE_S",
        "86400",
        _seconds,
        "an unregistered result object is swept only when older than this; keep it above any catalog outage",
    ),
)


@dataclass(frozen=True)
class CatalogSettings:
    database_url: str
    s3: S3Settings
    grpc_host: str = "0.0.0.0"
    grpc_port: int = 50051
    log_level: str = "INFO"
    grace_seconds: float = 20.0
    max_attempts: int = 3
    policy: Policy = field(default_factory=Policy)
    migrate_on_start: bool = True
    sweep_interval_seconds: float = 3600.0
    sweep_grace_seconds: float = 86400.0
    # TLS and roles (services/common/auth.py); None serves plain text (AUTH=off).
    auth: MeshAuth | None = None
    # Request sizes per RPC and the users' call rate (services/common/limits.py).
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, serving: bool = True) -> CatalogSettings:
        """`serving` False (the sweep command) neither needs nor reads the TLS settings."""
        v = load(CATALOG_VARS, env)
        return cls(
            database_url=v["DATABASE_URL"],
            s3=S3Settings(
                endpoint_url=v["S3_ENDPOINT_URL"] or None,
                bucket=v["S3_BUCKET"],
                region=v["S3_REGION"],
                access_key=v["AWS_ACCESS_KEY_ID"],
                secret_key=v["AWS_SECRET_ACCESS_KEY"],
            ),
            grpc_host=v["GRPC_HOST"],
            grpc_port=v["GRPC_PORT"],
            log_level=v["LOG_LEVEL"],
            grace_seconds=v["GRACE_SECONDS"],
            max_attempts=v["MAX_ATTEMPTS"],
            policy=Policy(
                max_attempts=v["MAX_ATTEMPTS"],
                retry_base_s=v["RETRY_BASE_S"],
                retry_max_s=v["RETRY_MAX_S"],
                transient_budget_s=v["SITE_TRANSIENT_BUDGET_S"],
                queue_deadline_s=v["QUEUE_DEADLINE_S"],
                start_lease_s=v["START_LEASE_S"],
                reduce_deadline_s=v["REDUCE_DEADLINE_S"],
            ),
            migrate_on_start=v["CATALOG_MIGRATE_ON_START"],
            sweep_interval_seconds=v["SWEEP_INTERVAL_S"],
            sweep_grace_seconds=v["SWEEP_GRACE_S"],
            auth=MeshAuth.from_settings(v) if serving else None,
            limits=Limits.from_settings(v),
        )


async def serve(
    settings: CatalogSettings, stop: asyncio.Event, on_started: Callable[[int], None] | None = None
) -> None:
    """Runs the catalog until `stop` is set, then drains and closes."""
    if settings.migrate_on_start:
        await migrate.upgrade(settings.database_url)
    store = CatalogStore.connect(settings.database_url, settings.max_attempts, settings.policy)
    try:
        async with ObjectStore(settings.s3) as objects:
            servicer = CatalogServicer(store, objects)
            server = GrpcServer(
                [Registration(catalog_pb2_grpc.add_CatalogServiceServicer_to_server, servicer, SERVICE_NAME)],
                host=settings.grpc_host,
                port=settings.grpc_port,
                grace_seconds=settings.grace_seconds,
                auth=settings.auth,
                limits=settings.limits,
            )
            bound = await server.start()
            if on_started is not None:
                on_started(bound)
            background = [asyncio.create_task(watch_dependencies(server, store, objects, stop))]
            if settings.sweep_interval_seconds > 0:
                background.append(
                    asyncio.create_task(
                        sweep_periodically(
                            store,
                            objects,
                            settings.sweep_interval_seconds,
                            settings.sweep_grace_seconds,
                            stop,
                        )
                    )
                )
            try:
                await stop.wait()
                log.info("stopping: draining in-flight calls")
                servicer.close()
                await server.stop()
            finally:
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
    finally:
        await store.close()


async def watch_dependencies(
    server: GrpcServer, store: CatalogStore, objects: ObjectStore, stop: asyncio.Event
) -> None:
    """Health is SERVING while the database and the object store answer."""
    serving: bool | None = None
    bucket_ready = False
    while not stop.is_set():
        problem = ""
        try:
            await store.ping()
        except Exception as exc:
            problem = f"database: {exc}"
        if not problem:
            try:
                if not bucket_ready:
                    await objects.ensure_bucket()
                    bucket_ready = True
                else:
                    await objects.ping()
            except (ObjectStoreError, ObjectStoreMisconfigured) as exc:
                problem = f"object store: {exc}"
        ok = not problem
        if ok != serving:
            await server.set_serving(ok)
            if ok:
                log.info("database and object store answer: SERVING")
            else:
                log.warning("NOT_SERVING: %s", problem)
            serving = ok
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), HEALTH_INTERVAL_S if ok else 1.0)


async def main(settings: CatalogSettings) -> None:
    await serve(settings, stop_event_on_signals())


async def sweep_once(settings: CatalogSettings, grace_seconds: float | None, dry_run: bool) -> str:
    """One sweep of unregistered result objects, for operators."""
    store = CatalogStore.connect(settings.database_url, settings.max_attempts, settings.policy)
    try:
        async with ObjectStore(settings.s3) as objects:
            grace = settings.sweep_grace_seconds if grace_seconds is None else grace_seconds
            report = await sweep_results(store, objects, grace, dry_run=dry_run)
    finally:
        await store.close()
    return ("dry run, nothing deleted: " if dry_run else "") + report.describe()
