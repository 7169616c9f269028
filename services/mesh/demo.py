"""The main job: a local mesh, a plate fed into it, a checked summary."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cellmesh import pages
from cellmesh.auth import Credentials, aio_channel
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2

from services.common import pki, synth
from services.common.amqp import AmqpConnection, BrokerUnavailable, Topology
from services.common.s3 import ObjectMissing, ObjectStore, ObjectStoreError
from services.common.settings import S3Settings
from services.mesh import microscope
from services.mesh.autoscale import Autoscaler, AutoscaleSettings, CatalogBacklog, LocalBackend
from services.mesh.procs import Proc, ProcessGroup, free_port, port_open

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
NUCLEI_PIPELINE = REPO / "examples" / "pipelines" / "nuclei.cppipe"
BBBC013_PIPELINE = REPO / "examples" / "pipelines" / "bbbc013_nuclei.cppipe"
BBBC013_MAP = Path("bbbc013_translocation_plate") / "images" / "1049_Metadata.csv"
BBBC013_NAME = re.compile(
    r"^Channel(?P<Channel>[12])-(?P<Number>\d+)-(?P<WellRow>[A-H])-(?P<WellColumn>\d{2})\.tif$"
)
BBBC013_CHANNELS = {"1": "GFP", "2": "DNA"}


def bbbc013_sites(shared_data: Path) -> list[microscope.SiteImages]:
    """The real BBBC013 half plate (rows A-D, one site per well) as a
    microscope would deliver it; nuclei counts are not known beforehand."""
    folder = shared_data / "bbbc013_translocation_plate" / "images"
    if not folder.is_dir():
        raise RuntimeError(f"BBBC013 images not found in {folder} (set CELLMESH_SHARED_DATA)")
    wells: dict[str, dict[str, Path]] = {}
    for path in sorted(folder.iterdir()):
        m = BBBC013_NAME.match(path.name)
        if m:
            well = f"{m['WellRow']}{m['WellColumn']}"
            wells.setdefault(well, {})[BBBC013_CHANNELS[m["Channel"]]] = path
    return [microscope.SiteImages(well, 0, -1, files) for well, files in sorted(wells.items())]


@dataclass
class DemoOptions:
    run_dir: Path
    cp_python: str
    workers: int = 2
    mode: str = "warm"
    rows: int = 8
    columns: int = 12
    sites: int = 2
    size: int = 512
    rate: float = 40.0
    seed: int = 0
    example: str = "generated"
    database_url: str = ""
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    shared_data: Path = field(default_factory=lambda: REPO.parent / "shared" / "data")
    plate: str = ""
    # Tests put a proxy between the services and the S3 server: the server
    # listens on s3_port, the services use service_s3_endpoint.
    s3_port: int = 0
    service_s3_endpoint: str = ""
    # The address every service listens on and is reached at (tests put
    # workers in network namespaces that reach the mesh over a veth pair).
    host: str = "127.0.0.1"
    extra_env: dict[str, str] = field(default_factory=dict)
    # An object store of the user's (`up --s3-endpoint`): no S3 server is
    # started and the bucket must exist or be creatable with these keys.
    external_s3: S3Settings | None = None
    # Where the workers keep their files (default run_dir/work).
    work_dir: Path | None = None
    # Called with the object store once its bucket exists, before the catalog starts.
    prepare_store: Callable[[ObjectStore], Awaitable[object]] | None = None
    # Scale the workers with the backlog (services/mesh/autoscale.py) instead of `workers`.
    autoscale: AutoscaleSettings | None = None
    # Start the web page (services/web) too; its HTTP port (0: a free one).
    web: bool = True
    web_port: int = 0
    # TLS, certificates and roles on every port (a throw-away CA in run_dir/pki);
    # False runs every service with AUTH=off.
    auth: bool = True
    # Other addresses services are reached at (a worker in a network
    # namespace), which their certificates must name besides `host`.
    tls_hosts: tuple[str, ...] = ()


@dataclass
class Mesh:
    """Addresses and settings of a running local mesh."""

    procs: ProcessGroup
    catalog_addr: str
    reducer_addr: str
    s3: S3Settings
    topology: Topology
    env: dict[str, str]
    host: str = "127.0.0.1"
    # The web page (services/web), e.g. http://127.0.0.1:8123/; "" without one.
    web_url: str = ""
    # The mesh's certificates and tokens (None: AUTH=off).
    pki: pki.LocalPki | None = None

    def credentials(self, role: str = "operator", token: bool = False) -> Credentials | None:
        """A user's or service's credentials: `role`'s certificate, or with
        `token` a role-less certificate and `role`'s token."""
        if self.pki is None:
            return None
        return self.pki.credentials(role, token)

    def service_env(self, role: str) -> dict[str, str]:
        """The TLS_*_FILE and AUTH_TOKENS_FILE variables of a service of `role`."""
        return self.pki.service_env(role) if self.pki is not None else {}

    def channel(self, address: str | None = None, role: str = "operator") -> grpc.aio.Channel:
        """A channel to `address` (the catalog by default) as `role`."""
        return aio_channel(address or self.catalog_addr, self.credentials(role))


def _amqp_host_port(url: str) -> tuple[str, int]:
    import pika

    params = pika.URLParameters(url)
    return str(params.host), int(params.port)


async def start_mesh(options: DemoOptions, workers: int | None = None) -> Mesh:
    """Starts the S3 server, catalog, scheduler, workers and reducer."""
    host, port = _amqp_host_port(options.amqp_url)
    if not port_open(host, port):
        raise RuntimeError(
            f"RabbitMQ is not reachable on {host}:{port}. Start it with `rabbitmq-server -detached` "
            "(or pass --amqp-url to use another broker)"
        )
    options.run_dir.mkdir(parents=True, exist_ok=True)
    procs = ProcessGroup(options.run_dir / "logs")
    s3_port = options.s3_port or free_port()
    host = options.host
    keys = (
        await asyncio.to_thread(pki.local_mesh, options.run_dir / "pki", [host, *options.tls_hosts])
        if options.auth
        else None
    )
    procs.credentials = keys.credentials("operator") if keys is not None else None
    s3 = options.external_s3 or S3Settings(
        f"http://{host}:{s3_port}", "cellmesh", "us-east-1", "cellmesh", "cellmesh-local"
    )
    topology = Topology(prefix=f"cellmesh-{uuid.uuid4().hex[:8]}")
    database_url = options.database_url or f"sqlite+aiosqlite:///{options.run_dir / 'catalog.db'}"
    env = {
        "LOG_LEVEL": "INFO",
        "S3_ENDPOINT_URL": options.service_s3_endpoint or s3.endpoint_url or "",
        "S3_BUCKET": s3.bucket,
        "S3_REGION": s3.region,
        "AWS_ACCESS_KEY_ID": s3.access_key,
        "AWS_SECRET_ACCESS_KEY": s3.secret_key,
        "AMQP_URL": options.amqp_url,
        "QUEUE_PREFIX": topology.prefix,
        "GRPC_HOST": host,
        "AUTH": "on" if keys is not None else "off",
        **options.extra_env,
    }
    mesh = Mesh(procs, "", "", s3, topology, env, host, pki=keys)
    try:
        if options.external_s3 is None:
            s3_proc = procs.start(
                "s3", "services.common.s3server", {}, args=("--host", host, "--port", str(s3_port))
            )
            deadline = time.monotonic() + 20
            while not port_open(host, s3_port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the S3 server did not start:\n{s3_proc.log_tail()}")
                await asyncio.sleep(0.1)
        try:
            async with ObjectStore(s3) as store:
                await store.ensure_bucket()
                if options.prepare_store is not None:
                    await options.prepare_store(store)
        except (ObjectStoreError, ObjectMissing) as exc:
            raise RuntimeError(
                f"the object store {s3.endpoint_url or 'AWS S3'} (bucket {s3.bucket}) cannot be used: {exc}"
            ) from exc

        catalog_port = free_port()
        catalog = procs.start(
            "catalog",
            "services.catalog",
            {
                **env,
                **mesh.service_env("catalog"),
                "DATABASE_URL": database_url,
                "GRPC_PORT": str(catalog_port),
            },
            catalog_port,
            host=host,
        )
        await procs.wait_healthy(catalog)
        mesh.catalog_addr = catalog.grpc_addr
        with_catalog = {**env, "CATALOG_ADDR": catalog.grpc_addr}
        scheduler_port = free_port()
        await procs.wait_healthy(
            procs.start(
                "scheduler",
                "services.scheduler",
                {
                    **with_catalog,
                    **mesh.service_env("scheduler"),
                    "GRPC_PORT": str(scheduler_port),
                    "POLL_INTERVAL_S": "0.3",
                },
                scheduler_port,
                host=host,
            )
        )
        for i in range(workers if workers is not None else options.workers):
            await start_worker(mesh, options, i)
        reducer_port = free_port()
        reducer = procs.start(
            "reducer",
            "services.reducer",
            {**with_catalog, **mesh.service_env("reducer"), "GRPC_PORT": str(reducer_port)},
            reducer_port,
            host=host,
        )
        await procs.wait_healthy(reducer)
        mesh.reducer_addr = reducer.grpc_addr
        if options.web:
            await start_web(mesh, options)
    except BaseException:
        await stop_mesh(mesh)
        raise
    return mesh


async def start_web(mesh: Mesh, options: DemoOptions) -> Proc:
    """Starts the web page on the mesh's host; sets `mesh.web_url`."""
    grpc_port, http_port = free_port(), options.web_port or free_port()
    proc = mesh.procs.start(
        "web",
        "services.web",
        {
            **mesh.env,
            **mesh.service_env("web"),
            "CATALOG_ADDR": mesh.catalog_addr,
            "REDUCER_ADDR": mesh.reducer_addr,
            "GRPC_PORT": str(grpc_port),
            "HTTP_HOST": mesh.host,
            "HTTP_PORT": str(http_port),
            "CACHE_DIR": str(options.run_dir / "web-cache"),
        },
        grpc_port,
        host=mesh.host,
    )
    await mesh.procs.wait_healthy(proc)
    mesh.web_url = f"http://{mesh.host}:{http_port}/"
    return proc


async def start_worker(
    mesh: Mesh,
    options: DemoOptions,
    index: int,
    env: dict[str, str] | None = None,
    host: str | None = None,
    launcher: tuple[str, ...] = (),
) -> Proc:
    """Starts worker `cpworker-<index>`; `env` overrides the mesh's settings,
    `host` and `launcher` place it elsewhere (a network namespace)."""
    port = free_port()
    proc = mesh.procs.start(
        f"cpworker-{index}",
        "services.cpworker",
        {
            **mesh.env,
            **mesh.service_env("cpworker"),
            "CATALOG_ADDR": mesh.catalog_addr,
            "GRPC_PORT": str(port),
            "CP_PYTHON": options.cp_python,
            "CP_MODE": options.mode,
            "WORK_DIR": str((options.work_dir or options.run_dir / "work") / f"cpworker-{index}"),
            **({"GRPC_HOST": host} if host else {}),
            **(env or {}),
        },
        port,
        host=host or mesh.host,
        launcher=launcher,
    )
    await mesh.procs.wait_healthy(proc, timeout=180)
    return proc


async def stop_mesh(mesh: Mesh) -> None:
    await mesh.procs.stop()
    # The run's queues go with it.
    await delete_topology(mesh.env["AMQP_URL"], mesh.topology)


async def delete_topology(amqp_url: str, topology: Topology) -> None:
    """Deletes a mesh's queues and exchanges (its prefix is its own)."""
    conn = AmqpConnection(amqp_url, topology, "cleanup")
    with contextlib.suppress(BrokerUnavailable, TimeoutError, OSError):
        await conn.connect()
        names = [topology.parked_queue]
        for kind in Topology.KINDS:
            names += [topology.queue(kind), topology.dead_queue(kind)]
        for name in names:
            await conn.delete_queue(name)
        for name in (topology.exchange, topology.dead_exchange):
            await conn.delete_exchange(name)
    await conn.close()


async def follow(
    catalog: catalog_pb2_grpc.CatalogServiceAsyncStub, plate: str, procs: ProcessGroup
) -> catalog_pb2.PlateProgress:
    """Shows a live progress bar until the plate's report is registered."""
    from tqdm import tqdm

    bar: Any = None
    last = catalog_pb2.PlateProgress()
    stream = catalog.WatchPlateProgress(catalog_pb2.WatchPlateProgressRequest(plate=plate))
    try:
        async for message in stream:
            procs.check_alive()
            p = message.progress
            last = p
            if bar is None:
                bar = tqdm(total=p.total, unit="site", file=sys.stderr, dynamic_ncols=True)
            bar.total = p.total
            bar.n = p.done + p.failed
            bar.set_postfix_str(
                f"waiting {p.waiting} ready {p.ready} queued {p.queued} running {p.running} "
                f"done {p.done} failed {p.failed}"
                + (f" report v{p.report_version}" if p.report_version else "")
            )
            bar.refresh()
            if p.complete:
                break
    finally:
        if bar is not None:
            bar.close()
    return last


async def run_demo(options: DemoOptions) -> dict[str, Any]:
    t_start = time.perf_counter()
    plate = options.plate or f"demo-{time.strftime('%H%M%S')}"
    images_dir = options.run_dir / "microscope"
    print(f"cellmesh demo: run folder {options.run_dir}", file=sys.stderr)
    scaling = options.autoscale
    mesh = await start_mesh(options, None if scaling is None else scaling.policy.min_replicas)
    backend = LocalBackend(mesh, options)
    stop_scaling = asyncio.Event()
    scaler_task: asyncio.Task[None] | None = None
    try:
        workers = (
            f"{options.workers} worker(s)"
            if scaling is None
            else f"{scaling.policy.min_replicas} to {scaling.policy.max_replicas} worker(s), autoscaled"
        )
        print(
            f"mesh up: catalog {mesh.catalog_addr}, reducer {mesh.reducer_addr}, {workers} "
            f"({options.mode}), S3 {mesh.s3.endpoint_url}, queues {mesh.topology.prefix}.*",
            file=sys.stderr,
        )
        if mesh.web_url:
            print(f"web page: {mesh.web_url}", file=sys.stderr)
        async with mesh.channel() as channel, ObjectStore(mesh.s3) as store:
            catalog = catalog_pb2_grpc.CatalogServiceStub(channel)
            if scaling is not None:
                scaler = Autoscaler(scaling, backend, CatalogBacklog(catalog))
                scaler_task = asyncio.create_task(scaler.run(stop_scaling))
            real = options.example == "bbbc013"
            pipeline_file = BBBC013_PIPELINE if real else NUCLEI_PIPELINE
            pipeline = await catalog.RegisterPipeline(
                catalog_pb2.RegisterPipelineRequest(
                    name=pipeline_file.stem, content=pipeline_file.read_bytes()
                )
            )
            if real:
                sites = bbbc013_sites(options.shared_data)
                layout = catalog_pb2.PlateLayout(
                    wells=[s.well for s in sites], rows=8, columns=12, sites_per_well=1, first_site=0
                )
                print(
                    f"plate {plate}: BBBC013, {len(sites)} wells x 1 site, channels DNA+GFP", file=sys.stderr
                )
            else:
                wells = microscope.plate_wells(options.rows, options.columns)
                layout = catalog_pb2.PlateLayout(
                    rows=options.rows, columns=options.columns, sites_per_well=options.sites, first_site=0
                )
                print(
                    f"plate {plate}: {len(wells)} wells x {options.sites} sites, channels DNA+GFP; generating images",
                    file=sys.stderr,
                )
                sites = await asyncio.to_thread(
                    microscope.generate_plate,
                    images_dir,
                    plate,
                    wells,
                    options.sites,
                    options.size,
                    options.seed,
                )
            await catalog.CreatePlate(
                catalog_pb2.CreatePlateRequest(
                    name=plate,
                    channels=list(synth.CHANNELS),
                    layout=layout,
                    pipeline_sha256=pipeline.pipeline.ref.sha256,
                    reduce_with_failures=True,
                    # BBBC013's own plate map: doses and controls in the report, and its QC.
                    plate_map=catalog_pb2.PlateMapUpload(
                        content=(options.shared_data / BBBC013_MAP).read_bytes(),
                        source_name="1049_Metadata.csv",
                    )
                    if real
                    else None,
                )
            )
            feeder = asyncio.create_task(
                microscope.acquire(store, catalog, plate, sites, options.rate, options.seed)
            )
            progress = await follow(catalog, plate, mesh.procs)
            await feeder
            report = (await catalog.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate=plate))).report
            out_dir = options.run_dir / "report"
            fetched = await fetch_report(store, report, out_dir)
            jobs = await pages.all_site_jobs(
                catalog, catalog_pb2.ListSitesRequest(plate=plate, with_results=True)
            )
            truth: dict[str, int] = {}
            if real:
                # No drawn truth: the per-well counts must equal the sum of the
                # per-site counts CellProfiler reported.
                for job in jobs:
                    if job.state == types_pb2.SITE_STATE_DONE:
                        count = job.provenance.object_counts.get("Nuclei", 0)
                        truth[job.site.well] = truth.get(job.site.well, 0) + count
            else:
                for s in sites:
                    truth[s.well] = truth.get(s.well, 0) + s.nuclei
            counts = read_cells_per_well(fetched)
            summary = summarize(
                plate, progress, report, out_dir, fetched, truth, counts, time.perf_counter() - t_start
            )
            summary["truth"] = "the sum of per-site Count_Nuclei" if real else "nuclei drawn by the generator"
            failed = [j for j in jobs if j.state == types_pb2.SITE_STATE_FAILED]
            summary["failed_sites"] = [
                f"{j.site.well}/s{j.site.site}: {types_pb2.FailureClass.Name(j.failure_class)}: {j.failure_reason}"
                for j in failed
            ]
            if scaling is not None:
                summary["workers_started"] = backend.started
                summary["workers_stopped"] = backend.stopped
        print_summary(summary)
        return summary
    finally:
        print("stopping the mesh", file=sys.stderr)
        stop_scaling.set()
        if scaler_task is not None:
            scaler_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scaler_task
        await backend.close()
        await stop_mesh(mesh)


async def fetch_report(store: ObjectStore, report: catalog_pb2.PlateReport, out_dir: Path) -> dict[str, Path]:
    fetched = {}
    for f in report.files:
        path = out_dir / f.name
        await store.get_file(f.object.key, path, f.object.sha256)
        fetched[f.name] = path
    return fetched


def read_cells_per_well(files: dict[str, Path]) -> dict[str, int]:
    """Objects per well from the report's per-well count table."""
    for name, path in files.items():
        if "per_well" in name and name.endswith(".csv"):
            rows = list(csv.DictReader(io.StringIO(path.read_text())))
            if not rows:
                return {}
            count_col = next(
                (c for c in rows[0] if c.startswith("Count_") or c.endswith("_count") or c == "count"), None
            )
            if count_col is None:
                continue
            return {
                r["Metadata_Well"]: int(float(r[count_col]))
                for r in rows
                if r.get(count_col) not in ("", None)
            }
    return {}


def summarize(
    plate: str,
    progress: catalog_pb2.PlateProgress,
    report: catalog_pb2.PlateReport,
    out_dir: Path,
    files: dict[str, Path],
    truth: dict[str, int],
    counts: dict[str, int],
    wall: float,
) -> dict[str, Any]:
    matching = sum(1 for w, n in truth.items() if counts.get(w) == n)
    heatmaps = [str(p) for n, p in files.items() if n.endswith(".png")]
    return {
        "plate": plate,
        "sites_total": progress.total,
        "sites_done": progress.done,
        "sites_failed": progress.failed,
        "report_version": report.version,
        "report_dir": str(out_dir),
        "heatmaps": heatmaps,
        "tables": sorted(str(p) for n, p in files.items() if not n.endswith(".png")),
        "report_keys": [f.object.key for f in report.files],
        "wall_seconds": round(wall, 1),
        "wells": len(truth),
        "wells_matching_ground_truth": matching,
        "ok": progress.done == progress.total and matching == len(truth),
    }


def print_summary(s: dict[str, Any]) -> None:
    lines = [
        "",
        f"plate {s['plate']}: {s['sites_done']}/{s['sites_total']} sites done, {s['sites_failed']} failed "
        f"in {s['wall_seconds']} s (report v{s['report_version']})",
        f"nuclei per well vs {s.get('truth', 'ground truth')}: "
        f"{s['wells_matching_ground_truth']}/{s['wells']} wells match exactly",
        f"heatmap: {', '.join(s['heatmaps']) or '(none)'}",
        f"tables in: {s['report_dir']}",
    ]
    if "workers_started" in s:
        lines.append(f"autoscaler: {s['workers_started']} worker(s) started, {s['workers_stopped']} stopped")
    for failure in s.get("failed_sites", [])[:10]:
        lines.append(f"  failed {failure}")
    lines.append("OK" if s["ok"] else "NOT OK: see the logs in the run folder")
    print("\n".join(lines))
