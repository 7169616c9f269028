"""Reducing a plate's per-site tables to per-plate tables and per-well aggregates.

``reduce_plate`` reads every site's tables (fetched by key, never by listing a
bucket) and writes, for each table ``T`` (``Image``, ``Nuclei``, …):

``T.parquet``, ``T.csv.gz``
    every site's rows, concatenated in plate order (well by well, site by
    site), with the identity columns of :mod:`services.reducer.tables` in
    front. Columns are the union over all sites: a column a site lacks is
    empty there; a column whose type differs between sites takes the wider
    type (no value < bool < integer < float < text).
``wells_T.csv``
    one row per well: ``Metadata_Plate``, ``Metadata_Well``,
    ``Metadata_Object_Count`` (the well's rows) and the median of every
    numeric feature, named ``T_<feature>``, as ``pycytominer.aggregate``
    computes it with strata ``Metadata_Plate, Metadata_Well``,
    ``operation="median"`` and ``compute_object_count=True``: features are the
    numeric columns that are not ``Metadata_*``, ``ImageNumber`` or
    ``ObjectNumber``, so ``Location_*``, ``Parent_*``, ``Children_*`` and
    ``Number_Object_Number`` are aggregated like any measurement (pycytominer
    drops nothing else either; use its ``feature_select`` for that). Missing
    values are skipped; a feature with no value in a well is empty. A well
    whose sites found no object has a row with count 0 and empty medians
    (pycytominer would have no row: there is nothing to group).

``cells_per_well.csv`` gives, per well, the sum over its sites of the Image
table's ``Count_<Object>`` (the object is an option, by default the first of
``Cells`` and ``Nuclei`` that the Image table counts), the number of sites
reduced and missing. ``summary.json`` describes it all.

Memory stays bounded as plates grow. Sites are taken in plate order in chunks
of a few MB; each chunk's sites are fetched while the previous chunk is
parsed, consecutive sites with the same header are parsed together (the cost
of reading a 2,000-column CSV is mostly per file), and each chunk is spooled
to local disk as Arrow. A second pass streams the chunks into the Parquet and
CSV writers under the unified schema and computes each well's medians when
the well is complete. Only one chunk, one well's feature matrix and one
Parquet row group are in memory at a time.

A site whose result file is missing, does not match its checksum or cannot be
parsed is left out and reported as missing, with the reason; an error of the
object store itself (unreachable) fails the reduce.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import dataclasses
import functools
import gzip
import hashlib
import json
import logging
import math
import shutil
import threading
import warnings
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from cellmesh.platemap import PlateMap

from services.reducer import qcreport
from services.reducer.tables import (
    ADDED_COLUMNS,
    IMAGE_NUMBER,
    META_PLATE,
    META_WELL,
    OBJECT_NUMBER,
    Header,
    SiteRows,
    TableError,
    add_identity,
    normalize_well,
    read_table,
    site_key,
    well_position,
)

log = logging.getLogger(__name__)

#: ``fetch(key, sha256) -> bytes``: reads one stored object. It may raise
#: LookupError (no such object) or ValueError (bad checksum) for one site;
#: any other exception fails the reduce.
Fetch = Callable[[str, str], Awaitable[bytes]]

OBJECT_COUNT = "Metadata_Object_Count"
DEFAULT_COUNT_OBJECTS = ("Cells", "Nuclei")


class FileKind(StrEnum):
    """What a file of a reduce is (matches the catalog's ReportFileKind)."""

    OBJECT_TABLE_PARQUET = "object_table_parquet"
    OBJECT_TABLE_CSV = "object_table_csv"
    WELL_TABLE = "well_table"
    HEATMAP_PNG = "heatmap_png"
    SUMMARY_JSON = "summary_json"
    QC_TABLE = "qc_table"
    QC_PLOT_PNG = "qc_plot_png"
    QC_PAGE = "qc_page"
    CPA_DATABASE = "cpa_database"
    CPA_PROPERTIES = "cpa_properties"


@dataclass(frozen=True)
class FileRef:
    """A stored result file: its key, SHA-256 (checked when given) and size (0 if unknown)."""

    key: str
    sha256: str = ""
    size: int = 0


class SiteInput(NamedTuple):
    """One done site and its result tables: table name -> stored file."""

    plate: str
    well: str
    site: int
    tables: Mapping[str, FileRef]


#: A site as callers may give it: a SiteInput or a plain tuple whose files
#: are FileRefs or (key, sha256) pairs.
SiteLike = SiteInput | tuple[str, str, int, Mapping[str, FileRef | tuple[str, str]]]


@dataclass(frozen=True)
class MissingSite:
    """A site left out of the reduce: its state (e.g. "FAILED", "DONE") and why."""

    plate: str
    well: str
    site: int
    state: str
    reason: str


@dataclass(frozen=True)
class OutputFile:
    name: str
    kind: FileKind
    path: Path


@dataclass(frozen=True)
class TableSummary:
    rows: int
    columns: int
    features: int
    sites: int
    header: str  # "one-row", "two-row" or "mixed"


@dataclass(frozen=True)
class ReduceOptions:
    #: Object whose ``Count_<Object>`` makes cells_per_well; None: the first of Cells, Nuclei.
    count_object: str | None = None
    #: The per-image table's name.
    image_table: str = "Image"
    #: Also write each object table as CSV.
    write_csv: bool = True
    #: gzip level of the CSV copies (1 fastest .. 9 smallest); None writes plain .csv.
    csv_gzip_level: int | None = 1
    #: Result files fetched at once ...
    fetch_concurrency: int = 8
    #: ... for at most this many sites ahead of the one being parsed.
    fetch_ahead: int = 32
    #: Sites are parsed in chunks of about this many bytes of CSV ...
    chunk_bytes: int = 16 << 20
    #: ... and at most this many sites.
    chunk_sites: int = 256
    #: Parquet row groups are about this large (uncompressed).
    row_group_bytes: int = 32 << 20
    #: Features that must exist (e.g. for heatmaps); checked before writing anything.
    require_features: tuple[str, ...] = ()
    #: Extra facts copied into summary.json (pipeline, generation, …).
    labels: Mapping[str, Any] = field(default_factory=dict)


class _Stopped(Exception):
    """The reduce was cancelled; the worker thread stops early."""


class UnknownFeature(LookupError):
    """A required feature is in none of the reduced tables."""


@dataclass
class ReduceOutputs:
    plate: str
    out_dir: Path
    files: list[OutputFile]
    #: Wells with at least one reduced site, in plate order.
    wells: list[str]
    #: Sites reduced.
    sites: int
    missing: list[MissingSite]
    tables: dict[str, TableSummary]
    #: table -> the feature columns of wells_<table>.csv.
    features: dict[str, list[str]]
    #: The object counted per well, and the counts (NaN where unknown).
    count_object: str | None
    cells_per_well: dict[str, float]
    #: Wells with missing sites -> how many.
    missing_per_well: dict[str, int]
    summary: dict[str, Any]
    #: Per-well values for plate QC: the wells (plate order), their values
    #: (wells x features: the mean over the well's sites of each site's value,
    #: an object feature's site value being the mean of its finite values, as
    #: CellProfiler's CalculateStatistics takes it) and the features' names
    #: (``<table>_<feature>``, e.g. ``Image_Count_Nuclei``, ``Nuclei_Math_Ratio1``).
    qc_wells: list[str] = field(default_factory=list)
    qc_values: npt.NDArray[np.float64] = field(default_factory=lambda: np.empty((0, 0)))
    qc_features: list[str] = field(default_factory=list)
    #: The plate's QC (statistics, the gate's verdict), for the plots.
    qc: qcreport.PlateQc | None = None

    def find_feature(self, name: str) -> tuple[str, str]:
        """(table, column of wells_<table>.csv) of a feature given as
        ``Nuclei_AreaShape_Area`` or as ``AreaShape_Area`` (then the first
        object table that has it, the Image table last)."""
        found = find_feature(self.features, name, self.summary.get("image_table", "Image"))
        if found is None:
            raise UnknownFeature(f"no reduced table has a feature {name!r}")
        return found

    def well_values(self, name: str) -> tuple[str, str, dict[str, float]]:
        """The per-well medians of a feature: (table, column, well -> value)."""
        table, column = self.find_feature(name)
        values: dict[str, float] = {}
        with (self.out_dir / f"wells_{table}.csv").open(newline="") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                raw = row[column]
                values[row[META_WELL]] = float(raw) if raw else math.nan
        return table, column, values


def find_feature(
    features: Mapping[str, Sequence[str]], name: str, image_table: str
) -> tuple[str, str] | None:
    order = [t for t in features if t != image_table] + [t for t in features if t == image_table]
    for table in order:
        if name in features[table]:
            return table, name
    for table in order:
        if f"{table}_{name}" in features[table]:
            return table, f"{table}_{name}"
    return None


# --------------------------------------------------------------------------
# Column types


_RANK = {pa.null(): 0, pa.bool_(): 1, pa.int64(): 2, pa.float64(): 3, pa.string(): 4}


def wider(a: pa.DataType, b: pa.DataType) -> pa.DataType:
    """The type both a and b fit in: no value < bool < int64 < float64 < text."""
    return a if _RANK.get(a, 4) >= _RANK.get(b, 4) else b


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """The table with exactly `schema`'s columns: missing ones empty, others cast."""
    if table.schema.equals(schema):
        return table
    n = table.num_rows
    columns = []
    for f in schema:
        index = table.schema.get_field_index(f.name)
        if index < 0:
            columns.append(pa.nulls(n, f.type))
            continue
        col = table.column(index)
        columns.append(col if col.type == f.type else col.cast(f.type))
    return pa.Table.from_arrays(columns, schema=schema)


def is_metadata(name: str) -> bool:
    """Columns pycytominer does not aggregate."""
    return name.startswith("Metadata_") or name in (IMAGE_NUMBER, OBJECT_NUMBER)


def _is_numeric(t: pa.DataType) -> bool:
    return t in (pa.bool_(), pa.int64(), pa.float64())


class _Schema:
    """A table's columns as they accumulate over the sites, in first-seen order."""

    def __init__(self) -> None:
        self.types: dict[str, pa.DataType] = {}
        self.prefixed: set[str] = set()
        self.header_rows: set[int] = set()

    def add(self, schema: pa.Schema, prefixed: frozenset[str], header_rows: set[int]) -> None:
        for f in schema:
            self.types[f.name] = wider(self.types.get(f.name, pa.null()), f.type)
        self.prefixed |= prefixed
        self.header_rows |= header_rows

    def final(self) -> pa.Schema:
        # A column no site filled is numeric, as pandas reads an empty column.
        return pa.schema([(n, pa.float64() if t == pa.null() else t) for n, t in self.types.items()])


def feature_columns(schema: pa.Schema, table: str, prefixed: set[str]) -> tuple[list[str], list[str]]:
    """(columns to aggregate, their names in wells_<table>.csv)."""
    columns = [f.name for f in schema if _is_numeric(f.type) and not is_metadata(f.name)]
    names: list[str] = []
    taken: set[str] = set()
    for c in columns:
        name = c if c in prefixed else f"{table}_{c}"
        while name in taken:  # one-row and two-row headers mixed in one table
            name += "_"
        taken.add(name)
        names.append(name)
    return columns, names


# --------------------------------------------------------------------------
# Pass 1: fetch, parse and spool chunks of sites


@dataclass(frozen=True)
class _Site:
    index: int
    plate: str
    well: str
    site: int
    tables: Mapping[str, FileRef]

    @property
    def key(self) -> str:
        return site_key(self.plate, self.well, self.site)

    def rows(self, n: int) -> SiteRows:
        return SiteRows(self.plate, self.well, self.site, n)


@dataclass
class _ChunkTable:
    path: Path
    rows: int
    runs: list[SiteRows]
    schema: pa.Schema
    prefixed: frozenset[str]
    header_rows: set[int]


@dataclass
class _Chunk:
    sites: list[_Site]
    tables: dict[str, _ChunkTable] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    mismatches: dict[str, dict[str, str]] = field(default_factory=dict)


async def _fetch_site(s: _Site, fetch: Fetch, limit: asyncio.Semaphore) -> tuple[dict[str, bytes], str]:
    """A site's tables, or the reason the site cannot be reduced."""
    data: dict[str, bytes] = {}
    for table, ref in s.tables.items():
        async with limit:
            try:
                blob = await fetch(ref.key, ref.sha256)
            except (LookupError, ValueError) as exc:
                return {}, f"{table} result {ref.key}: {exc}"
        if ref.sha256 and hashlib.sha256(blob).hexdigest() != ref.sha256:
            return {}, f"{table} result {ref.key}: its SHA-256 does not match the catalog's"
        data[table] = blob
    return data, ""


async def _fetched_in_order(
    sites: Sequence[_Site], fetch: Fetch, options: ReduceOptions
) -> AsyncGenerator[tuple[_Site, dict[str, bytes], str], None]:
    """Each site's tables in plate order, fetching up to `fetch_ahead` sites
    ahead (at most `fetch_concurrency` requests at once)."""
    limit = asyncio.Semaphore(options.fetch_concurrency)
    ahead: collections.deque[tuple[_Site, asyncio.Future[tuple[dict[str, bytes], str]]]] = collections.deque()
    upcoming = iter(sites)

    def top_up() -> None:
        while len(ahead) < max(options.fetch_ahead, 1):
            s = next(upcoming, None)
            if s is None:
                return
            ahead.append((s, asyncio.ensure_future(_fetch_site(s, fetch, limit))))

    try:
        top_up()
        while ahead:
            s, task = ahead.popleft()
            data, failure = await task
            top_up()
            yield s, data, failure
    finally:
        for _, task in ahead:
            task.cancel()
        await asyncio.gather(*(task for _, task in ahead), return_exceptions=True)


def _header_end(data: bytes, rows: int) -> int:
    end = 0
    for _ in range(rows):
        nl = data.find(b"\n", end)
        if nl < 0:
            return len(data)
        end = nl + 1
    return end


def _header_rows(data: bytes) -> int:
    """2 if the table starts with ExportToSpreadsheet's object-name row, else 1."""
    first = data[: _header_end(data, 1)].removeprefix(b"\xef\xbb\xbf")
    return 2 if first.startswith((b"Image,", b"Image\t", b"Image;", b"Image|")) else 1


def _header_key(data: bytes) -> bytes:
    """The header row(s) as bytes: sites whose keys are equal parse together."""
    return data[: _header_end(data, _header_rows(data))]


def _count_rows(data: bytes, start: int) -> int:
    """Non-empty lines of data[start:], as the CSV reader counts rows (no
    newlines inside values)."""
    if start >= len(data):
        return 0
    if (
        data.find(b"\n\n", start) >= 0
        or data.find(b"\n\r\n", start) >= 0
        or data.startswith((b"\n", b"\r\n"), start)
    ):
        return sum(1 for line in data[start:].split(b"\n") if line.strip(b"\r"))
    return data.count(b"\n", start) + (0 if data.endswith(b"\n") else 1)


def _parse_group(items: Sequence[tuple[_Site, bytes]]) -> tuple[pa.Table, Header, list[SiteRows]]:
    """Parses sites with the same header as one CSV."""
    if len(items) == 1:
        site, data = items[0]
        table, header = read_table(data)
        return table, header, [site.rows(table.num_rows)]
    pieces: list[bytes | memoryview] = [_header_key(items[0][1])]
    runs: list[SiteRows] = []
    for site, data in items:
        start = _header_end(data, _header_rows(data))
        pieces.append(memoryview(data)[start:])  # no copy until the join
        if start < len(data) and not data.endswith(b"\n"):
            pieces.append(b"\n")
        runs.append(site.rows(_count_rows(data, start)))
    joined = b"".join(pieces)
    del pieces
    table, header = read_table(joined)
    if table.num_rows != sum(r.rows for r in runs):
        raise TableError("row count differs from the line count")
    return table, header, runs


def _unify(tables: Sequence[pa.Table]) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    types: dict[str, pa.DataType] = {}
    for t in tables:
        for f in t.schema:
            types[f.name] = wider(types.get(f.name, pa.null()), f.type)
    schema = pa.schema(list(types.items()))
    return pa.concat_tables([conform(t, schema) for t in tables])


def _parse_chunk(
    chunk: _Chunk, data: dict[int, dict[str, bytes]], spool: Path, number: int, stop: threading.Event
) -> None:
    """Parses a chunk's tables, adds the sites' identity and spools each table
    to one Arrow file. Runs in a worker thread."""
    names: list[str] = []
    for s in chunk.sites:
        names += [t for t in s.tables if t not in names]
    parsed: dict[str, list[tuple[pa.Table, Header, list[SiteRows]]]] = {}
    for name in names:
        if stop.is_set():
            raise _Stopped
        items = [(s, data[s.index][name]) for s in chunk.sites if s.index in data and name in data[s.index]]
        groups: list[list[tuple[_Site, bytes]]] = []
        for item in items:
            if groups and _header_key(groups[-1][0][1]) == _header_key(item[1]):
                groups[-1].append(item)
            else:
                groups.append([item])
        out: list[tuple[pa.Table, Header, list[SiteRows]]] = []
        for group in groups:
            try:
                out.append(_parse_group(group))
                continue
            except TableError as exc:
                if len(group) == 1:
                    chunk.failed.setdefault(group[0][0].index, _unreadable(name, group[0][0], exc))
                    continue
            for site, blob in group:  # find the site(s) that spoil the group
                try:
                    out.append(_parse_group([(site, blob)]))
                except TableError as exc:
                    chunk.failed.setdefault(site.index, _unreadable(name, site, exc))
        parsed[name] = out
    failed_keys = {s.key for s in chunk.sites if s.index in chunk.failed}
    for name, groups_out in parsed.items():
        tables: list[pa.Table] = []
        runs: list[SiteRows] = []
        header_rows: set[int] = set()
        prefixed: frozenset[str] = frozenset()
        for table, header, group_runs in groups_out:
            if failed_keys & {r.key for r in group_runs}:
                keep = [r for r in group_runs if r.key not in failed_keys]
                offsets = np.cumsum([0] + [r.rows for r in group_runs])
                mask = np.zeros(table.num_rows, dtype=bool)
                for i, r in enumerate(group_runs):
                    if r.key not in failed_keys:
                        mask[offsets[i] : offsets[i + 1]] = True
                table, group_runs = table.filter(pa.array(mask)), keep
                if not group_runs:
                    continue
            table, mismatches = add_identity(table, group_runs)
            for column, sites in mismatches.items():
                chunk.mismatches.setdefault(column, {}).update(sites)
            tables.append(table)
            runs += group_runs
            header_rows.add(header.rows)
            prefixed |= header.prefixed
        if not tables:
            continue
        table = _unify(tables)
        path = spool / f"{number:06d}-{len(chunk.tables):03d}.arrow"
        with ipc.new_file(str(path), table.schema, options=ipc.IpcWriteOptions(compression="lz4")) as w:
            w.write_table(table)
        chunk.tables[name] = _ChunkTable(path, table.num_rows, runs, table.schema, prefixed, header_rows)


def _unreadable(table: str, site: _Site, exc: TableError) -> str:
    return f"{table} result {site.tables[table].key} is unreadable: {exc}"


# --------------------------------------------------------------------------
# Pass 2: write per-plate tables and per-well aggregates


def _float_text(values: npt.NDArray[np.float64]) -> list[str]:
    return ["" if v != v else repr(v) for v in values.tolist()]


def _median(parts: list[npt.NDArray[np.float64]], width: int) -> npt.NDArray[np.float64]:
    rows = sum(p.shape[0] for p in parts)
    if rows == 0 or width == 0:
        return np.full(width, np.nan)
    matrix = parts[0] if len(parts) == 1 else np.concatenate(parts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a feature with no value in the well
        return np.asarray(np.nanmedian(matrix, axis=0), dtype=np.float64)


def _matrix(table: pa.Table, columns: Sequence[str]) -> npt.NDArray[np.float64]:
    if not columns or table.num_rows == 0:
        return np.empty((table.num_rows, len(columns)))
    sub = table.select(list(columns))
    sub = sub.cast(pa.schema([(c, pa.float64()) for c in columns])).combine_chunks()
    batch = sub.to_batches()[0]
    return np.asarray(batch.to_tensor(null_to_nan=True, row_major=True))


@contextlib.contextmanager
def _csv_sink(path: Path, level: int | None) -> Iterator[IO[bytes] | gzip.GzipFile]:
    with path.open("wb") as raw:
        if level is None:
            yield raw
            return
        # mtime=0: the same rows give the same bytes.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=level, mtime=0) as gz:
            yield gz


@dataclass
class _WellCounts:
    column: str | None = None
    sums: dict[str, float] = field(default_factory=dict)


def _write_table(
    name: str,
    schema: pa.Schema,
    prefixed: set[str],
    chunks: Sequence[_Chunk],
    out_dir: Path,
    options: ReduceOptions,
    counts: _WellCounts,
    stop: threading.Event,
    platemap: PlateMap | None = None,
) -> tuple[list[OutputFile], list[str], dict[str, npt.NDArray[np.float64]]]:
    columns, out_names = feature_columns(schema, name, prefixed)
    source_schema = schema
    map_fields = _map_fields(platemap, schema)
    schema = _annotated_schema(schema, map_fields)
    well_means: dict[str, npt.NDArray[np.float64]] = {}
    count_index = columns.index(counts.column) if counts.column in columns else None
    files = [OutputFile(f"{name}.parquet", FileKind.OBJECT_TABLE_PARQUET, out_dir / f"{name}.parquet")]
    if options.write_csv:
        csv_name = f"{name}.csv" + ("" if options.csv_gzip_level is None else ".gz")
        files.append(OutputFile(csv_name, FileKind.OBJECT_TABLE_CSV, out_dir / csv_name))
    wells_path = out_dir / f"wells_{name}.csv"
    files.append(OutputFile(wells_path.name, FileKind.WELL_TABLE, wells_path))

    with contextlib.ExitStack() as stack:
        parquet = stack.enter_context(pq.ParquetWriter(files[0].path, schema, compression="zstd"))
        csv_out = None
        if options.write_csv:
            sink = stack.enter_context(_csv_sink(files[1].path, options.csv_gzip_level))
            csv_out = stack.enter_context(pacsv.CSVWriter(sink, schema))
        wells_fh = stack.enter_context(wells_path.open("w", newline=""))
        wells_csv = csv.writer(wells_fh, lineterminator="\n")
        # Every map column goes into the per-well table (it has no other
        # Metadata columns), also one the object table has from its pipeline.
        map_names = list(platemap.columns) if platemap is not None else []
        wells_csv.writerow([META_PLATE, META_WELL, *map_names, OBJECT_COUNT, *out_names])

        # The CSV copy is written in a second thread, one chunk behind.
        csv_thread = stack.enter_context(ThreadPoolExecutor(1, thread_name_prefix="reduce-csv"))
        csv_done: Future[None] | None = None
        pending: list[pa.Table] = []
        pending_bytes = 0
        current: tuple[str, str] | None = None
        parts: list[npt.NDArray[np.float64]] = []
        count_sum: list[float] = []
        site_means: list[npt.NDArray[np.float64]] = []

        def flush_well() -> None:
            if current is None:
                return
            rows = sum(p.shape[0] for p in parts)
            annotation = _map_values(platemap, current[1], map_names)
            wells_csv.writerow(
                [current[0], current[1], *annotation, rows, *_float_text(_median(parts, len(columns)))]
            )
            well_means[current[1]] = _mean_rows([np.vstack(site_means)], len(columns))
            if count_index is not None:
                finite = [v for v in count_sum if v == v]
                counts.sums[current[1]] = float(sum(finite)) if finite else math.nan

        def flush_parquet() -> None:
            nonlocal pending, pending_bytes
            if pending:
                block = pa.concat_tables(pending)
                parquet.write_table(block, row_group_size=max(block.num_rows, 1))
            pending, pending_bytes = [], 0

        for chunk in chunks:
            part = chunk.tables.get(name)
            if part is None:
                continue
            if stop.is_set():
                raise _Stopped
            with ipc.open_file(str(part.path)) as reader:
                table = _annotate(conform(reader.read_all(), source_schema), platemap, map_fields, schema)
            part.path.unlink()
            if csv_out is not None:
                if csv_done is not None:
                    csv_done.result()
                csv_done = csv_thread.submit(csv_out.write_table, table)
            pending.append(table)
            pending_bytes += table.nbytes
            if pending_bytes >= options.row_group_bytes:
                flush_parquet()
            matrix = _matrix(table, columns)
            offset = 0
            for run in part.runs:
                key = (run.plate, run.well)
                if key != current:
                    flush_well()
                    current, parts, count_sum, site_means = key, [], [], []
                rows = matrix[offset : offset + run.rows]
                parts.append(rows)
                site_means.append(_mean_rows([rows], len(columns)))
                if count_index is not None:
                    count_sum += rows[:, count_index].tolist()
                offset += run.rows
            del matrix, table
        flush_well()
        flush_parquet()
        if csv_done is not None:
            csv_done.result()
    return files, out_names, well_means


def _mean_rows(parts: Sequence[npt.NDArray[np.float64]], width: int) -> npt.NDArray[np.float64]:
    """The column means of the rows' finite values (NaN where there is none)."""
    matrix = parts[0] if len(parts) == 1 else (np.concatenate(parts) if parts else np.empty((0, width)))
    if matrix.shape[0] == 0:
        return np.full(width, np.nan)
    finite = np.where(np.isfinite(matrix), matrix, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.asarray(np.nanmean(finite, axis=0), dtype=np.float64)


# --------------------------------------------------------------------------
# The plate map's columns, joined by well (as pycytominer.annotate does)


def _map_type(values: Sequence[str]) -> pa.DataType:
    """int64 if every value is an integer, float64 if every one is a number, else text."""
    present = [v for v in values if v != ""]
    if not present:
        return pa.string()
    try:
        ints = [int(v) for v in present]
    except ValueError:
        ints = None
    if ints is not None and all(-(2**63) <= i < 2**63 for i in ints):
        return pa.int64()
    try:
        [float(v) for v in present]
    except ValueError:
        return pa.string()
    return pa.float64()


def _map_fields(platemap: PlateMap | None, schema: pa.Schema) -> list[pa.Field]:
    """The map's columns a table gets: those it does not have already (a
    pipeline's own Metadata module may have read the same file)."""
    if platemap is None:
        return []
    return [
        pa.field(c, _map_type([v.get(c, "") for v in platemap.wells.values()]))
        for c in platemap.columns
        if c not in schema.names
    ]


def _annotated_schema(schema: pa.Schema, fields: Sequence[pa.Field]) -> pa.Schema:
    """The schema with the map's columns after the identity columns."""
    if not fields:
        return schema
    names = schema.names
    at = max((names.index(c) + 1 for c in ADDED_COLUMNS if c in names), default=0)
    out = list(schema)
    return pa.schema(out[:at] + list(fields) + out[at:])


def _map_values(platemap: PlateMap | None, well: str, names: Sequence[str]) -> list[str]:
    values = platemap.wells.get(well, {}) if platemap is not None else {}
    return [values.get(n, "") for n in names]


def _annotate(
    table: pa.Table, platemap: PlateMap | None, fields: Sequence[pa.Field], schema: pa.Schema
) -> pa.Table:
    if platemap is None or not fields:
        return table
    wells = table.column(META_WELL).to_pylist()
    added: dict[str, pa.Array] = {}
    for f in fields:
        raw = [platemap.wells.get(w, {}).get(f.name, "") if w is not None else "" for w in wells]
        text = pa.array([v if v != "" else None for v in raw], pa.string())
        added[f.name] = text if f.type == pa.string() else text.cast(f.type)
    columns = [added[f.name] if f.name in added else table.column(f.name) for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


# --------------------------------------------------------------------------
# The reduce


T = TypeVar("T")


def _write_cells_per_well(
    path: Path,
    plate: str,
    count_object: str,
    wells: Sequence[str],
    cells: Mapping[str, float],
    sites_per_well: Mapping[str, int],
    missing_per_well: Mapping[str, int],
    platemap: PlateMap | None = None,
) -> None:
    map_names = list(platemap.columns) if platemap is not None else []
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(
            [
                META_PLATE,
                META_WELL,
                *map_names,
                "Metadata_Sites",
                "Metadata_Sites_Missing",
                f"Count_{count_object}",
            ]
        )
        for w in wells:
            value = cells[w]
            writer.writerow(
                [
                    plate,
                    w,
                    *_map_values(platemap, w, map_names),
                    sites_per_well.get(w, 0),
                    missing_per_well.get(w, 0),
                    "" if value != value else repr(value),
                ]
            )


async def _in_thread(fn: Callable[[threading.Event], T]) -> T:
    """Runs fn in a worker thread; if the caller is cancelled, tells fn to
    stop and waits for the thread before letting the cancellation through."""
    stop = threading.Event()
    future = asyncio.ensure_future(asyncio.to_thread(fn, stop))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()  # the thread raises _Stopped at its next check
        with contextlib.suppress(BaseException):
            await future
        raise


def _sorted_sites(sites: Sequence[SiteLike]) -> list[_Site]:
    out: list[_Site] = []
    seen: set[tuple[str, str, int]] = set()
    for raw in sites:
        plate, well, number, tables = raw
        well = normalize_well(well)
        if (plate, well, number) in seen:
            raise ValueError(f"site {site_key(plate, well, number)} is given twice")
        seen.add((plate, well, number))
        refs = {t: r if isinstance(r, FileRef) else FileRef(r[0], r[1]) for t, r in tables.items()}
        out.append(_Site(0, plate, well, int(number), refs))
    out.sort(key=lambda s: (well_position(s.well), s.site))
    return [_Site(i, s.plate, s.well, s.site, s.tables) for i, s in enumerate(out)]


async def reduce_plate(
    sites: Sequence[SiteLike],
    fetch: Fetch,
    out_dir: Path,
    *,
    missing: Sequence[MissingSite] = (),
    options: ReduceOptions | None = None,
    platemap: PlateMap | None = None,
    qc_gate: Mapping[str, Any] | None = None,
) -> ReduceOutputs:
    """Reduces one plate's done sites into `out_dir` (see the module's docstring).

    `sites` are (plate, well, site, {table name: FileRef}); `missing` are the
    sites that are not done, reported as such. `platemap`'s columns are
    joined into every table by well; with it (and `qc_gate`, the catalog's
    QcGate) the plate's QC goes into summary.json and qc.csv. Raises
    UnknownFeature when `options.require_features` names a feature no table has."""
    options = options or ReduceOptions()
    ordered = _sorted_sites(sites)
    plates = {s.plate for s in ordered} | {m.plate for m in missing}
    if len(plates) > 1:
        raise ValueError(f"one plate at a time, got {sorted(plates)}")
    plate = plates.pop() if plates else ""
    missing = [dataclasses.replace(m, well=normalize_well(m.well)) for m in missing]
    spool = out_dir / ".spool"
    await asyncio.to_thread(spool.mkdir, parents=True, exist_ok=True)
    try:
        return await _reduce(plate, ordered, fetch, out_dir, spool, list(missing), options, platemap, qc_gate)
    finally:
        await asyncio.to_thread(shutil.rmtree, spool, True)


async def _reduce(
    plate: str,
    ordered: list[_Site],
    fetch: Fetch,
    out_dir: Path,
    spool: Path,
    missing: list[MissingSite],
    options: ReduceOptions,
    platemap: PlateMap | None = None,
    qc_gate: Mapping[str, Any] | None = None,
) -> ReduceOutputs:
    chunks: list[_Chunk] = []
    schemas: dict[str, _Schema] = {}
    mismatches: dict[str, dict[str, str]] = {}
    failed: dict[int, str] = {}

    async def parse(chunk: _Chunk, data: dict[int, dict[str, bytes]]) -> None:
        await _in_thread(functools.partial(_parse_chunk, chunk, data, spool, len(chunks)))
        chunks.append(chunk)
        for name, part in chunk.tables.items():
            schemas.setdefault(name, _Schema()).add(part.schema, part.prefixed, part.header_rows)
        for column, bad in chunk.mismatches.items():
            mismatches.setdefault(column, {}).update(bad)
        failed.update(chunk.failed)

    # Pass 1: sites in plate order, cut into chunks of about chunk_bytes; the
    # next sites are fetched while a chunk is parsed.
    chunk, data, size = _Chunk([]), {}, 0
    async with contextlib.aclosing(_fetched_in_order(ordered, fetch, options)) as stream:
        async for site, tables, failure in stream:
            chunk.sites.append(site)
            if failure:
                chunk.failed[site.index] = failure
            else:
                data[site.index] = tables
                size += sum(len(b) for b in tables.values())
            if size >= options.chunk_bytes or len(chunk.sites) >= options.chunk_sites:
                await parse(chunk, data)
                chunk, data, size = _Chunk([]), {}, 0
    if chunk.sites:
        await parse(chunk, data)
    del data

    for s in ordered:
        if s.index in failed:
            missing.append(MissingSite(s.plate, s.well, s.site, "DONE", failed[s.index]))
            log.warning("site %s left out of plate %s: %s", s.key, plate, failed[s.index])
    reduced = [s for s in ordered if s.index not in failed]
    final = {name: sch.final() for name, sch in schemas.items()}
    features: dict[str, list[str]] = {}
    columns_of: dict[str, list[str]] = {}
    for name, schema in final.items():
        columns_of[name], features[name] = feature_columns(schema, name, schemas[name].prefixed)
    for wanted in options.require_features:
        if find_feature(features, wanted, options.image_table) is None:
            raise UnknownFeature(f"no table of plate {plate} has a feature {wanted!r}")

    # Which object cells_per_well counts, and from where.
    candidates = (options.count_object,) if options.count_object else DEFAULT_COUNT_OBJECTS
    counts = _WellCounts()
    count_object: str | None = None
    count_source = ""
    image_columns = columns_of.get(options.image_table, [])
    for obj in candidates:
        if f"Count_{obj}" in image_columns:
            count_object, counts.column = obj, f"Count_{obj}"
            count_source = f"{options.image_table}.Count_{obj}, summed over the well's sites"
            break
    else:
        for obj in candidates:
            if obj in final:
                count_object, count_source = obj, f"rows of the {obj} table"
                break

    # Pass 2: one table at a time, in plate order.
    files: list[OutputFile] = []
    table_summaries: dict[str, TableSummary] = {}
    object_rows: dict[str, dict[str, int]] = {}
    qc_parts: list[tuple[list[str], dict[str, npt.NDArray[np.float64]]]] = []
    for name, schema in final.items():
        table_counts = counts if name == options.image_table else _WellCounts()
        written, names, means = await _in_thread(
            functools.partial(
                _write_table,
                name,
                schema,
                schemas[name].prefixed,
                chunks,
                out_dir,
                options,
                table_counts,
                platemap=platemap,
            )
        )
        files += written
        qc_parts.append((names, means))
        runs = [r for c in chunks if name in c.tables for r in c.tables[name].runs]
        per_well: dict[str, int] = {}
        for r in runs:
            per_well[r.well] = per_well.get(r.well, 0) + r.rows
        object_rows[name] = per_well
        rows = schemas[name].header_rows
        table_summaries[name] = TableSummary(
            rows=sum(r.rows for r in runs),
            columns=len(schema),
            features=len(features[name]),
            sites=len(runs),
            header="mixed" if len(rows) > 1 else ("two-row" if rows == {2} else "one-row"),
        )

    wells = sorted({s.well for s in reduced}, key=well_position)
    sites_per_well: dict[str, int] = {}
    for s in reduced:
        sites_per_well[s.well] = sites_per_well.get(s.well, 0) + 1
    missing_per_well: dict[str, int] = {}
    for m in missing:
        w = normalize_well(m.well)
        missing_per_well[w] = missing_per_well.get(w, 0) + 1
    all_wells = sorted(set(wells) | set(missing_per_well), key=well_position)

    cells: dict[str, float] = {}
    if count_object is not None:
        if counts.column is not None:
            cells = {w: counts.sums.get(w, math.nan) for w in all_wells}
        else:
            rows_of = object_rows.get(count_object, {})
            cells = {w: float(rows_of[w]) if w in rows_of else math.nan for w in all_wells}
        path = out_dir / "cells_per_well.csv"
        await asyncio.to_thread(
            _write_cells_per_well,
            path,
            plate,
            count_object,
            all_wells,
            cells,
            sites_per_well,
            missing_per_well,
            platemap,
        )
        files.append(OutputFile(path.name, FileKind.WELL_TABLE, path))

    # Plate QC from the per-well values of every table.
    qc_features = [n for names, _ in qc_parts for n in names]
    qc_values = np.full((len(wells), len(qc_features)), np.nan)
    offset = 0
    for names, means in qc_parts:
        for i, w in enumerate(wells):
            if w in means:
                qc_values[i, offset : offset + len(names)] = means[w]
        offset += len(names)
    missing_json = [
        {"well": m.well, "site": m.site, "state": m.state, "reason": m.reason}
        for m in sorted(missing, key=lambda m: (well_position(m.well), m.site))
    ]
    plate_qc = await asyncio.to_thread(
        qcreport.evaluate,
        wells,
        qc_values,
        qc_features,
        platemap,
        qcreport.Gate.of(qc_gate) if qc_gate else None,
        sites_reduced=len(reduced),
        missing=missing_json,
    )
    if plate_qc.rows:
        qc_path = out_dir / "qc.csv"
        await asyncio.to_thread(qcreport.write_table, qc_path, plate_qc)
        files.append(OutputFile(qc_path.name, FileKind.QC_TABLE, qc_path))

    summary: dict[str, Any] = {
        "plate": plate,
        **dict(options.labels),
        "image_table": options.image_table,
        "wells": len(wells),
        "well_names": wells,
        "sites": len(reduced),
        "missing_sites": missing_json,
        "count_object": count_object,
        "count_source": count_source,
        "tables": {
            name: {
                **vars(t),
                "files": [f.name for f in files if f.name.split(".")[0] in (name, f"wells_{name}")],
            }
            for name, t in table_summaries.items()
        },
        "metadata_mismatches": {
            column: {"sites": len(bad), "examples": dict(list(sorted(bad.items()))[:5])}
            for column, bad in sorted(mismatches.items())
        },
        "aggregation": (
            "median of every numeric non-Metadata column per (Metadata_Plate, Metadata_Well), "
            "as pycytominer.aggregate(operation='median', compute_object_count=True)"
        ),
        "platemap": None
        if platemap is None
        else {
            "columns": list(platemap.columns),
            "wells": len(platemap.wells),
            "reduced_wells_not_in_map": [w for w in wells if w not in platemap.wells],
            "joined": "by Metadata_Well into every table, as pycytominer.annotate; a column a table "
            "has already (from the pipeline's own Metadata module) is kept as the table has it",
        },
        "qc": plate_qc.summary,
    }
    summary_path = out_dir / "summary.json"
    await asyncio.to_thread(summary_path.write_text, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    files.append(OutputFile(summary_path.name, FileKind.SUMMARY_JSON, summary_path))
    return ReduceOutputs(
        plate=plate,
        out_dir=out_dir,
        files=files,
        wells=wells,
        sites=len(reduced),
        missing=missing,
        tables=table_summaries,
        features=features,
        count_object=count_object,
        cells_per_well=cells,
        missing_per_well=missing_per_well,
        summary=summary,
        qc_wells=wells,
        qc_values=qc_values,
        qc_features=qc_features,
        qc=plate_qc,
    )
