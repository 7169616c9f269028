"""`cellmesh`: the command-line tool for a lab using a cellmesh.

    cellmesh pipeline register analysis.cppipe --name nuclei-v2 [--attach 1049_Metadata.csv]...
    cellmesh plate create P1 --channels DNA,GFP --pipeline 3fa2c1 --rows 8 --columns 12
    cellmesh plate create P2 --channels DNA,GFP --pipeline ILLUM --pipeline ANALYSIS   (a workflow of stages)
    cellmesh ingest /data/P1 --plate P1 --pattern '...' --channel-map 1=GFP,2=DNA
    cellmesh follow P1
    cellmesh report P1 --out P1-report

Failures print `error: <STATUS>: <message>` and exit with status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from cellmesh import cpa, meshconfig
from cellmesh.auth import Credentials
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.client import (
    DEFAULT_CATALOG,
    DEFAULT_REDUCER,
    MAX_INLINE_ATTACHMENT_BYTES,
    CellmeshClient,
    CellmeshError,
    ObjectStore,
    ObjectStoreConfig,
    download_report,
)
from cellmesh.common.v1 import types_pb2

ENVIRONMENT = """\
where the mesh is (a flag, else the environment, else the file `cellmesh up` writes):
  CELLMESH_CATALOG       the catalog's address (default 127.0.0.1:50051)
  CELLMESH_REDUCER       the reducer's address (default 127.0.0.1:50054)
  S3_ENDPOINT_URL        the object store (empty for AWS S3)
  S3_BUCKET              the mesh's bucket (default cellmesh)
  S3_REGION              (default us-east-1)
  AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
                         object store keys (else the usual AWS configuration);
                         any S3_* or AWS_* variable set: the object store comes
                         from the environment alone
  CELLMESH_CA            the mesh CA's certificate (PEM); with CELLMESH_CERT and
  CELLMESH_KEY           your certificate and key, and/or CELLMESH_TOKEN
  CELLMESH_TOKEN         (or CELLMESH_TOKEN_FILE) your token; default: the file's
  CELLMESH_CONFIG        the file `cellmesh up` writes (default
                         $XDG_CONFIG_HOME/cellmesh/mesh.json, ~/.config/cellmesh/mesh.json)

a local mesh on this machine (needs the services, i.e. a clone's .venv):
  cellmesh up [--workers N] [--database-url URL] [--s3-endpoint URL --s3-bucket B]
  cellmesh status
  cellmesh down
"""


def _time(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return ""
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(rows: Sequence[Sequence[object]], headers: Sequence[str], out: TextIO) -> None:
    cells = [[str(c) for c in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def _state_name(value: int) -> str:
    return types_pb2.SiteState.Name(value).removeprefix("SITE_STATE_").lower()  # type: ignore[arg-type]


def _failure_name(value: int) -> str:
    if not value:
        return ""
    return types_pb2.FailureClass.Name(value).removeprefix("FAILURE_CLASS_")  # type: ignore[arg-type]


def _site_states(values: Sequence[str]) -> list[types_pb2.SiteState.ValueType]:
    states: list[types_pb2.SiteState.ValueType] = []
    for value in values:
        for name in value.split(","):
            name = name.strip()
            if not name:
                continue
            try:
                states.append(types_pb2.SiteState.Value("SITE_STATE_" + name.upper()))
            except ValueError:
                known = ", ".join(_state_name(v) for v in types_pb2.SiteState.values() if v)
                raise ValueError(f"unknown site state {name!r} (one of {known})") from None
    return states


def _site_spec(text: str) -> tuple[str, int]:
    from cellmesh.ingest import normalize_well

    well, sep, site = text.partition("/")
    if not sep or not site.strip().isdigit():
        raise ValueError(f"site {text!r} is not WELL/SITE (e.g. A01/0)")
    return normalize_well(well), int(site)


async def _resolve_pipeline(client: CellmeshClient, sha: str) -> str:
    """A full SHA-256 as is, or the one registered pipeline it starts."""
    sha = sha.strip().lower()
    if len(sha) == 64:
        return sha
    matches = [p.ref.sha256 for p in await client.list_pipelines() if p.ref.sha256.startswith(sha)]
    if not matches:
        raise CellmeshError(
            grpc.StatusCode.NOT_FOUND, f"no registered pipeline's SHA-256 starts with {sha!r}"
        )
    if len(matches) > 1:
        raise CellmeshError(
            grpc.StatusCode.INVALID_ARGUMENT, f"{sha!r} starts {len(matches)} pipelines' SHA-256"
        )
    return matches[0]


def _print_plate(plate: catalog_pb2.Plate, out: TextIO) -> None:
    print(f"plate {plate.name}", file=out)
    print(f"  channels              {', '.join(plate.channels)}", file=out)
    if plate.HasField("layout"):
        lay = plate.layout
        wells = ", ".join(lay.wells) if lay.wells else f"all {lay.rows * lay.columns}"
        print(
            f"  layout                {lay.rows} x {lay.columns} wells, {lay.sites_per_well} site(s) per well"
            f" from {lay.first_site}; wells: {wells}",
            file=out,
        )
    print(f"  pipelines             {', '.join(plate.pipeline_sha256)}", file=out)
    print(f"  images                {plate.image_count}", file=out)
    print(f"  sites known           {'yes' if plate.sites_known else 'no'}", file=out)
    print(f"  acquisition finished  {'yes' if plate.acquisition_finished else 'no'}", file=out)
    print(
        f"  reduce with failures  {'yes' if plate.reduce_with_failures else 'no (waits for every site)'}",
        file=out,
    )
    if plate.HasField("plate_map"):
        m = plate.plate_map
        print(
            f"  plate map             {m.source_name or m.sha256[:12]}: {len(m.wells)} wells by {m.located_by};"
            f" columns {', '.join(m.columns) or 'none'}",
            file=out,
        )
    if plate.HasField("qc_gate"):
        print(f"  QC gate               {_gate_text(plate.qc_gate)}", file=out)
    print(f"  created               {_time(plate.created_at)}", file=out)


def _gate_text(g: catalog_pb2.QcGate) -> str:
    rules = []
    if g.HasField("min_z_prime"):
        rules.append(f"Z' of {g.feature} at least {g.min_z_prime:g}")
    if g.HasField("max_failed_share"):
        rules.append(f"at most {g.max_failed_share:.1%} of sites failed or missing")
    return "; ".join(rules) or "no rule"


def _qc_gate_args(args: argparse.Namespace) -> catalog_pb2.QcGate | None:
    given = (args.min_z_prime, args.max_failed_share, args.qc_feature, args.control_column, args.dose_column)
    if all(v is None for v in given):
        return None
    gate = catalog_pb2.QcGate(
        feature=args.qc_feature or "",
        control_column=args.control_column or "",
        dose_column=args.dose_column or "",
    )
    if args.min_z_prime is not None:
        gate.min_z_prime = args.min_z_prime
    if args.max_failed_share is not None:
        gate.max_failed_share = args.max_failed_share
    return gate


def _add_qc_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--qc-feature",
        metavar="FEATURE",
        help="the feature whose Z' the QC gate checks, e.g. Nuclei_Math_Ratio1",
    )
    p.add_argument(
        "--min-z-prime", type=float, metavar="Z", help="the QC gate: the lowest acceptable Z' of --qc-feature"
    )
    p.add_argument(
        "--max-failed-share",
        type=float,
        metavar="SHARE",
        help="the QC gate: the largest share (0-1) of failed or missing sites",
    )
    p.add_argument(
        "--control-column",
        metavar="COLUMN",
        help="the plate map's control-role column (default: found by name)",
    )
    p.add_argument(
        "--dose-column", metavar="COLUMN", help="the plate map's dose column (default: found by name)"
    )


def _print_report(report: catalog_pb2.PlateReport, bucket: str, out: TextIO) -> None:
    print(
        f"report v{report.version} of plate {report.plate}: {report.wells} wells, {report.sites} sites"
        f" (pipeline {report.pipeline_sha256[:12]}, {_time(report.created_at)})",
        file=out,
    )
    for item in report.files:
        print(f"  s3://{bucket}/{item.object.key}  ({item.object.size} bytes)", file=out)
    if report.HasField("qc") and report.qc.gated:
        if report.qc.passed:
            print("QC gate passed", file=out)
        else:
            print(f"QC gate FAILED: {'; '.join(report.qc.failures)}", file=out)
    if report.missing_sites:
        print(f"  {len(report.missing_sites)} site(s) not in the report:", file=out)
        for m in report.missing_sites:
            reason = f": {m.reason}" if m.reason else ""
            print(f"    {m.site.well}/{m.site.site} {_state_name(m.state)}{reason}", file=out)


# Commands


def _attach_arg(value: str) -> tuple[str, Path]:
    """--attach FILE (read under its own name) or --attach NAME=FILE."""
    name, eq, path = value.partition("=")
    if eq and name and path:
        return name, Path(path)
    return Path(value).name, Path(value)


async def cmd_pipeline_register(client: CellmeshClient, args: argparse.Namespace, out: TextIO) -> None:
    attachments = [_attach_arg(a) for a in args.attach or []]
    missing = [str(path) for _, path in attachments if not path.is_file()]
    if missing:
        raise CellmeshError(grpc.StatusCode.INVALID_ARGUMENT, f"no such file to attach: {', '.join(missing)}")
    big = any(path.stat().st_size > MAX_INLINE_ATTACHMENT_BYTES for _, path in attachments)
    if big:
        async with ObjectStore(ObjectStoreConfig.discover()) as store:
            reply = await client.register_pipeline(
                Path(args.file),
                args.name,
                attachments,
                store,
                stage_inputs=args.from_stage or [],
                scope=args.scope,
            )
    else:
        reply = await client.register_pipeline(
            Path(args.file), args.name, attachments, stage_inputs=args.from_stage or [], scope=args.scope
        )
    p = reply.pipeline
    verb = "already registered" if reply.already_registered else "registered"
    print(f"{verb}: pipeline {p.name}", file=out)
    print(f"  sha256    {p.ref.sha256}", file=out)
    print(f"  modules   {len(p.modules)}: {', '.join(p.modules)}", file=out)
    print(f"  channels  {', '.join(p.image_names)}", file=out)
    print(f"  tables    {', '.join(p.tables) or '(none: the files it saves)'}", file=out)
    scope = "per plate (a plate stage)" if p.scope == types_pb2.PIPELINE_SCOPE_PLATE else "per site"
    print(f"  runs      {scope}{': ' + '; '.join(p.scope_reasons) if p.scope_reasons else ''}", file=out)
    if p.group_by:
        keys = ", ".join(f"Metadata_{k}" for k in p.group_by)
        print(f"  groups    by {keys} (the Groups module)", file=out)
        if p.scope == types_pb2.PIPELINE_SCOPE_PLATE:
            print(
                "            one stage job per group, run as soon as every site of its group is in", file=out
            )
    for a in p.attachments:
        print(f"  attached  {a.name} ({a.object.size} bytes, sha256 {a.object.sha256[:12]})", file=out)
    for name in p.stage_inputs:
        print(f"  from an earlier plate stage  {name}", file=out)


async def cmd_pipeline_list(client: CellmeshClient, args: argparse.Namespace, out: TextIO) -> None:
    rows = [
        (p.ref.sha256, p.name, ",".join(p.image_names), _time(p.created_at))
        for p in await client.list_pipelines()
    ]
    _table(rows, ("SHA256", "NAME", "CHANNELS", "CREATED"), out)


async def cmd_plate_create(client: CellmeshClient, args: argparse.Namespace, out: TextIO) -> None:
    channels = [c.strip() for c in args.channels.split(",") if c.strip()]
    layout = None
    if any(v is not None for v in (args.rows, args.columns, args.sites, args.first_site, args.wells)):
        from cellmesh.ingest import normalize_well

        layout = catalog_pb2.PlateLayout(
            rows=args.rows if args.rows is not None else 8,
            columns=args.columns if args.columns is not None else 12,
            sites_per_well=args.sites if args.sites is not None else 1,
            first_site=args.first_site if args.first_site is not None else 0,
            wells=[normalize_well(w) for w in (args.wells or "").split(",") if w.strip()],
        )
    shas = [await _resolve_pipeline(client, given) for given in args.pipeline]
    plate = await client.create_plate(
        args.name,
        channels,
        shas[0],
        layout,
        reduce_with_failures=not args.strict,
        plate_map=Path(args.platemap) if args.platemap else None,
        qc_gate=_qc_gate_args(args),
    )
    for sha in shas[1:]:
        plate = (await client.add_pipeline(args.name, sha)).plate
    _print_plate(plate, out)
    if not plate.sites_known:
        print(
            f"no layout: run `cellmesh plate finish {plate.name}` once the last image is ingested", file=out
        )


async def cmd_platemap_register(client: CellmeshClient, args: argparse.Namespace, out: TextIO) -> None:
    plate = await client.set_plate_map(
        args.plate, Path(args.file) if args.file else None, _qc_gate_args(args)
    )
    _print_plate(plate, out)


async def cmd_plate_list(client: CellmeshClient, args: argparse.Namespace, out: TextIO) -> None:
    rows = [
        (
            p.name,
            ",".join(p.channels),
            p.image_count,
            "yes" if p.sites_known else "no",
            "yes" if p.acquisition_finished else "no",
            len(p.pipeline_sha256),
            _time(p.created_at),
        )
        for p in await client.list_plates()
    ]
    _table(rows, ("NAME", "CHANNELS", "IMAGES", "SITES KNOWN", "FINISHED", "PIPELINES", "CREATED"), out)


async def cmd_plate_show(client: CellmeshClient, args: argparse.Namespace, out: TextIO) -> None:
    plate = await client.get_plate(args.name)
    _print_plate(plate, out)
    rows = []
    for sha in plate.pipeline_sha256:
        p = await client.progress(plate.name, sha)
        rows.append(
            (
                sha[:12], p.total, p.waiting, p.ready, p.queued, p.running, p.done, p.failed,
                p.report_version or "-", "yes" if p.complete else "no",
            )
        )  # fmt: skip
    print(file=out)
    _table(
        rows,
        (
            "PIPELINE",
            "TOTAL",
            "WAITING",
            "READY",
            "QUEUED",
            "RUNNING",
            "DONE",
            "FAILED",
            "REPORT",
            "COMPLETE",
        ),
        out,
    )


async def cmd_plate_finish(client: CellmeshClient, args: argparse.Namespace, out: TextIO) -> None:
    reply = await client.finish_acquisition(args.name)
    print(f"acquisition of plate {reply.plate.name} finished ({reply.plate.image_count} images)", file=out)
    if reply.incomplete_sites:
        print(f"{len(reply.incomplete_sites)} site(s) of the layout miss channels:", file=out)
        for s in reply.incomplete_sites:
            print(f"  {s.well}/{s.site}", file=out)


async def cmd_plate_add_pipeline(client: CellmeshClient, args: argparse.Namespace, out: TextIO) -> None:
    sha = await _resolve_pipeline(client, args.pipeline)
    reply = await client.add_pipeline(args.name, sha)
    print(
        f"plate {reply.plate.name}: pipeline {sha} added, {reply.site_jobs_created} site jobs created",
        file=out,
    )


async def cmd_ingest(client: CellmeshClient, args: argparse.Namespace, out: TextIO) -> None:
    from cellmesh.ingest import FileNameParser, Ingester, IngestSummary, parse_channel_map

    parser = FileNameParser(args.pattern, args.plate, args.site, parse_channel_map(args.channel_map))
    folder = Path(args.folder)
    if not await asyncio.to_thread(folder.is_dir):
        raise CellmeshError(grpc.StatusCode.NOT_FOUND, f"{folder} is not a folder")
    async with ObjectStore(ObjectStoreConfig.discover(), max_connections=max(10, args.concurrency)) as store:
        ingester = Ingester(
            client,
            store,
            parser,
            concurrency=args.concurrency,
            replace=args.replace,
            recursive=args.recursive,
            progress=not args.quiet,
        )
        if args.watch is None:
            summary = await ingester.run_once(folder)
        else:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()

            def on_signal(signum: int) -> None:
                stop.set()
                loop.remove_signal_handler(signum)  # a second interrupt stops at once
                print("stopping after this scan...", file=sys.stderr)

            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, on_signal, signum)

            def on_pass(one: IngestSummary) -> None:
                if not args.quiet and one.changed_anything:
                    print(
                        f"{one.uploaded} uploaded, {one.created + one.replaced} registered,"
                        f" {one.sites_ready} sites ready, {len(one.unmatched)} unmatched,"
                        f" {one.not_ready} not ready yet",
                        file=out,
                        flush=True,
                    )

            print(f"watching {folder} every {args.watch:g} s; Ctrl-C to stop", file=sys.stderr)
            try:
                summary = await ingester.watch(folder, args.watch, stop, on_pass)
            finally:
                for signum in (signal.SIGINT, signal.SIGTERM):
                    loop.remove_signal_handler(signum)
    for line in summary.lines():
        print(line, file=out)


async def cmd_follow(client: CellmeshClient, args: argparse.Namespace, out: TextIO) -> None:
    from tqdm import tqdm

    plate = await client.get_plate(args.plate)
    if not plate.sites_known:
        print(
            f"plate {plate.name} has no layout and acquisition is not finished: its report comes after"
            f" `cellmesh plate finish {plate.name}`",
            file=sys.stderr,
        )
    bar_shown = sys.stderr.isatty() and not args.quiet
    bar = tqdm(
        total=0,
        unit="site",
        file=sys.stderr,
        disable=not bar_shown,
        desc=plate.name,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n}/{total} settled [{elapsed}] {postfix}",
    )
    last: catalog_pb2.PlateProgress | None = None
    try:
        async for p in client.watch(plate.name, args.pipeline or ""):
            text = (
                f"waiting {p.waiting}, ready {p.ready}, queued {p.queued}, running {p.running},"
                f" done {p.done}, failed {p.failed} of {p.total}"
            )
            if bar_shown:
                bar.total = p.total
                bar.n = p.done + p.failed
                bar.set_postfix_str(text, refresh=False)
                bar.refresh()
            elif not args.quiet:
                print(text, file=out, flush=True)
            last = p
    finally:
        bar.close()
    if last is not None and last.reduce_failed:
        raise CellmeshError(
            grpc.StatusCode.FAILED_PRECONDITION, f"the plate's report failed: {last.reduce_failure_reason}"
        )
    if last is None or not last.report_version:
        raise CellmeshError(
            grpc.StatusCode.UNAVAILABLE, "the progress stream ended before a report was registered"
        )
    report = await client.report(plate.name, last.report_version, last.pipeline_sha256)
    _print_report(report, ObjectStoreConfig.discover().bucket, out)
    print(f"fetch it with: cellmesh report {plate.name} --version {report.version} --out DIR", file=out)


async def cmd_sites(client: CellmeshClient, args: argparse.Namespace, out: TextIO) -> None:
    sites = await client.list_sites(args.plate, _site_states(args.state or []), args.pipeline or "")
    rows = [
        (
            s.site.well,
            s.site.site,
            _state_name(s.state),
            s.attempt,
            _failure_name(s.failure_class),
            " ".join(s.failure_reason.split()),
            ",".join(f"{k}={v}" for k, v in sorted(s.metadata.items())),
        )
        for s in sites
    ]
    _table(rows, ("WELL", "SITE", "STATE", "ATTEMPT", "FAILURE", "MESSAGE", "METADATA"), out)
    print(f"{len(sites)} site(s)", file=sys.stderr)


async def cmd_requeue(client: CellmeshClient, args: argparse.Namespace, out: TextIO) -> None:
    sites = [_site_spec(s) for s in args.site or []]
    count = await client.requeue(args.plate, sites or None, args.pipeline or "", reduce=args.reduce)
    if args.reduce and not sites:
        print(f"the reduce of plate {args.plate} is issued again", file=out)
        return
    what = "given" if sites else "failed"
    print(f"requeued {count} {what} site(s) of plate {args.plate}", file=out)


async def cmd_report(client: CellmeshClient, args: argparse.Namespace, out: TextIO) -> None:
    if args.images and args.presign:
        raise ValueError("give --images (a local copy) or --presign (URLs), not both")
    if args.presign is not None and not 1 <= args.presign <= 604800:
        raise ValueError(
            f"--presign {args.presign}: give 1 to 604800 seconds (7 days, the most S3 signs for)"
        )
    report = await client.report(args.plate, args.version, args.pipeline or "")
    config = ObjectStoreConfig.discover()
    folder = Path(args.out)
    async with ObjectStore(config) as store:
        files = await download_report(store, report, folder)
        images = 0
        if args.images:
            for image in await client.list_images(args.plate):
                parts = PurePosixPath(image.object.key).parts
                if not parts or parts[0] == "/" or ".." in parts:
                    raise CellmeshError(grpc.StatusCode.DATA_LOSS, f"unusable image key {image.object.key!r}")
                await store.download(image.object, folder.joinpath(*parts))
                images += 1
        _print_report(report, config.bucket, out)
        print(f"{len(files)} file(s) written, checksums verified:", file=out)
        for _, path in files:
            print(f"  {path}", file=out)
        for item, path in files:
            if item.kind != catalog_pb2.REPORT_FILE_KIND_CPA_PROPERTIES:
                continue
            if args.images:
                prepend = cpa.folder_url(folder)
                print(f"{images} image(s) written under {folder / 'images'}", file=out)
            else:
                expires = args.presign or cpa.MAX_PRESIGN_S
                prepend = await _presign_cpa(store, path, expires)
                print(f"image URLs presigned for {expires} s in {folder / cpa.DATABASE}", file=out)
            await asyncio.to_thread(cpa.set_prepend, path, prepend)
            print(f"CellProfiler Analyst: open {path} (images from {prepend})", file=out)


async def _presign_cpa(store: ObjectStore, properties: Path, expires_s: int) -> str:
    """Writes presigned image URLs into the downloaded CPA database; returns the prepend."""
    database = properties.with_name(cpa.DATABASE)
    columns = cpa.image_columns(await asyncio.to_thread(properties.read_text))
    urls = {
        (number, i): await store.presign(key, expires_s)
        for number, i, key in await asyncio.to_thread(cpa.stored_images, database, columns)
    }
    return await asyncio.to_thread(cpa.write_presigned, database, columns, urls)


async def cmd_reduce(client: CellmeshClient, args: argparse.Namespace, out: TextIO) -> None:
    report = await client.reduce_now(args.plate, args.pipeline or "", args.feature or [])
    _print_report(report, ObjectStoreConfig.discover().bucket, out)


# Arguments


def build_parser(env: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The command line, with defaults from `env` (the process's environment)."""
    env = dict(os.environ) if env is None else env
    root = argparse.ArgumentParser(
        prog="cellmesh",
        description="Run CellProfiler on a microscope's plates through a cellmesh.",
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    root.add_argument(
        "--catalog",
        default=env.get("CELLMESH_CATALOG") or None,
        metavar="ADDR",
        help="the catalog's host:port (default: CELLMESH_CATALOG, else the mesh `cellmesh up` "
        f"started, else {DEFAULT_CATALOG})",
    )
    root.add_argument(
        "--reducer",
        default=env.get("CELLMESH_REDUCER") or None,
        metavar="ADDR",
        help="the reducer's host:port, for `reduce` (default: CELLMESH_REDUCER, else the mesh "
        f"`cellmesh up` started, else {DEFAULT_REDUCER})",
    )
    commands = root.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text in MESH_COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)

    pipeline = commands.add_parser("pipeline", help="register and list CellProfiler pipelines")
    pipeline_cmds = pipeline.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = pipeline_cmds.add_parser("register", help="register a .cppipe file")
    p.add_argument("file", metavar="FILE", help="the .cppipe file")
    p.add_argument("--name", help="a name for people (default: the file's name)")
    p.add_argument(
        "--attach",
        action="append",
        metavar="FILE",
        help="a file the pipeline reads besides the channel images (illumination function, metadata "
        "CSV, model), found under its own name in the Default Input Folder; NAME=FILE puts it under "
        "NAME (e.g. illum/Channel1ILLUM.mat=./Channel1ILLUM.mat); repeat for each file",
    )
    p.add_argument(
        "--from-stage",
        action="append",
        metavar="NAME",
        help="a file the pipeline reads that an earlier plate-scope stage writes (e.g. IllumDNA.npy): "
        "not attached, the pipeline then runs only after a plate stage; repeat for each file",
    )
    p.add_argument(
        "--scope",
        choices=["site", "plate"],
        default="",
        help="run it once per site or once per plate (default: per plate if a module works across "
        "image sets, e.g. CorrectIlluminationCalculate 'All', per site otherwise)",
    )
    p.set_defaults(run=cmd_pipeline_register)
    p = pipeline_cmds.add_parser("list", help="list registered pipelines")
    p.set_defaults(run=cmd_pipeline_list)

    plate = commands.add_parser("plate", help="create, list, show and finish plates")
    plate_cmds = plate.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = plate_cmds.add_parser(
        "create",
        help="create a plate",
        description="Create a plate. Give a layout (any of --rows, --columns, --sites, --first-site, "
        "--wells) when the sites to expect are known: the plate is then reduced as soon as they "
        "are done. Without one, run `cellmesh plate finish` after the last image.",
    )
    p.add_argument("name", metavar="NAME", help="letters, digits, '_', '-', '.'; 1 to 64 characters")
    p.add_argument("--channels", required=True, help="the pipeline's image names, e.g. DNA,GFP")
    p.add_argument(
        "--pipeline",
        required=True,
        action="append",
        metavar="SHA",
        help="a pipeline's SHA-256 (or its start); repeat it for a workflow of stages, in order "
        "(e.g. an illumination stage, then the analysis)",
    )
    p.add_argument("--rows", type=int, help="well rows: 8, 16 or 32 (layout default 8)")
    p.add_argument("--columns", type=int, help="well columns: 12, 24 or 48 (layout default 12)")
    p.add_argument("--sites", type=int, help="sites per well (layout default 1)")
    p.add_argument("--first-site", type=int, help="number of the first site, 0 or 1 (layout default 0)")
    p.add_argument("--wells", help="only these wells, e.g. A01,A02 (default: every well)")
    p.add_argument("--strict", action="store_true", help="report only when every site succeeded")
    p.add_argument(
        "--platemap",
        metavar="FILE",
        help="a plate map CSV: a well column (Well, well_position) or Row and Column or ImageNumber, "
        "then any columns (treatment, dose, control role)",
    )
    _add_qc_arguments(p)
    p.set_defaults(run=cmd_plate_create)
    p = plate_cmds.add_parser("list", help="list plates")
    p.set_defaults(run=cmd_plate_list)
    p = plate_cmds.add_parser("show", help="a plate and its progress per pipeline")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=cmd_plate_show)
    p = plate_cmds.add_parser("finish", help="declare that no more images will come")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(run=cmd_plate_finish)
    p = plate_cmds.add_parser("add-pipeline", help="run another pipeline on every site")
    p.add_argument("name", metavar="NAME")
    p.add_argument("pipeline", metavar="SHA", help="the pipeline's SHA-256 (or its start)")
    p.set_defaults(run=cmd_plate_add_pipeline)

    platemap_cmd = commands.add_parser("platemap", help="register a plate's plate map and QC gate")
    platemap_cmds = platemap_cmd.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = platemap_cmds.add_parser(
        "register",
        help="register (or replace) a plate's map and/or QC gate",
        description="Register a plate map CSV with a plate; its columns become Metadata_* columns of "
        "every report table, and its control and dose columns give the report's Z', V-factor and EC50.",
    )
    p.add_argument("plate", metavar="PLATE")
    p.add_argument("file", metavar="FILE", nargs="?", help="the plate map CSV (omit to change only the gate)")
    _add_qc_arguments(p)
    p.set_defaults(run=cmd_platemap_register)

    p = commands.add_parser(
        "ingest",
        help="upload and register a folder of images",
        description=(
            "Upload a folder's images and register them with the catalog.\n\n"
            "File names are read with a regular expression with named groups: Channel; Well, or\n"
            "WellRow and WellColumn; optionally Plate and Site (other groups are ignored). Images\n"
            "already registered with the same content are skipped, so running it again is cheap.\n"
            "Files that cannot be read are listed, never dropped silently."
        ),
        epilog="example (BBBC013, Channel1-01-A-01.tif):\n"
        "  cellmesh ingest images --plate P1 --channel-map 1=GFP,2=DNA \\\n"
        "    --pattern 'Channel(?P<Channel>\\d)-(?P<ImageNumber>\\d+)-(?P<WellRow>[A-P])-(?P<WellColumn>\\d+)\\.tif'\n"
        "\n" + ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("folder", metavar="FOLDER")
    p.add_argument("--plate", help="the plate (required unless the pattern has a Plate group)")
    p.add_argument("--pattern", required=True, metavar="REGEX", help="regular expression with named groups")
    p.add_argument(
        "--channel-map", metavar="MAP", help="raw channel values to channel names, e.g. 1=GFP,2=DNA"
    )
    p.add_argument(
        "--site", type=int, default=0, help="the site when the pattern has no Site group (default 0)"
    )
    p.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help="keep scanning every SECONDS for new files until interrupted; a file is taken once its "
        "size stopped changing between two scans",
    )
    p.add_argument("--concurrency", type=int, default=8, help="uploads at once (default 8)")
    p.add_argument("--replace", action="store_true", help="replace images registered with other content")
    p.add_argument("--recursive", action="store_true", help="look into subfolders too")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_ingest)

    p = commands.add_parser("follow", help="follow a plate's progress until its report is registered")
    p.add_argument("plate", metavar="PLATE")
    p.add_argument("--pipeline", metavar="SHA", help="the pipeline (default: the plate's first)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(run=cmd_follow)

    p = commands.add_parser("sites", help="a plate's sites with state and failure")
    p.add_argument("plate", metavar="PLATE")
    p.add_argument(
        "--state",
        action="append",
        metavar="STATE",
        help="only these states: waiting, ready, claimed, queued, running, done, failed (repeat or comma-separate)",
    )
    p.add_argument("--pipeline", metavar="SHA", help="the pipeline (default: the plate's first)")
    p.set_defaults(run=cmd_sites)

    p = commands.add_parser("requeue", help="run failed (or given) sites again")
    p.add_argument("plate", metavar="PLATE")
    p.add_argument(
        "--site",
        action="append",
        metavar="WELL/SITE",
        help="e.g. A01/0 (repeat; default: every failed site); a running site is taken from its worker; "
        "with --pipeline of a plate stage that runs per group: the job of that site's group",
    )
    p.add_argument("--pipeline", metavar="SHA", help="the pipeline (default: the plate's first)")
    p.add_argument(
        "--reduce", action="store_true", help="issue a failed reduce again (alone, unless --site is given)"
    )
    p.set_defaults(run=cmd_requeue)

    p = commands.add_parser("report", help="fetch a plate report's files (heatmaps, tables) into a folder")
    p.add_argument("plate", metavar="PLATE")
    p.add_argument("--version", type=int, default=0, help="the report version (default: the latest)")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the files")
    p.add_argument("--pipeline", metavar="SHA", help="the pipeline (default: the plate's first)")
    p.add_argument(
        "--images",
        action="store_true",
        help="also download the plate's images into DIR/images/ and point the CellProfiler Analyst "
        "properties at them (else CPA reads them by presigned URLs)",
    )
    p.add_argument(
        "--presign",
        type=int,
        metavar="SECONDS",
        help="how long the presigned image URLs in the copy's CellProfiler Analyst database "
        "stay valid (default and most: 604800, 7 days)",
    )
    p.set_defaults(run=cmd_report)

    p = commands.add_parser("reduce", help="make a report of the plate's current results now (reducer)")
    p.add_argument("plate", metavar="PLATE")
    p.add_argument(
        "--feature", action="append", metavar="NAME", help="also draw a heatmap of this feature (repeat)"
    )
    p.add_argument("--pipeline", metavar="SHA", help="the pipeline (default: the plate's first)")
    p.set_defaults(run=cmd_reduce)
    return root


#: The local mesh's commands, run by `python -m services.mesh` (the services' package).
MESH_COMMANDS = {
    "up": "start a local mesh on this machine and keep it running (`cellmesh up --help`)",
    "down": "stop the local mesh `cellmesh up` started",
    "status": "what the local mesh runs, and where",
}


def run_mesh_command(argv: Sequence[str]) -> int:
    """`cellmesh up|down|status ...`: runs `python -m services.mesh ...` with
    this interpreter, which must have the services installed (a clone's .venv)."""
    import importlib.util

    try:
        found = importlib.util.find_spec("services.mesh.up") is not None
    except ImportError:
        found = False
    if not found:
        return _error(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"`cellmesh {argv[0]}` needs the cellmesh services, which are not installed with {sys.executable}:"
            " run it from a clone of the repository (`make setup`, then `.venv/bin/cellmesh "
            f"{argv[0]}`), or start the services as docs/operations.md says",
        )
    proc = subprocess.Popen([sys.executable, "-m", "services.mesh", *argv])
    # Ctrl-C reaches both processes; the mesh stops itself in order, so this
    # one must not interrupt it.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def resolve_addresses(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> str:
    """Fills in `args.catalog` and `args.reducer` not given by a flag or the
    environment from the file `cellmesh up` wrote, else the defaults; returns
    that file's path when it was used ("" otherwise)."""
    used = ""
    if not args.catalog or not args.reducer:
        mesh = meshconfig.load(env)
        if mesh is not None:
            if not args.catalog and mesh.catalog:
                args.catalog, used = mesh.catalog, str(mesh.path)
            if not args.reducer and mesh.reducer:
                args.reducer = mesh.reducer
                used = used or (str(mesh.path) if args.command == "reduce" else "")
    args.catalog = args.catalog or DEFAULT_CATALOG
    args.reducer = args.reducer or DEFAULT_REDUCER
    args.credentials = resolve_credentials(env)
    return used


def resolve_credentials(env: Mapping[str, str] | None = None) -> Credentials | None:
    """The environment's credentials (`CELLMESH_CA`, ...; cellmesh.auth),
    else the file's `cellmesh up` wrote, else none (plain text)."""
    source = os.environ if env is None else env
    try:
        credentials = Credentials.from_env(source)
    except OSError as exc:
        raise meshconfig.MeshConfigError(
            f"cannot read {exc.filename} ({exc.strerror}): check CELLMESH_CA, "
            "CELLMESH_CERT, CELLMESH_KEY, CELLMESH_TOKEN_FILE"
        ) from None
    if credentials is not None:
        return credentials
    mesh = meshconfig.load(source)
    if mesh is None:
        return None
    credentials = mesh.credentials()
    token = source.get("CELLMESH_TOKEN")
    return credentials.with_token(token) if credentials is not None and token else credentials


async def _run(args: argparse.Namespace, out: TextIO) -> None:
    reducer = args.reducer if args.command == "reduce" else None
    async with CellmeshClient(
        args.catalog, reducer, credentials=getattr(args, "credentials", None)
    ) as client:
        await args.run(client, args, out)


def _handshake_refused(message: str) -> bool:
    words = ("handshake", "ssl", "tls", "certificate", "socket closed")
    return any(w in message.lower() for w in words)


def _error(code: grpc.StatusCode, message: str) -> int:
    print(f"error: {code.name}: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the exit status (0, 1 on an error, 130 when interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MESH_COMMANDS:
        return run_mesh_command(argv)
    args = build_parser().parse_args(argv)
    out: Any = sys.stdout
    from_file = ""
    try:
        from_file = resolve_addresses(args)
        asyncio.run(_run(args, out))
    except meshconfig.MeshConfigError as exc:
        return _error(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
    except CellmeshError as exc:
        if exc.code == grpc.StatusCode.UNAVAILABLE and from_file:
            return _error(
                exc.code,
                f"{exc.message} (the address comes from {from_file}, written by `cellmesh up`:"
                " is that mesh still running? `cellmesh status` says)",
            )
        if exc.code == grpc.StatusCode.UNAVAILABLE and _handshake_refused(exc.message):
            return _error(
                exc.code,
                f"{exc.message} (a mesh with TLS closes connections without a client certificate of its CA:"
                " set CELLMESH_CA, CELLMESH_CERT and CELLMESH_KEY; see `cellmesh --help`)",
            )
        return _error(exc.code, exc.message)
    except ValueError as exc:
        return _error(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except FileNotFoundError as exc:
        return _error(grpc.StatusCode.NOT_FOUND, f"{exc.filename}: {exc.strerror}")
    except PermissionError as exc:
        return _error(grpc.StatusCode.PERMISSION_DENIED, f"{exc.filename}: {exc.strerror}")
    except BrokenPipeError:
        # The reader went away (e.g. `cellmesh plate list | head`): not an error.
        # Point stdout at /dev/null so the interpreter's final flush stays quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:
        return _error(grpc.StatusCode.UNKNOWN, str(exc))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
