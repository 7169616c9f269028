"""Reading a properties file and its SQLite database the way CellProfiler
Analyst 3 does (CellProfiler-Analyst ``cpa/properties.py`` ``load_file`` and
``Validate``, ``cpa/dbconnect.py``, ``cpa/imagereader.py``), for tests.

Written from CPA's rules, not from the reducer's writer: the key lists, the
line parsing (``name = value`` split at the first ``=``, ``#`` comments, list
values split at commas unless wrapped in backquotes, an empty value is
unset), the required keys, ``db_sqlite_file`` relative to the properties
file, the equal lengths of the image lists, and the queries CPA runs: image
keys, well keys, object keys and locations, the image paths
(``image_url_prepend + path + "/" + file`` when a prepend is set, else
``os.path.join(path, file)``) and the Classifier's columns.
"""

from __future__ import annotations

import os
import re
import sqlite3
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# cpa/properties.py: the keys it knows.
STRING_VARS = [
    "db_type", "db_port", "db_host", "db_name", "db_user", "db_passwd", "db_password", "image_table",
    "object_table", "image_csv_file", "object_csv_file", "table_id", "image_id", "object_id", "plate_id",
    "well_id", "cell_x_loc", "cell_y_loc", "cell_z_loc", "image_url_prepend", "image_tile_size",
    "image_buffer_size", "tile_buffer_size", "area_scoring_column", "training_set", "class_table",
    "plate_type", "check_tables", "db_sql_file", "db_sqlite_file", "use_larger_image_scale",
    "rescale_object_coords", "well_format", "link_tables_table", "link_columns_table", "image_rescale",
    "classification_type", "image_size", "image_width", "image_height", "negative_control", "class_names",
    "force_bioformats", "use_legacy_fetcher", "process_3D",
]  # fmt: skip
LIST_VARS = [
    "image_path_cols", "image_channel_paths", "image_file_cols", "image_channel_files", "image_names",
    "image_channel_names", "image_channel_colors", "channels_per_image", "image_channel_blend_modes",
    "object_name", "classifier_ignore_substrings", "classifier_ignore_columns", "image_thumbnail_cols",
    "plate_shape",
]  # fmt: skip
OPTIONAL_VARS = {
    "db_port", "db_host", "db_name", "db_user", "db_passwd", "db_password", "table_id", "image_url_prepend",
    "image_csv_file", "image_channel_names", "image_names", "image_channel_colors", "channels_per_image",
    "image_channel_blend_modes", "object_csv_file", "area_scoring_column", "training_set", "class_table",
    "image_buffer_size", "tile_buffer_size", "plate_id", "well_id", "plate_type",
    "classifier_ignore_substrings", "classifier_ignore_columns", "object_name", "check_tables",
    "db_sql_file", "db_sqlite_file", "object_table", "object_id", "cell_x_loc", "cell_y_loc", "cell_z_loc",
    "use_larger_image_scale", "rescale_object_coords", "image_thumbnail_cols", "well_format",
    "link_tables_table", "link_columns_table", "image_rescale", "plate_shape", "image_tile_size",
    "image_size", "classification_type", "image_width", "image_height", "negative_control", "class_names",
    "force_bioformats", "use_legacy_fetcher", "process_3D",
}  # fmt: skip
FIELD_MAPPINGS = {
    "classifier_ignore_substrings": "classifier_ignore_columns",
    "image_channel_files": "image_file_cols",
    "image_channel_paths": "image_path_cols",
    "image_channel_names": "image_names",
    "db_password": "db_passwd",
}
REQUIRED_VARS = set(LIST_VARS + STRING_VARS) - OPTIONAL_VARS - set(FIELD_MAPPINGS)
PLATE_TYPES = {"6": [2, 3], "24": [4, 6], "96": [8, 12], "384": [16, 24], "1536": [32, 48], "5600": [40, 140]}


@dataclass
class Properties:
    path: Path
    values: dict[str, object] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    unrecognized: list[str] = field(default_factory=list)

    def get(self, name: str) -> object:
        return self.values.get(name)

    def str(self, name: str) -> str:
        value = self.values.get(name)
        assert isinstance(value, str), f"{name} is not set"
        return value

    def list(self, name: str) -> list[str]:
        value = self.values.get(name)
        assert isinstance(value, list), f"{name} is not set"
        return value

    def defined(self, name: str) -> bool:
        return self.values.get(name) not in ("", None)


def parse_list_value(list_str: str) -> list[str]:
    if list_str.strip().startswith("`") and list_str.strip().endswith("`"):
        return [v.strip() for v in list_str.strip()[1:-1].split("`,`") if v.strip() != ""]
    return [v.strip() for v in list_str.split(",") if v.strip() != ""]


def load(path: Path) -> Properties:
    """load_file + Validate, as far as they decide what the file means."""
    props = Properties(path)
    lines = path.read_text().split("\n")
    for idx, line in enumerate(lines):
        if line.strip().startswith("#") or line.strip() == "":
            continue
        try:
            name, val = line.split("=", 1)
        except ValueError:
            raise AssertionError(f"CPA cannot parse line #{idx + 1}: {line!r}") from None
        name, val = name.strip(), val.strip()
        if name in STRING_VARS:
            props.values[name] = val or None
        elif name in LIST_VARS:
            props.values[name] = parse_list_value(val) or None
        elif name.startswith("group_SQL_"):
            assert name[10:], "group_SQL_ needs a group name"
            assert name[10:] not in props.groups, f"group {name[10:]} defined twice"
            if val:
                props.groups[name[10:]] = val
        elif name.startswith("filter_SQL_") or name in ("groups", "filters", "gates"):
            raise AssertionError(f"this reader does not evaluate {name}")
        else:
            props.unrecognized.append(name)
    # Validate()
    for old, new in FIELD_MAPPINGS.items():
        if props.defined(old):
            assert not props.defined(new), f"both {old} and {new}"
            props.values[new] = props.values.pop(old)
    for name in sorted(REQUIRED_VARS):
        assert props.defined(name), f"[Properties] ERROR ({name}): Field is missing or empty."
    db_type = props.str("db_type").lower()
    assert db_type in ("mysql", "sqlite")
    if db_type == "sqlite":
        assert any(
            props.defined(f) for f in ("image_csv_file", "object_csv_file", "db_sql_file", "db_sqlite_file")
        )
        if props.defined("db_sqlite_file"):
            f = props.str("db_sqlite_file")
            if not os.path.isabs(f):
                f = os.path.join(os.path.dirname(path), f)
            assert os.path.exists(f), f"SQLite database could not be found at {f!r}"
            props.values["db_sqlite_file"] = f
    n = len(props.list("image_file_cols"))
    if not props.defined("channels_per_image"):
        props.values["channels_per_image"] = ["1"] * n
    if not props.defined("image_names"):
        props.values["image_names"] = [f"channel-{i + 1}" for i in range(n)]
    assert n == len(props.list("image_path_cols")), "image_file_cols and image_path_cols differ in length"
    assert n == len(props.list("channels_per_image"))
    assert n == len(props.list("image_names"))
    if props.defined("object_name"):
        assert len(props.list("object_name")) == 2, "object_name needs a singular and a plural"
    if props.defined("plate_shape"):
        shape = props.list("plate_shape")
        assert len(shape) == 2 and all(v.isdigit() for v in shape)
        props.values["plate_shape"] = [int(v) for v in shape]
    if props.defined("plate_type"):
        assert props.str("plate_type") in PLATE_TYPES, f"plate_type {props.get('plate_type')!r}"
        props.values["plate_shape"] = PLATE_TYPES[props.str("plate_type")]
    int(props.str("image_tile_size"))
    return props


def connect(props: Properties) -> sqlite3.Connection:
    return sqlite3.connect(props.str("db_sqlite_file"))


def columns(db: sqlite3.Connection, table: str) -> dict[str, str]:
    return {row[1]: row[2] for row in db.execute(f"PRAGMA table_info({table})")}


def image_paths(db: sqlite3.Connection, props: Properties, image_number: int) -> list[str]:
    """dbconnect.GetFullChannelPathsForImage."""
    select = "SELECT " + ", ".join(
        f"{p}, {f}" for p, f in zip(props.list("image_path_cols"), props.list("image_file_cols"), strict=True)
    )
    select += f" FROM {props.str('image_table')} WHERE {props.str('image_id')} IN ({image_number})"
    row = db.execute(select).fetchall()[0]
    out = []
    for i in range(0, len(row), 2):
        if props.get("image_url_prepend"):
            out.append(row[i] + "/" + row[i + 1])
        else:
            out.append(os.path.join(row[i], row[i + 1]))
    return out


def open_image(props: Properties, filename_or_url: str) -> str:
    """imagereader._read_image up to the file it hands to imageio/Bio-Formats."""
    prepend = props.get("image_url_prepend")
    if prepend:
        parsed = urllib.parse.urlparse(str(prepend) + filename_or_url)
        if parsed.scheme:
            filename_or_url, _ = urllib.request.urlretrieve(parsed.geturl())
    return filename_or_url


def classifier_columns(db: sqlite3.Connection, props: Properties) -> list[str]:
    """dbconnect.GetColnamesForClassifier: numeric per-object columns that
    are not the keys or matched by classifier_ignore_columns."""
    table = props.str("object_table")
    types = columns(db, table)
    numeric = [c for c, t in types.items() if t.upper() in ("INTEGER", "REAL", "FLOAT", "DOUBLE", "INT")]
    if props.get("table_id") in numeric:
        numeric.remove(str(props.get("table_id")))
    numeric.remove(props.str("image_id"))  # CPA fails here if the key column is missing
    numeric.remove(props.str("object_id"))
    ignore = props.get("classifier_ignore_columns") or []
    assert isinstance(ignore, list)
    return [c for c in numeric if not any(re.match("^" + e + "$", c) for e in ignore)]
