"""A plate's report as CellProfiler Analyst opens it: an SQLite database in
the layout CellProfiler's ExportToDatabase writes ("single object table")
and a ``.properties`` file that points at it and at the images.

``cpa.sqlite``
    ``Per_Image``: one row per image set of the reducer's image table
    (``Image.parquet``), in plate order, keyed by ``ImageNumber`` (1, 2, … over
    the whole plate; a site's own ImageNumber restarts at 1 and is kept in
    ``Image_Metadata_ImageKey``). Every column of the image table is there as
    ``Image_<column>``, so ``Image_Metadata_Plate``, ``Image_Metadata_Well``,
    ``Image_Metadata_Site`` and any other ``Metadata_*`` column the reducer's
    tables carry (site metadata, a plate map's columns) come along. For each
    of the plate's channels, ``Image_FileName_<channel>`` and
    ``Image_PathName_<channel>`` say where the stored image is: the last part
    of its object key and the rest (``images/<plate>/<well>/s<site>/<channel>``);
    the worker's own ``FileName_``/``PathName_``/``URL_`` columns of those
    channels pointed at its scratch folder and are replaced.

    ``Per_Object``: one row per (``ImageNumber``, ``ObjectNumber``) with every
    object table's columns prefixed by its object name (``Nuclei_AreaShape_Area``,
    ``Cells_Location_Center_X``), as ExportToDatabase joins objects of one
    image by object number; an object table with fewer objects leaves its
    columns empty there. ``Metadata_*`` columns are image facts and live in
    Per_Image; one that only an object table has (``Nuclei_Metadata_…``) stays
    in Per_Object, and Classifier ignores it.

``cpa.properties``
    the keys CellProfiler Analyst reads (``cpa/properties.py``):
    ``db_type = sqlite``, ``db_sqlite_file`` (relative to the properties
    file, as CPA resolves it), the tables, ``image_id``/``object_id``,
    ``plate_id``/``well_id``, ``cell_x_loc``/``cell_y_loc``, the path and
    file columns per channel with names and colours, ``plate_type`` (or
    ``plate_shape``) and ``image_url_prepend``: the URL under which the
    object store serves the bucket (CPA opens ``prepend + path + "/" + file``).
    ``cellmesh report --out`` rewrites the prepend for a local copy.

Memory stays bounded: the reducer's Parquet tables are read batch by batch,
the catalog's images arrive page by page, and the joins run inside SQLite on
disk (a staging database beside the output, deleted afterwards).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from cellmesh.cpa import DATABASE, PROPERTIES

from services.reducer.reduce import feature_columns
from services.reducer.tables import (
    ADDED_COLUMNS,
    IMAGE_NUMBER,
    META_IMAGE_KEY,
    META_SITE_KEY,
    OBJECT_NUMBER,
    normalize_well,
    site_key,
)

log = logging.getLogger(__name__)

IMAGE_TABLE = "Per_Image"
OBJECT_TABLE = "Per_Object"
PLATE_COLUMN = "Image_Metadata_Plate"
WELL_COLUMN = "Image_Metadata_Well"

#: SQLite's default limit on the columns of a table (SQLITE_MAX_COLUMN).
MAX_COLUMNS = 2000
#: CPA's plate_type values and their (rows, columns) (cpa/properties.py).
PLATE_TYPES = {(2, 3): "6", (4, 6): "24", (8, 12): "96", (16, 24): "384", (32, 48): "1536", (40, 140): "5600"}
COLORS = ("blue", "green", "red", "magenta", "cyan", "yellow", "gray")
#: Per-object columns Classifier should not learn from (regular expressions, as CPA reads them).
IGNORE_COLUMNS = (
    "ImageNumber",
    "ObjectNumber",
    ".*_Parent_.*",
    ".*_Children_.*",
    ".*_Location_.*",
    ".*_Number_Object_Number",
    ".*_Metadata_.*",
)
_BATCH_ROWS = 4096


class CpaError(ValueError):
    """The tables cannot be laid out for CellProfiler Analyst (e.g. too many columns)."""


@dataclass(frozen=True)
class StoredImage:
    """One registered image: its site, channel and object key."""

    well: str
    site: int
    channel: str
    key: str


@dataclass(frozen=True)
class CpaInput:
    """What the database is made from: the reducer's output folder and tables."""

    plate: str
    out_dir: Path
    #: The reducer's image table (``Image``) and object tables, each ``<name>.parquet`` in out_dir.
    image_table: str
    object_tables: Sequence[str]
    #: table -> the feature names of wells_<table>.csv (ReduceOutputs.features), whose
    #: ``<Object>_<feature>`` naming Per_Object takes over.
    features: Mapping[str, Sequence[str]]
    channels: Sequence[str]
    rows: int = 0
    columns: int = 0
    #: The object whose location Classifier shows (default: the first object table with one).
    location_object: str | None = None
    image_url_prepend: str = ""


@dataclass
class CpaSummary:
    images: int = 0
    objects: int = 0
    wells: int = 0
    image_columns: int = 0
    object_columns: int = 0
    #: Image sets with no stored image for a channel: channel -> count.
    images_missing: dict[str, int] = field(default_factory=dict)
    #: Objects whose image is not in the image table (left out).
    orphan_objects: int = 0


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_type(t: pa.DataType) -> str:
    if pa.types.is_boolean(t) or pa.types.is_integer(t):
        return "INTEGER"
    if pa.types.is_floating(t):
        return "REAL"
    return "TEXT"


def _batches(path: Path, columns: Sequence[str]) -> Iterator[list[tuple[object, ...]]]:
    """Rows of the given columns of a Parquet file, a batch at a time."""
    reader = pq.ParquetFile(path)
    for batch in reader.iter_batches(batch_size=_BATCH_ROWS, columns=list(columns)):
        lists = [batch.column(c).to_pylist() for c in columns]
        yield list(zip(*lists, strict=True))


def _object_columns(
    name: str, schema: pa.Schema, features: Sequence[str], image_columns: set[str]
) -> list[tuple[str, str, str]]:
    """(column in the table, column in Per_Object, SQL type) of an object table:
    a numeric column keeps the name the reducer's per-well table gives it,
    another one gets the object's prefix unless it has it. ``Metadata_*``
    columns the image table has too are left to Per_Image."""
    numeric, _ = feature_columns(schema, name, set())
    named = dict(zip(numeric, features, strict=False)) if len(numeric) == len(features) else {}
    out = []
    for f in schema:
        if f.name in (IMAGE_NUMBER, OBJECT_NUMBER) or f.name in ADDED_COLUMNS:
            continue
        if f.name.startswith("Metadata_") and f.name in image_columns:
            continue
        target = named.get(f.name)
        if target is None:
            target = f.name if f.name.startswith(f"{name}_") else f"{name}_{f.name}"
        out.append((f.name, target, _sql_type(f.type)))
    return out


def _image_columns(schema: pa.Schema, channels: Sequence[str]) -> list[tuple[str, str, str]]:
    replaced = {f"{kind}_{c}" for c in channels for kind in ("FileName", "PathName", "URL")}
    out = []
    taken = {"ImageNumber"} | {c for ch in channels for c in channel_columns(ch)}
    for f in schema:
        if f.name == IMAGE_NUMBER:
            continue
        bare = f.name.removeprefix("Image_")
        if bare in replaced:
            continue
        target = f.name if f.name.startswith("Image_") else f"Image_{f.name}"
        while target in taken:  # both Count_X and Image_Count_X in one table
            target += "_"
        taken.add(target)
        out.append((f.name, target, _sql_type(f.type)))
    return out


def channel_columns(channel: str) -> tuple[str, str]:
    """(path column, file column) of a channel in Per_Image."""
    return f"Image_PathName_{channel}", f"Image_FileName_{channel}"


class CpaWriter:
    """Writes ``cpa.sqlite`` and ``cpa.properties`` into `inp.out_dir`, with a
    staging database in `work_dir`. Call `add_images` with the plate's stored
    images (any order, in as many calls as pages), then `finish`. Not thread
    safe; each call may run in another thread, one at a time."""

    def __init__(self, inp: CpaInput, work_dir: Path) -> None:
        self.inp = inp
        self.db_path = inp.out_dir / DATABASE
        self.properties_path = inp.out_dir / PROPERTIES
        self._stage_path = work_dir / "cpa-stage.sqlite"
        self._finished = False
        for p in (self.db_path, self._stage_path):
            p.unlink(missing_ok=True)
        self._db = sqlite3.connect(self.db_path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("ATTACH DATABASE ? AS stage", (str(self._stage_path),))
        self._db.execute("PRAGMA stage.journal_mode=OFF")
        self._db.execute("PRAGMA stage.synchronous=OFF")
        self._db.execute("CREATE TABLE stage.images (site_key TEXT, channel TEXT, path TEXT, file TEXT)")
        self._db.execute("CREATE UNIQUE INDEX stage.images_site ON images (site_key, channel)")
        self._db.execute("BEGIN")

    def close(self) -> None:
        """Closes the databases; a database `finish` did not complete is deleted."""
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._stage_path.unlink(missing_ok=True)
        if not self._finished:
            self.db_path.unlink(missing_ok=True)

    def add_images(self, images: Iterable[StoredImage]) -> None:
        rows = []
        for im in images:
            path, _, file = im.key.rpartition("/")
            key = site_key(self.inp.plate, normalize_well(im.well), im.site)
            rows.append((key, im.channel, path, file))
        # One image per site and channel; a later page's wins.
        self._db.executemany("INSERT OR REPLACE INTO stage.images VALUES (?, ?, ?, ?)", rows)

    def finish(self) -> CpaSummary:
        """Builds both tables and the properties file. Raises CpaError when
        the tables do not fit SQLite's column limit."""
        summary = CpaSummary()
        db = self._db
        self._stage_image_rows(summary)
        self._write_per_image(summary)
        location = self._write_per_object(summary)
        db.execute("COMMIT")
        db.execute("DETACH DATABASE stage")
        db.close()
        self._stage_path.unlink(missing_ok=True)
        self._write_properties(location)
        self._finished = True
        return summary

    # -- Per_Image ---------------------------------------------------------

    def _stage_image_rows(self, summary: CpaSummary) -> None:
        inp = self.inp
        path = inp.out_dir / f"{inp.image_table}.parquet"
        schema = pq.read_schema(path)
        for needed in (META_SITE_KEY, META_IMAGE_KEY):
            if needed not in schema.names:
                raise CpaError(f"the {inp.image_table} table has no {needed} column")
        self._image_cols = _image_columns(schema, inp.channels)
        width = 1 + len(self._image_cols) + 2 * len(inp.channels)
        if width > MAX_COLUMNS:
            raise CpaError(f"Per_Image would have {width} columns, more than SQLite's {MAX_COLUMNS}")
        defs = ", ".join(f"{_q(t)} {ty}" for _, t, ty in self._image_cols)
        self._db.execute(f"CREATE TABLE stage.image_rows (ImageNumber INTEGER PRIMARY KEY, {defs})")
        marks = ", ".join("?" * (1 + len(self._image_cols)))
        number = 0
        for rows in _batches(path, [c for c, _, _ in self._image_cols]):
            numbered = [(number + i + 1, *r) for i, r in enumerate(rows)]
            number += len(rows)
            self._db.executemany(f"INSERT INTO stage.image_rows VALUES ({marks})", numbered)
        summary.images = number
        summary.image_columns = width
        key = _q(f"Image_{META_IMAGE_KEY}")
        self._db.execute(f"CREATE UNIQUE INDEX stage.image_rows_key ON image_rows ({key})")

    def _write_per_image(self, summary: CpaSummary) -> None:
        inp, db = self.inp, self._db
        defs = ["ImageNumber INTEGER PRIMARY KEY"] + [f"{_q(t)} {ty}" for _, t, ty in self._image_cols]
        selects = ["r.ImageNumber"] + [f"r.{_q(t)}" for _, t, _ in self._image_cols]
        joins = []
        site = _q(f"Image_{META_SITE_KEY}")
        for i, channel in enumerate(inp.channels):
            path_col, file_col = channel_columns(channel)
            defs += [f"{_q(file_col)} TEXT", f"{_q(path_col)} TEXT"]
            selects += [f"i{i}.file", f"i{i}.path"]
            joins.append(f"LEFT JOIN stage.images AS i{i} ON i{i}.site_key = r.{site} AND i{i}.channel = ?")
        db.execute(f"CREATE TABLE {IMAGE_TABLE} ({', '.join(defs)})")
        db.execute(
            f"INSERT INTO {IMAGE_TABLE} SELECT {', '.join(selects)} FROM stage.image_rows AS r "
            f"{' '.join(joins)} ORDER BY r.ImageNumber",
            list(inp.channels),
        )
        for channel in inp.channels:
            _, file_col = channel_columns(channel)
            (missing,) = db.execute(
                f"SELECT COUNT(*) FROM {IMAGE_TABLE} WHERE {_q(file_col)} IS NULL"
            ).fetchone()
            if missing:
                summary.images_missing[channel] = int(missing)
        if PLATE_COLUMN in {t for _, t, _ in self._image_cols}:
            (summary.wells,) = db.execute(
                f"SELECT COUNT(*) FROM (SELECT DISTINCT {PLATE_COLUMN}, {WELL_COLUMN} FROM {IMAGE_TABLE})"
            ).fetchone()

    # -- Per_Object --------------------------------------------------------

    def _write_per_object(self, summary: CpaSummary) -> str | None:
        inp, db = self.inp, self._db
        tables: list[tuple[str, list[tuple[str, str, str]]]] = []
        image_names = {src for src, _, _ in self._image_cols}
        for name in inp.object_tables:
            path = inp.out_dir / f"{name}.parquet"
            schema = pq.read_schema(path)
            if OBJECT_NUMBER not in schema.names or META_IMAGE_KEY not in schema.names:
                log.info("table %s has no ObjectNumber or image: not an object table for CPA", name)
                continue
            tables.append((name, _object_columns(name, schema, inp.features.get(name, ()), image_names)))
        names_seen: set[str] = set()
        for _, cols in tables:
            for i, (src, target, ty) in enumerate(cols):
                while target in names_seen or target in (IMAGE_NUMBER, OBJECT_NUMBER):
                    target += "_"
                names_seen.add(target)
                cols[i] = (src, target, ty)
        width = 2 + sum(len(c) for _, c in tables)
        if width > MAX_COLUMNS:
            raise CpaError(
                f"Per_Object would have {width} columns, more than SQLite's {MAX_COLUMNS}: "
                "the database is written for pipelines with fewer per-object features"
            )
        summary.object_columns = width if tables else 0
        if not tables:
            return None
        for t, (name, cols) in enumerate(tables):
            defs = ", ".join(f"{_q(target)} {ty}" for _, target, ty in cols)
            db.execute(
                f"CREATE TABLE stage.o{t} (image_key TEXT, ObjectNumber INTEGER{', ' if cols else ''}{defs})"
            )
            marks = ", ".join("?" * (2 + len(cols)))
            source = [META_IMAGE_KEY, OBJECT_NUMBER] + [src for src, _, _ in cols]
            for rows in _batches(inp.out_dir / f"{name}.parquet", source):
                db.executemany(f"INSERT INTO stage.o{t} VALUES ({marks})", rows)
            db.execute(f"CREATE INDEX stage.o{t}_key ON o{t} (image_key, ObjectNumber)")
        all_cols = [(t, target, ty) for t, (_, cols) in enumerate(tables) for _, target, ty in cols]
        defs = ", ".join(
            ["ImageNumber INTEGER", "ObjectNumber INTEGER"] + [f"{_q(c)} {ty}" for _, c, ty in all_cols]
        )
        db.execute(f"CREATE TABLE {OBJECT_TABLE} ({defs}, PRIMARY KEY (ImageNumber, ObjectNumber))")
        keys = " UNION ".join(f"SELECT image_key, ObjectNumber FROM stage.o{t}" for t in range(len(tables)))
        key_col = _q(f"Image_{META_IMAGE_KEY}")
        joins = " ".join(
            f"LEFT JOIN stage.o{t} AS o{t} ON o{t}.image_key = k.image_key AND o{t}.ObjectNumber = k.ObjectNumber"
            for t in range(len(tables))
        )
        selects = ", ".join(["r.ImageNumber", "k.ObjectNumber"] + [f"o{t}.{_q(c)}" for t, c, _ in all_cols])
        db.execute(
            f"INSERT INTO {OBJECT_TABLE} SELECT {selects} FROM ({keys}) AS k "
            f"JOIN stage.image_rows AS r ON r.{key_col} = k.image_key {joins} "
            "WHERE k.ObjectNumber IS NOT NULL ORDER BY r.ImageNumber, k.ObjectNumber"
        )
        (summary.objects,) = db.execute(f"SELECT COUNT(*) FROM {OBJECT_TABLE}").fetchone()
        (total,) = db.execute(f"SELECT COUNT(*) FROM ({keys})").fetchone()
        summary.orphan_objects = int(total) - int(summary.objects)
        if summary.orphan_objects:
            log.warning(
                "plate %s: %d object(s) whose image set is not in the %s table are not in %s",
                inp.plate,
                summary.orphan_objects,
                inp.image_table,
                OBJECT_TABLE,
            )
        # The object Classifier shows: the chosen one, else the first with a location.
        candidates = [inp.location_object] if inp.location_object else []
        candidates += [name for name, _ in tables]
        targets = {c for _, c, _ in all_cols}
        for obj in candidates:
            if obj and f"{obj}_Location_Center_X" in targets and f"{obj}_Location_Center_Y" in targets:
                return obj
        return None

    # -- properties ----------------------------------------------------------

    def _write_properties(self, location: str | None) -> None:
        self.properties_path.write_text(properties_text(self.inp, location))


def properties_text(inp: CpaInput, location: str | None) -> str:
    """The properties file (see the module's docstring)."""
    paths = [channel_columns(c)[0] for c in inp.channels]
    files = [channel_columns(c)[1] for c in inp.channels]
    colors = [COLORS[i % len(COLORS)] for i in range(len(inp.channels))]
    shape = (inp.rows, inp.columns)
    if shape in PLATE_TYPES:
        plate = f"plate_type = {PLATE_TYPES[shape]}"
    elif inp.rows > 0 and inp.columns > 0:
        plate = f"plate_shape = {inp.rows}, {inp.columns}"
    else:
        plate = "# plate_type: the plate has no layout"
    x_loc = f"{location}_Location_Center_X" if location else ""
    y_loc = f"{location}_Location_Center_Y" if location else ""
    lines = [
        f"# CellProfiler Analyst properties for plate {inp.plate}, written by cellmesh's reducer.",
        "# Open this file in CellProfiler Analyst; the database is the file beside it.",
        "",
        "db_type = sqlite",
        f"db_sqlite_file = {DATABASE}",
        "",
        f"image_table = {IMAGE_TABLE}",
        f"object_table = {OBJECT_TABLE}",
        "",
        "image_id = ImageNumber",
        "object_id = ObjectNumber",
        f"plate_id = {PLATE_COLUMN}",
        f"well_id = {WELL_COLUMN}",
        f"cell_x_loc = {x_loc}",
        f"cell_y_loc = {y_loc}",
        "",
        "# Each image is image_url_prepend + path + '/' + file name.",
        f"image_path_cols = {', '.join(paths)}",
        f"image_file_cols = {', '.join(files)}",
        f"image_names = {', '.join(inp.channels)}",
        f"image_channel_colors = {', '.join(colors)}",
        f"channels_per_image = {', '.join('1' for _ in inp.channels)}",
        f"image_url_prepend = {inp.image_url_prepend}",
        "",
        f"group_SQL_Well = SELECT ImageNumber, {PLATE_COLUMN}, {WELL_COLUMN} FROM {IMAGE_TABLE}",
        "",
        "object_name = cell, cells",
        plate,
        "well_format = A01",
        f"classifier_ignore_columns = {', '.join(IGNORE_COLUMNS)}",
        "image_tile_size = 50",
        "check_tables = no",
        "",
    ]
    return "\n".join(lines)
