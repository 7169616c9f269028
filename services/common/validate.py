"""Checks of the names and references users send to the mesh.

Each `check_*` function returns the normalised value or raises `Invalid` with a
message that says what is wrong and what a good value looks like. The catalog
uses them on every registration; clients and the ingest tool can use them to
refuse bad input before it travels.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

MAX_IMAGES_PER_CALL = 10_000
MAX_KEY_CHARS = 1024
MAX_FILE_NAME_CHARS = 255
MAX_ROWS = 32
MAX_COLUMNS = 48

_PLATE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_CHANNEL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_METADATA_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_METADATA_KEYS = 32
MAX_METADATA_VALUE_CHARS = 255
#: What a site says by itself (SiteRef), and what the ingest pattern's groups
#: for it are called: never site metadata.
SITE_FIELDS = frozenset({"Plate", "Well", "Site", "WellRow", "WellColumn", "Channel"})
_WELL_RE = re.compile(r"^([A-Z]{1,2})(\d{2})$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class Invalid(ValueError):
    """A value a user sent is not acceptable; the message says how to fix it."""


def check_plate_name(name: str) -> str:
    if not _PLATE_RE.match(name):
        raise Invalid(f"plate name {name!r} is not valid: use 1 to 64 letters, digits, '_', '-' or '.'")
    return name


def check_channel_name(name: str) -> str:
    if not _CHANNEL_RE.match(name):
        raise Invalid(
            f"channel {name!r} is not valid: start with a letter, then up to 31 letters, "
            "digits or '_' (the name NamesAndTypes gives the image, e.g. 'DNA')"
        )
    return name


def row_name(row: int) -> str:
    """0 -> "A", 25 -> "Z", 26 -> "AA", 31 -> "AF"."""
    if not 0 <= row < MAX_ROWS:
        raise Invalid(f"row {row + 1} is outside a plate (1 to {MAX_ROWS} rows)")
    return chr(ord("A") + row) if row < 26 else "A" + chr(ord("A") + row - 26)


def well_name(row: int, column: int) -> str:
    """(0, 1) -> "A01"; rows are 0-based, columns 1-based as printed on plates."""
    return f"{row_name(row)}{column:02d}"


def parse_well(well: str) -> tuple[int, int]:
    """ "A01" -> (0, 1), "AF48" -> (31, 48): the 0-based row and the column."""
    match = _WELL_RE.match(well)
    bad = Invalid(f"well {well!r} is not like A01..AF48 (row letters A-Z or AA-AF, then a two-digit column)")
    if match is None:
        raise bad
    letters, digits = match.groups()
    if len(letters) == 1:
        row = ord(letters) - ord("A")
    elif letters[0] == "A" and letters[1] <= "F":
        row = 26 + ord(letters[1]) - ord("A")
    else:
        raise bad
    column = int(digits)
    if not 1 <= column <= MAX_COLUMNS:
        raise bad
    return row, column


def check_well(well: str) -> str:
    parse_well(well)
    return well


def check_site(site: int) -> int:
    if site < 0:
        raise Invalid(f"site {site} is negative: sites are numbered from 0 (or 1)")
    return site


def check_key(key: str, what: str = "key") -> str:
    """An object key inside the mesh's bucket: relative, no '..', no backslash."""
    if not key:
        raise Invalid(f"{what} is required (the object's key in the bucket)")
    if len(key) > MAX_KEY_CHARS:
        raise Invalid(f"{what} is {len(key)} characters long; at most {MAX_KEY_CHARS} are allowed")
    if key.startswith("/"):
        raise Invalid(f"{what} {key!r} starts with '/': keys are relative to the bucket")
    if "\\" in key:
        raise Invalid(f"{what} {key!r} contains a backslash: separate folders with '/'")
    if ".." in key.split("/"):
        raise Invalid(f"{what} {key!r} contains '..': keys must not leave their folder")
    if any(ord(c) < 32 for c in key):
        raise Invalid(f"{what} {key!r} contains control characters")
    return key


def check_sha256(value: str, what: str = "sha256") -> str:
    if not value:
        raise Invalid(f"{what} checksum is required (the lowercase hex SHA-256 of the object's bytes)")
    if not _SHA256_RE.match(value):
        raise Invalid(f"{what} {value!r} is not a SHA-256: expected 64 lowercase hex digits")
    return value


def check_size(size: int, what: str = "size") -> int:
    if size < 0:
        raise Invalid(f"{what} {size} is negative: give the object's size in bytes")
    return size


def check_file_name(name: str, what: str = "file_name") -> str:
    """A plain file name (no folder), as the microscope wrote it."""
    if not name:
        raise Invalid(f"{what} is required (the file name the microscope gave the image)")
    if "/" in name or "\\" in name:
        raise Invalid(f"{what} {name!r} has a folder in it: give the plain file name")
    if name in (".", ".."):
        raise Invalid(f"{what} {name!r} is not a file name")
    if len(name) > MAX_FILE_NAME_CHARS:
        raise Invalid(f"{what} is {len(name)} characters long; at most {MAX_FILE_NAME_CHARS} are allowed")
    if any(ord(c) < 32 for c in name):
        raise Invalid(f"{what} {name!r} contains control characters")
    return name


def check_metadata(metadata: Mapping[str, str], what: str = "metadata") -> dict[str, str]:
    """A site's metadata: keys are CellProfiler metadata names (what follows
    ``Metadata_`` in its measurements), values short plain text that may end
    up in a file or folder name."""
    if len(metadata) > MAX_METADATA_KEYS:
        raise Invalid(f"{what} has {len(metadata)} keys; at most {MAX_METADATA_KEYS} are allowed")
    out: dict[str, str] = {}
    for key in sorted(metadata):
        value = metadata[key]
        if not _METADATA_KEY_RE.match(key):
            raise Invalid(
                f"{what} key {key!r} is not a CellProfiler metadata name: a letter or '_', then "
                "letters, digits or '_', at most 64 characters (e.g. Timepoint, Compound)"
            )
        if key in SITE_FIELDS:
            raise Invalid(
                f"{what} key {key!r} is what the site itself says (plate, well, site, channel): "
                "give it in site or channel, not in metadata"
            )
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise Invalid(
                f"{what} {key}'s value is {len(value)} characters long; at most "
                f"{MAX_METADATA_VALUE_CHARS} are allowed"
            )
        if any(ord(c) < 32 for c in value) or "/" in value or "\\" in value or value in (".", ".."):
            raise Invalid(
                f"{what} {key}'s value {value!r} has a control character, '/' or '\\', or is '.' or '..': "
                "pipelines may put it in file and folder names"
            )
        out[key] = value
    return out


def check_batch_size(count: int) -> int:
    if count > MAX_IMAGES_PER_CALL:
        raise Invalid(
            f"{count} images in one call: at most {MAX_IMAGES_PER_CALL} images per call; split the batch"
        )
    return count
