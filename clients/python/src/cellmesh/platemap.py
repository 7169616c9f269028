"""Plate maps: what was put in each well (treatment, dose, control role, ...).

One home for reading a plate map, used by the client (to check a file before
sending it), the catalog (which refuses a bad map) and the reducer (which
joins the map's columns into its tables).

A map is a CSV (or tab-separated) file with a header row. Its wells are given
by one of, in this order:

* a well column: ``Metadata_Well``, ``Well``, ``well``, ``well_position``
  (the JUMP/pycytominer ``platemap`` layout), ``WellName``, ``well_id``;
  values like ``A01``, ``a1`` or ``A001``;
* a row and a column column: ``Row``/``Column`` (CellProfiler metadata CSVs
  such as BBBC013's ``1049_Metadata.csv``), ``WellRow``/``WellColumn``,
  ``Metadata_Row``/``Metadata_Col`` and the like; a row is a letter (``A``)
  or a 1-based number;
* an image number (``ImageNumber``), row-major over the plate's columns
  (1 = A01, 13 = B01 on a 12-column plate), as CellProfiler numbers a plate
  imaged well by well; this needs the plate's number of columns.

Every other column is the map's: its name gets a ``Metadata_`` prefix unless
it has one (as pycytominer's ``annotate`` does), values are kept as text. The
columns that only located the well (and ``Plate``/``Metadata_Plate``) are
dropped. The normalized map is a CSV with ``Metadata_Well`` first, wells in
plate order: that is what the catalog stores (with the SHA-256 of the file the
user gave) and what the reducer reads.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

WELL = "Metadata_Well"
MAX_BYTES = 4 << 20
MAX_COLUMNS = 64
MAX_VALUE_CHARS = 255

_WELL_COLUMNS = ("metadata_well", "well", "well_position", "wellname", "well_name", "well_id", "wellid")
_ROW_COLUMNS = ("metadata_row", "row", "wellrow", "well_row", "metadata_wellrow")
_COLUMN_COLUMNS = (
    "metadata_col",
    "metadata_column",
    "column",
    "col",
    "wellcolumn",
    "well_column",
    "metadata_wellcolumn",
)
_IMAGE_NUMBER_COLUMNS = ("imagenumber", "image_number", "metadata_imagenumber")
_DROPPED = ("plate", "metadata_plate")
_WELL_RE = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$", re.ASCII)
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$", re.ASCII)
MAX_ROWS = 32
MAX_WELL_COLUMNS = 48


class PlateMapError(ValueError):
    """The file is not a usable plate map; the message says what to fix."""


@dataclass(frozen=True)
class PlateMap:
    """A parsed plate map: well -> {Metadata_<column>: value}."""

    #: The map's own columns, ``Metadata_``-prefixed, in file order.
    columns: tuple[str, ...]
    #: Wells in plate order -> their values (every column present; "" where empty).
    wells: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    #: How its wells were given: "well column X", "row X and column Y", "image number X".
    located_by: str = ""

    def to_csv(self) -> bytes:
        """The normalized map: ``Metadata_Well`` then its columns, wells in plate order."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([WELL, *self.columns])
        for well, values in self.wells.items():
            writer.writerow([well, *(values.get(c, "") for c in self.columns)])
        return out.getvalue().encode()


def row_name(row: int) -> str:
    """0 -> "A", 26 -> "AA"."""
    return chr(ord("A") + row) if row < 26 else "A" + chr(ord("A") + row - 26)


def well_position(well: str) -> tuple[int, int]:
    """ "B03" -> (1, 3): the 0-based row and the column."""
    m = _WELL_RE.match(well)
    if not m:
        raise PlateMapError(f"well {well!r} is not a row letter and a column number, e.g. A01")
    letters = m.group(1).upper()
    row = ord(letters) - ord("A") if len(letters) == 1 else 26 + ord(letters[1]) - ord("A")
    if len(letters) == 2 and (letters[0] != "A" or letters[1] > "F"):
        raise PlateMapError(f"well {well!r} has a row beyond AF (plates have at most 32 rows)")
    return row, int(m.group(2))


def _well(row: int, column: int, rows: int, columns: int, what: str) -> str:
    if not 0 <= row < (rows or MAX_ROWS) or not 1 <= column <= (columns or MAX_WELL_COLUMNS):
        size = f"{rows} x {columns}" if rows and columns else f"at most {MAX_ROWS} x {MAX_WELL_COLUMNS}"
        raise PlateMapError(
            f"{what} is not a well of the plate ({size} wells): fix the well or the plate's layout"
        )
    return f"{row_name(row)}{column:02d}"


def _find(header: Sequence[str], names: Sequence[str]) -> int | None:
    lowered = [h.strip().lower() for h in header]
    for name in names:
        if name in lowered:
            return lowered.index(name)
    return None


def _row_index(text: str) -> int:
    t = text.strip()
    if _digits(t):
        return int(t) - 1
    if re.fullmatch(r"[A-Za-z]{1,2}", t, re.ASCII):
        return well_position(f"{t}01")[0]
    raise PlateMapError(f"well row {text!r} is neither a letter (A) nor a number (1)")


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 9


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def parse(content: bytes, *, rows: int = 0, columns: int = 0) -> PlateMap:
    """Reads a plate map. `rows` and `columns` are the plate's (0: unknown;
    then wells are checked against the largest plate, and an image-number map
    cannot be read). Raises PlateMapError saying what to fix."""
    if len(content) > MAX_BYTES:
        raise PlateMapError(f"the plate map is {len(content)} bytes; at most {MAX_BYTES} are accepted")
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PlateMapError(f"the plate map is not UTF-8 text ({exc}): save it as a UTF-8 CSV") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise PlateMapError("the plate map is empty: give a header row and one row per well")
    delimiter = "\t" if "\t" in lines[0] and "," not in lines[0] else ","
    try:
        table = list(csv.reader(lines, delimiter=delimiter))
    except csv.Error as exc:
        raise PlateMapError(f"the plate map is not a readable CSV ({exc})") from None
    header = [h.strip() for h in table[0]]
    body = table[1:]
    if any(not h for h in header):
        raise PlateMapError(f"column {header.index('') + 1} of the plate map's header has no name")
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise PlateMapError(f"the plate map's header names {dupes[0]!r} twice: give each column one name")
    if not body:
        raise PlateMapError("the plate map has a header but no wells")

    well_at = _find(header, _WELL_COLUMNS)
    row_at, col_at = _find(header, _ROW_COLUMNS), _find(header, _COLUMN_COLUMNS)
    number_at = _find(header, _IMAGE_NUMBER_COLUMNS)
    locating: list[int]
    if well_at is not None:
        locating, located_by = [well_at], f"well column {header[well_at]}"
    elif row_at is not None and col_at is not None:
        locating, located_by = [row_at, col_at], f"row {header[row_at]} and column {header[col_at]}"
    elif number_at is not None:
        if not columns:
            raise PlateMapError(
                f"the plate map locates wells by {header[number_at]} only: give the plate a layout "
                "(rows and columns) so image numbers can be turned into wells, or add a well column"
            )
        locating, located_by = [number_at], f"image number {header[number_at]}"
    else:
        raise PlateMapError(
            f"the plate map has no well column (columns: {', '.join(header)}): add a column "
            "'Well' (A01, ...), or 'Row' and 'Column', or 'ImageNumber'"
        )
    # Columns that only say where the well is go; so does an image number
    # when the well is given otherwise (it numbers images, not treatments).
    dropped = set(locating)
    for aliases in (_ROW_COLUMNS, _COLUMN_COLUMNS, _IMAGE_NUMBER_COLUMNS, _WELL_COLUMNS, _DROPPED):
        at = _find(header, aliases)
        if at is not None:
            dropped.add(at)
    keep = [i for i in range(len(header)) if i not in dropped]
    names: list[str] = []
    for i in keep:
        name = header[i] if header[i].startswith("Metadata_") else f"Metadata_{header[i]}"
        if not _NAME_RE.match(name):
            raise PlateMapError(
                f"plate map column {header[i]!r} cannot be a measurement name: use letters, digits "
                "and '_' only, starting with a letter, at most 64 characters"
            )
        names.append(name)
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise PlateMapError(f"plate map columns give {twice} twice (with and without 'Metadata_'): keep one")
    if len(names) > MAX_COLUMNS:
        raise PlateMapError(f"the plate map has {len(names)} columns; at most {MAX_COLUMNS} are accepted")

    wells: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise PlateMapError(
                f"line {number} of the plate map has {len(row)} fields, the header {len(header)}"
            )
        where = f"line {number}"
        if len(locating) == 1 and locating[0] == well_at:
            raw = row[well_at].strip()
            r, c = well_position(raw) if raw else (-1, 0)
            well = _well(r, c, rows, columns, f"{where}: well {raw!r}")
        elif len(locating) == 2:
            raw_r, raw_c = row[locating[0]].strip(), row[locating[1]].strip()
            if not _digits(raw_c):
                raise PlateMapError(f"{where}: well column {raw_c!r} is not a number")
            well = _well(
                _row_index(raw_r), int(raw_c), rows, columns, f"{where}: row {raw_r!r} column {raw_c!r}"
            )
        else:
            raw = row[locating[0]].strip()
            if not _digits(raw) or int(raw) < 1:
                raise PlateMapError(f"{where}: image number {raw!r} is not a number from 1")
            n = int(raw) - 1
            well = _well(n // columns, n % columns + 1, rows, columns, f"{where}: image number {raw}")
        if well in wells:
            raise PlateMapError(
                f"well {well} is in the plate map twice (lines {first_line[well]} and {number}): "
                "give each well one row"
            )
        values: dict[str, str] = {}
        for i, name in zip(keep, names, strict=True):
            value = row[i].strip()
            if len(value) > MAX_VALUE_CHARS or any(ord(ch) < 32 for ch in value):
                raise PlateMapError(
                    f"{where}: {header[i]} is longer than {MAX_VALUE_CHARS} characters or holds control characters"
                )
            values[name] = value
        wells[well] = values
        first_line[well] = number
    ordered = dict(sorted(wells.items(), key=lambda kv: well_position(kv[0])))
    return PlateMap(tuple(names), ordered, located_by)


def read_normalized(content: bytes) -> PlateMap:
    """Reads a map as ``PlateMap.to_csv`` wrote it."""
    return parse(content)
