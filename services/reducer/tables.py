"""Reading one site's CellProfiler ExportToSpreadsheet table.

A site job leaves one CSV per object table (``Image.csv``, ``Nuclei.csv``, …).
ExportToSpreadsheet writes them in two shapes:

* one header row of feature names (``ImageNumber,ObjectNumber,AreaShape_Area,…``),
  the usual form and the only one for the Image table;
* two header rows when several objects share one file: the first row holds each
  column's object name, the second its feature name. Those columns become
  ``<Object>_<Feature>`` (``Nuclei_AreaShape_Area``), except ``ImageNumber``,
  the first ``ObjectNumber`` and the image's ``Metadata_*`` columns, which keep
  their plain names so that they mean the same in both shapes.

The delimiter is a comma, a tab or another single character (sniffed from the
header). Values CellProfiler writes for NaN/Inf (``nan``, ``NaN``, ``inf``,
``-Inf``, or an empty field) read as floats; text columns stay text (time
stamps and dates are never reinterpreted).

Every site table gets the site's identity from the catalog, which is the truth
about where a result came from:

``Metadata_Plate``, ``Metadata_Well``, ``Metadata_Site``
    the catalog's plate, well (normalised, e.g. ``B03``) and site number. When
    the CSV already has one of these columns (CellProfiler's own metadata,
    e.g. from file names) and a value differs, the CSV's column is kept as
    ``Metadata_Source_<Name>`` and the difference is reported.
``Metadata_SiteKey``
    ``<plate>/<well>/<site>``, e.g. ``P1/B03/2``: unique across the plate.
``Metadata_ImageKey``
    ``<plate>/<well>/<site>/<ImageNumber>``: unique across the plate, while
    ``ImageNumber`` (kept unchanged) restarts at 1 in every site. An object is
    identified across the plate by ``(Metadata_ImageKey, ObjectNumber)``;
    ``Parent_*``/``Children_*`` references resolve within the same ImageKey.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

META_PLATE = "Metadata_Plate"
META_WELL = "Metadata_Well"
META_SITE = "Metadata_Site"
META_SITE_KEY = "Metadata_SiteKey"
META_IMAGE_KEY = "Metadata_ImageKey"
IMAGE_NUMBER = "ImageNumber"
OBJECT_NUMBER = "ObjectNumber"

#: The columns this module adds in front of every site table, in order.
ADDED_COLUMNS = (META_PLATE, META_WELL, META_SITE, META_SITE_KEY, META_IMAGE_KEY)

_WELL_RE = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")
_DELIMITERS = (",", "\t", ";", "|")
# Null markers as pandas reads them, so that a column is numeric here exactly
# when pandas (and so pycytominer) would read it as numeric.
_NULL_VALUES = [
    "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND",
    "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
]  # fmt: skip


class TableError(ValueError):
    """A site's table cannot be read (empty, truncated, malformed)."""


def normalize_well(well: str) -> str:
    """``"b3"``, ``"B3"``, ``"B03"`` -> ``"B03"``; rows ``A``-``Z`` then ``AA``-``AF``."""
    match = _WELL_RE.match(well.strip())
    if match is None or int(match.group(2)) < 1:
        raise ValueError(f"not a well name: {well!r} (expected e.g. 'B03')")
    return f"{match.group(1).upper()}{int(match.group(2)):02d}"


def well_position(well: str) -> tuple[int, int]:
    """0-based (row, column) of a well: ``"A01"`` -> (0, 0), ``"AB12"`` -> (27, 11)."""
    name = normalize_well(well)
    letters = name.rstrip("0123456789")
    row = 0
    for ch in letters:
        row = row * 26 + (ord(ch) - ord("A") + 1)
    return row - 1, int(name[len(letters) :]) - 1


def row_label(row: int) -> str:
    """0-based row index -> its letters: 0 -> ``A``, 26 -> ``AA``."""
    letters = ""
    n = row + 1
    while n:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("A") + rem) + letters
    return letters


def site_key(plate: str, well: str, site: int) -> str:
    return f"{plate}/{well}/{site}"


@dataclass(frozen=True)
class Header:
    """What the header rows of a site table say."""

    names: list[str]
    delimiter: str
    rows: int  # 1 or 2 header rows
    prefixed: frozenset[str]  # columns already named <Object>_<Feature>


@dataclass
class SiteTable:
    """One site's table with the site's identity added."""

    table: pa.Table
    header: Header
    #: Identity columns whose CSV value differed from the catalog's: {column: CSV value}.
    mismatches: dict[str, str] = field(default_factory=dict)


def _sniff_delimiter(line: str) -> str:
    counts = {d: line.count(d) for d in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] > 0 else ","


def read_header(data: bytes) -> Header:
    """Parses the header row(s) of an ExportToSpreadsheet table."""
    end = 0
    for _ in range(2):  # the header is at most two lines
        nl = data.find(b"\n", end)
        end = len(data) if nl < 0 else nl + 1
    lines = data[:end].decode("utf-8-sig", errors="replace").splitlines()[:2]
    if not lines or not lines[0].strip():
        raise TableError("the file is empty (no header row)")
    delimiter = _sniff_delimiter(lines[0])
    rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter))
    first = rows[0]
    second = rows[1] if len(rows) > 1 else []
    two_rows = first[:1] == ["Image"] and second[:1] == [IMAGE_NUMBER] and len(first) == len(second)
    if not two_rows:
        names = [n.strip() for n in first]
        prefixed: frozenset[str] = frozenset()
    else:
        names, prefixed = _combined_names(first, second)
    if any(not n for n in names):
        raise TableError("the header has an empty column name")
    if len(set(names)) != len(names):
        dups = sorted({n for n in names if names.count(n) > 1})
        raise TableError(f"the header repeats column(s) {dups[:5]}")
    return Header(names, delimiter, 2 if two_rows else 1, prefixed)


def _combined_names(objects: list[str], features: list[str]) -> tuple[list[str], frozenset[str]]:
    """Two header rows (object, feature) -> one name per column."""
    names: list[str] = []
    prefixed: set[str] = set()
    object_number_seen = False
    for obj, feat in zip(objects, features, strict=True):
        obj, feat = obj.strip(), feat.strip()
        if obj == "Image" and feat == IMAGE_NUMBER:
            names.append(IMAGE_NUMBER)
        elif feat == OBJECT_NUMBER and not object_number_seen:
            object_number_seen = True
            names.append(OBJECT_NUMBER)
        elif obj == "Image" and feat.startswith("Metadata_"):
            names.append(feat)
        else:
            name = f"{obj}_{feat}"
            names.append(name)
            prefixed.add(name)
    return names, frozenset(prefixed)


def _is_basic(t: pa.DataType) -> bool:
    return bool(
        pa.types.is_null(t)
        or pa.types.is_boolean(t)
        or t == pa.int64()
        or t == pa.float64()
        or pa.types.is_string(t)
    )


def read_table(data: bytes) -> tuple[pa.Table, Header]:
    """Reads a table's bytes into Arrow. Columns come out as null (no value
    at all), bool, int64, float64 or string."""
    header = read_header(data)
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    longest = max(len(data) // 16, 1 << 20)

    def read(column_types: dict[str, pa.DataType] | None = None) -> pa.Table:
        return pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(
                column_names=header.names,
                skip_rows=header.rows,
                block_size=min(longest, 64 << 20),
            ),
            parse_options=pacsv.ParseOptions(delimiter=header.delimiter),
            convert_options=pacsv.ConvertOptions(
                null_values=_NULL_VALUES,
                strings_can_be_null=True,
                column_types=column_types,
            ),
        )

    try:
        table = read()
        odd = {f.name: f.type for f in table.schema if not _is_basic(f.type)}
        if odd:
            # Time stamps, dates and the like stay text as written; other
            # integer widths become floats; undecodable bytes are replaced.
            texts = {n: pa.string() for n, t in odd.items() if not _is_number(t)}
            if texts:
                table = read({n: pa.binary() if pa.types.is_binary(odd[n]) else t for n, t in texts.items()})
            for name, t in odd.items():
                col = table.column(name)
                if name in texts and pa.types.is_binary(t):
                    col = pa.array(
                        [None if v is None else v.decode("utf-8", "replace") for v in col.to_pylist()],
                        pa.string(),
                    )
                elif name not in texts:
                    col = col.cast(pa.float64())
                else:
                    continue
                table = table.set_column(table.schema.get_field_index(name), name, col)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, UnicodeDecodeError) as exc:
        raise TableError(f"cannot parse: {exc}") from exc
    return table, header


def _is_number(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t))


@dataclass(frozen=True)
class SiteRows:
    """A run of consecutive rows of a table that belong to one site."""

    plate: str
    well: str
    site: int
    rows: int

    @property
    def key(self) -> str:
        return site_key(self.plate, self.well, self.site)


def _same_plate(csv_value: str, expected: str) -> bool:
    return csv_value.strip() == expected


def _same_well(csv_value: str, expected: str) -> bool:
    try:
        return normalize_well(csv_value) == expected
    except ValueError:
        return False


def _same_site(csv_value: str, expected: str) -> bool:
    try:
        return float(csv_value) == float(expected)
    except ValueError:
        return False


_SAME = {META_PLATE: _same_plate, META_WELL: _same_well, META_SITE: _same_site}


def _repeat(values: Sequence[object], counts: Sequence[int], type_: pa.DataType) -> pa.Array:
    """values[i] repeated counts[i] times, as one Arrow array."""
    indices = pa.array(np.repeat(np.arange(len(values), dtype=np.int32), np.asarray(counts, dtype=np.int64)))
    return pa.DictionaryArray.from_arrays(indices, pa.array(values, type_)).dictionary_decode()


def _source_name(name: str) -> str:
    return "Metadata_Source_" + name[len("Metadata_") :]


def add_identity(table: pa.Table, runs: Sequence[SiteRows]) -> tuple[pa.Table, dict[str, dict[str, str]]]:
    """Puts the catalog's identity columns in front of a table whose rows are
    the given runs of sites, in order (see the module's docstring).

    Returns the table and, for each identity column whose CSV values differed
    from the catalog's, the differing sites: {column: {site key: CSV value}}."""
    if sum(r.rows for r in runs) != table.num_rows:
        raise ValueError("the runs do not cover the table's rows")
    counts = [r.rows for r in runs]
    keys = [r.key for r in runs]
    expected = {
        META_PLATE: [r.plate for r in runs],
        META_WELL: [r.well for r in runs],
        META_SITE: [str(r.site) for r in runs],
    }
    key_col = _repeat(keys, counts, pa.string())
    mismatches: dict[str, dict[str, str]] = {}
    for name, same in _SAME.items():
        if name not in table.column_names:
            continue
        index = table.schema.get_field_index(name)
        # One check per distinct (site, value) pair, not per row.
        pairs = pc.unique(pc.binary_join_element_wise(key_col, table.column(index).cast(pa.string()), "\x1f"))
        site_of = dict(zip(keys, expected[name], strict=True))
        differing: dict[str, str] = {}
        for pair in pairs.to_pylist():
            if pair is None:  # the CSV has no value here
                continue
            skey, value = pair.split("\x1f", 1)
            if not same(value, site_of[skey]):
                differing.setdefault(skey, value)
        if differing:
            mismatches[name] = differing
            table = table.rename_columns([_source_name(c) if c == name else c for c in table.column_names])
        else:
            table = table.remove_column(index)
    for name in (META_SITE_KEY, META_IMAGE_KEY):
        if name in table.column_names:
            table = table.rename_columns([_source_name(c) if c == name else c for c in table.column_names])
    added: list[tuple[str, pa.Array | pa.ChunkedArray]] = [
        (META_PLATE, _repeat(expected[META_PLATE], counts, pa.string())),
        (META_WELL, _repeat(expected[META_WELL], counts, pa.string())),
        (META_SITE, _repeat([r.site for r in runs], counts, pa.int64())),
        (META_SITE_KEY, key_col),
    ]
    if IMAGE_NUMBER in table.column_names:
        numbers = table.column(IMAGE_NUMBER)
        if not pa.types.is_integer(numbers.type) and not pa.types.is_null(numbers.type):
            numbers = numbers.cast(pa.float64()).cast(pa.int64(), safe=False)
        added.append((META_IMAGE_KEY, pc.binary_join_element_wise(key_col, numbers.cast(pa.string()), "/")))
    for position, (name, values) in enumerate(added):
        table = table.add_column(position, name, values)
    return table, mismatches


def read_site_table(data: bytes, plate: str, well: str, site: int) -> SiteTable:
    """Reads one site's table and adds the site's identity columns."""
    table, header = read_table(data)
    table, mismatches = add_identity(table, [SiteRows(plate, normalize_well(well), site, table.num_rows)])
    return SiteTable(table, header, {k: next(iter(v.values())) for k, v in mismatches.items()})
