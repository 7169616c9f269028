"""Per-site tables shaped like CellProfiler's ExportToSpreadsheet output, with
known values, for tests and benchmarks of the reducer.

``object_csv`` writes an object table (``ImageNumber,ObjectNumber,<features>``)
in the one-header-row form or the two-row form ExportToSpreadsheet uses when
several objects share a file; ``image_csv`` writes a one-row Image table with
``Count_<Object>`` and metadata columns. Numbers are written the way
CellProfiler writes them (``repr`` of a float, ``nan`` for NaN).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt


def _fmt(value: float | int | str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int | np.integer):
        return str(int(value))
    return repr(float(value))


def object_csv(
    values: npt.NDArray[np.float64] | Sequence[Sequence[float]],
    features: Sequence[str],
    *,
    image_number: int = 1,
    object_name: str = "Nuclei",
    two_row_header: bool = False,
    delimiter: str = ",",
    extra: Mapping[str, Sequence[str]] | None = None,
) -> bytes:
    """One object table: a row per object, ``ObjectNumber`` 1..n, the given
    feature values (rows x features), and optional text columns ``extra``."""
    matrix = np.asarray(values, dtype=np.float64).reshape(-1, len(features))
    extra = dict(extra or {})
    names = ["ImageNumber", "ObjectNumber", *features, *extra]
    out = io.StringIO()
    if two_row_header:
        objects = ["Image", object_name] + [object_name] * (len(features) + len(extra))
        out.write(delimiter.join(objects) + "\r\n")
    out.write(delimiter.join(names) + "\r\n")
    for i, row in enumerate(matrix):
        cells = [str(image_number), str(i + 1), *(_fmt(v) for v in row.tolist())]
        cells += [extra[k][i] for k in extra]
        out.write(delimiter.join(cells) + "\r\n")
    return out.getvalue().encode()


def fast_object_csv(rows: int, n_features: int, rng: np.random.Generator, image_number: int = 1) -> bytes:
    """A large object table quickly (for benchmarks): features ``F000``...,
    values with 6 significant digits."""
    names = ["ImageNumber", "ObjectNumber", *(f"Intensity_F{j:03d}" for j in range(n_features))]
    values = rng.lognormal(mean=3.0, sigma=0.5, size=(rows, n_features))
    body = np.column_stack([np.full(rows, image_number), np.arange(1, rows + 1), values])
    out = io.StringIO()
    out.write(",".join(names) + "\n")
    fmt = ",".join(["%d", "%d", *(["%.6g"] * n_features)])
    np.savetxt(out, body, fmt=fmt, delimiter=",")
    return out.getvalue().encode()


def image_csv(
    counts: Mapping[str, int],
    *,
    image_number: int = 1,
    metadata: Mapping[str, str | int] | None = None,
    features: Mapping[str, float] | None = None,
) -> bytes:
    """A one-row Image table: ``Count_<Object>`` per object, metadata columns
    and extra image features, in sorted column order as CellProfiler writes."""
    row: dict[str, str] = {"ImageNumber": str(image_number)}
    row.update({f"Count_{k}": str(v) for k, v in counts.items()})
    row.update({k: _fmt(v) for k, v in (metadata or {}).items()})
    row.update({k: _fmt(v) for k, v in (features or {}).items()})
    names = sorted(row)
    return (",".join(names) + "\r\n" + ",".join(row[n] for n in names) + "\r\n").encode()
