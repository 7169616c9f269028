"""Plate heatmaps: one value per well, drawn as the plate is laid out.

Figures are built with ``matplotlib.figure.Figure`` on the Agg canvas, never
through pyplot, so nothing is global and a server can draw from any thread.

The layout is 8 x 12, 16 x 24 or 32 x 48 wells (rows ``A``…, columns ``01``…),
the smallest that holds every well named, unless given. A well without a value
(not imaged, or no result) is grey and hatched; a well with missing or failed
sites carries a red ×; on 96-well plates each value is written in its well.
"""

from __future__ import annotations

import io
import math
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle
from matplotlib.ticker import MaxNLocator

from services.reducer.tables import row_label, well_position

#: Standard plate formats, (rows, columns), smallest first.
PLATE_SHAPES = ((8, 12), (16, 24), (32, 48))

NO_DATA_COLOUR = "#d4d4d4"
NO_DATA_HATCH_COLOUR = "#8c8c8c"
MISSING_COLOUR = "#d62728"


def infer_shape(wells: Iterable[str]) -> tuple[int, int]:
    """The smallest standard plate that holds every well (96 if none)."""
    rows = cols = 0
    for w in wells:
        r, c = well_position(w)
        rows, cols = max(rows, r + 1), max(cols, c + 1)
    for shape in PLATE_SHAPES:
        if rows <= shape[0] and cols <= shape[1]:
            return shape
    return rows, cols


def value_grid(values: Mapping[str, float], shape: tuple[int, int]) -> np.ma.MaskedArray[Any, Any]:
    """rows x columns array of the values, masked where a well has none."""
    grid = np.full(shape, np.nan)
    for well, value in values.items():
        r, c = well_position(well)
        if r < shape[0] and c < shape[1] and value is not None:
            grid[r, c] = value
    return np.ma.masked_invalid(grid)


def plate_heatmap(
    values: Mapping[str, float],
    *,
    title: str,
    label: str,
    wells_with_missing: Collection[str] = (),
    shape: tuple[int, int] | None = None,
    annotate: bool | None = None,
    value_format: str = "{:.0f}",
    robust: bool = False,
    cmap: str = "viridis",
    well_labels: Mapping[str, str] | None = None,
) -> Figure:
    """A heatmap of one value per well.

    `label` names the value (colour bar); `wells_with_missing` get a ×;
    `annotate` writes values in the wells (default: on plates of 96 wells or
    fewer); `robust` spans the colours over the 2nd-98th percentiles so that
    a few extreme wells do not wash out the rest; `well_labels` (from the
    plate map, e.g. "neg", "d3") are written small under the values."""
    if shape is None:
        shape = infer_shape([*values, *wells_with_missing])
    rows, cols = shape
    grid = value_grid(values, shape)
    finite = grid.compressed()
    if finite.size == 0:
        vmin, vmax = 0.0, 1.0
    elif robust:
        vmin, vmax = (float(v) for v in np.percentile(finite, [2, 98]))
    else:
        vmin, vmax = float(finite.min()), float(finite.max())
    if vmin == vmax:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    if annotate is None:
        annotate = rows * cols <= 96

    scale = {8: 0.62, 16: 0.42, 32: 0.3}.get(rows, 0.3)
    fig = Figure(figsize=(max(cols * scale + 2.4, 6.0), rows * scale + 2.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.add_patch(
        Rectangle(
            (-0.5, -0.5),
            cols,
            rows,
            facecolor=NO_DATA_COLOUR,
            edgecolor=NO_DATA_HATCH_COLOUR,
            hatch="///" if rows <= 16 else "//",
            hatch_linewidth=0.8,
            linewidth=0,
            zorder=0,
        )
    )
    colours = colormaps[cmap].with_extremes(bad=(0.0, 0.0, 0.0, 0.0))
    norm = Normalize(vmin, vmax)
    image = ax.imshow(grid, cmap=colours, norm=norm, interpolation="nearest", aspect="equal", zorder=1)

    ax.set_xticks(np.arange(cols), [str(c + 1) for c in range(cols)])
    ax.set_yticks(np.arange(rows), [row_label(r) for r in range(rows)])
    ax.xaxis.tick_top()
    ax.tick_params(length=0, labelsize={8: 9, 16: 7}.get(rows, 5))
    ax.set_xticks(np.arange(-0.5, cols, 1.0), minor=True)
    ax.set_yticks(np.arange(-0.5, rows, 1.0), minor=True)
    ax.tick_params(which="minor", length=0)
    ax.grid(which="minor", color="white", linewidth={8: 2.0, 16: 1.2}.get(rows, 0.6))
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    for spine in ax.spines.values():
        spine.set_visible(False)

    if annotate:
        for well, value in values.items():
            if value is None or not math.isfinite(value):
                continue
            r, c = well_position(well)
            red, green, blue, _ = colours(norm(value))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            tag = (well_labels or {}).get(well, "")
            ax.text(
                c,
                r - (0.12 if tag else 0.0),
                value_format.format(value),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else "black",
                zorder=2,
            )
            if tag:
                ax.text(
                    c,
                    r + 0.26,
                    tag[:8],
                    ha="center",
                    va="center",
                    fontsize=5.5,
                    color="white" if dark else "black",
                    zorder=2,
                )
    # A well with missing sites gets a red ×: across the well when it has no
    # value, small in its corner (and a red outline) when its value is written.
    big: list[tuple[int, int]] = []
    small: list[tuple[int, int]] = []
    for well in wells_with_missing:
        r, c = well_position(well)
        if annotate and not np.ma.is_masked(grid[r, c]):
            small.append((r, c))
            ax.add_patch(
                Rectangle(
                    (c - 0.46, r - 0.46),
                    0.92,
                    0.92,
                    fill=False,
                    edgecolor=MISSING_COLOUR,
                    linewidth=2,
                    zorder=3,
                )
            )
        else:
            big.append((r, c))
    size = {8: 20, 16: 11}.get(rows, 6)
    for marks, dx, factor in ((big, 0.0, 1.0), (small, 0.3, 0.45)):
        if marks:
            ax.plot(
                [c + dx for _, c in marks],
                [r - dx for r, _ in marks],
                linestyle="none",
                marker="x",
                markersize=size * factor,
                markeredgewidth={8: 2.2, 16: 1.6}.get(rows, 1.0),
                color=MISSING_COLOUR,
                alpha=0.9,
                zorder=4,
            )

    colourbar = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.02, extend="both" if robust else "neither")
    colourbar.set_label(label)
    if finite.size and np.all(finite == np.round(finite)):
        colourbar.locator = MaxNLocator(integer=True)  # counts: no 3.5 cells
    handles = [
        Patch(
            facecolor=NO_DATA_COLOUR,
            edgecolor=NO_DATA_HATCH_COLOUR,
            hatch="///",
            label="no value (not imaged or no result)",
        ),
        Line2D(
            [],
            [],
            linestyle="none",
            marker="x",
            color=MISSING_COLOUR,
            markeredgewidth=2,
            label="sites missing or failed",
        ),
    ]
    ax.legend(
        handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=2, frameon=False, fontsize=9
    )
    ax.set_title(title, fontsize=11, pad=12)
    return fig


def png_bytes(fig: Figure, dpi: int = 120) -> bytes:
    """The figure as PNG. The same figure gives the same bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


CONTROL_COLOURS = {"negative": "#1f77b4", "positive": "#d62728", "sample": "#7f7f7f"}


def dose_response(
    doses: np.ndarray[Any, Any],
    values: np.ndarray[Any, Any],
    classes: list[str],
    fit: list[float] | None,
    *,
    title: str,
    feature: str,
    dose_label: str,
) -> Figure:
    """Per-well values against dose, coloured by control class, with the
    fitted four-parameter sigmoid and its EC50."""
    fig = Figure(figsize=(7.0, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, colour in CONTROL_COLOURS.items():
        pick = [
            i for i, c in enumerate(classes) if c == name and np.isfinite(values[i]) and np.isfinite(doses[i])
        ]
        if pick:
            ax.scatter(doses[pick], values[pick], color=colour, s=26, label=f"{name} wells", zorder=3)
    finite = np.isfinite(doses)
    if fit is not None and finite.any():
        x = np.linspace(float(np.nanmin(doses)), float(np.nanmax(doses)), 200)
        bottom, top, ec50, hill = fit
        with np.errstate(all="ignore"):
            y = bottom + (top - bottom) / (1 + (x / ec50) ** hill)
        ax.plot(x, y, color="black", linewidth=1.5, label="four-parameter fit", zorder=2)
        if math.isfinite(ec50) and np.nanmin(doses) <= ec50 <= np.nanmax(doses):
            ax.axvline(ec50, color="black", linestyle=":", linewidth=1, label=f"EC50 = {ec50:.3g}")
    ax.set_xlabel(dose_label)
    ax.set_ylabel(f"{feature} (per well)")
    ax.legend(fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    return fig


def position_effects(
    values: Mapping[str, float], *, title: str, feature: str, shape: tuple[int, int]
) -> Figure:
    """Per-row and per-column trends: the mean (and standard deviation) of a
    feature over the wells of each row and of each column."""
    rows, cols = shape
    grid = np.asarray(value_grid(values, shape).filled(np.nan), dtype=float)
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (axis, n, labels, name) in enumerate(
        (
            (1, rows, [row_label(r) for r in range(rows)], "row"),
            (0, cols, [str(c + 1) for c in range(cols)], "column"),
        )
    ):
        ax = fig.add_subplot(1, 2, k + 1)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(grid, axis=axis)
            sd = np.nanstd(grid, axis=axis)
        x = np.arange(n)
        ax.errorbar(x, mean, yerr=sd, marker="o", markersize=4, capsize=2, linewidth=1)
        ax.set_xticks(x, labels, fontsize=7 if n > 16 else 8)
        ax.set_xlabel(name)
        ax.set_ylabel(f"mean {feature}" if k == 0 else "")
        ax.set_title(f"per {name}", fontsize=9)
    fig.suptitle(title, fontsize=10)
    return fig
