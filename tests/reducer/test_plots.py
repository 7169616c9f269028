"""Plate heatmaps: layouts, and what the rendered pixels show."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from services.reducer.plots import infer_shape, plate_heatmap, png_bytes
from services.reducer.tables import row_label, well_position


def rendered(fig: Figure) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[:, :, :3].astype(float) / 255  # type: ignore[attr-defined]


def well_pixels(fig: Figure, ax: Axes, pixels: np.ndarray, well: str, dx: float, dy: float) -> np.ndarray:
    """The pixel at (column + dx, row + dy) in data coordinates of a well."""
    r, c = well_position(well)
    x, y = ax.transData.transform((c + dx, r + dy))
    height = pixels.shape[0]
    return pixels[int(round(height - y)), int(round(x))]


def well_patch(fig: Figure, ax: Axes, pixels: np.ndarray, well: str) -> np.ndarray:
    """Pixels across the lower-left quarter of a well (no text, no × there)."""
    points = [(-0.3 + 0.05 * i, 0.12 + 0.05 * j) for i in range(5) for j in range(5)]
    return np.array([well_pixels(fig, ax, pixels, well, dx, dy) for dx, dy in points])


def plate_96() -> dict[str, float]:
    values = {f"{row_label(r)}{c + 1:02d}": float(10 * r + c) for r in range(8) for c in range(12)}
    for not_imaged in ("H10", "H11", "H12"):
        del values[not_imaged]
    values["C05"] = float("nan")  # imaged, no result
    return values


@pytest.mark.parametrize(
    ("wells", "shape"),
    [
        (["A01", "H12"], (8, 12)),
        (["B02"], (8, 12)),
        (["I01"], (16, 24)),
        (["A13"], (16, 24)),
        (["P24"], (16, 24)),
        (["A25"], (32, 48)),
        (["AF48", "A01"], (32, 48)),
        ([], (8, 12)),
    ],
)
def test_layout_is_inferred_from_well_names(wells: list[str], shape: tuple[int, int]) -> None:
    assert infer_shape(wells) == shape


def test_96_well_heatmap_shows_values_empty_and_missing_wells(tmp_path: Path) -> None:
    values = plate_96()
    fig = plate_heatmap(
        values, title="P1 — cells per well", label="cells per well", wells_with_missing=["B03", "C05"]
    )
    ax = fig.axes[0]
    grid = ax.images[0].get_array()
    assert grid.shape == (8, 12)
    assert grid[0, 0] == 0.0 and grid[7, 8] == 78.0
    assert grid.mask[7, 11] and grid.mask[2, 4]  # not imaged; no result
    assert [t.get_text() for t in ax.get_yticklabels()] == list("ABCDEFGH")
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(c) for c in range(1, 13)]
    texts = {t.get_text() for t in ax.texts}
    assert {"0", "78", "34"} <= texts and len(ax.texts) == 96 - 3 - 1
    assert ax.get_title().startswith("P1")

    pixels = rendered(fig)
    norm = Normalize(0.0, 78.0)
    colours = colormaps["viridis"]
    for well, value in (("A01", 0.0), ("D07", 36.0), ("H09", 78.0)):
        patch = well_patch(fig, ax, pixels, well)
        expected = np.array(colours(norm(value))[:3])
        assert np.abs(patch - expected).max() < 0.02, well
    # Not imaged: grey and hatched (more than one shade), unlike any colour of the map.
    patch = well_patch(fig, ax, pixels, "H12")
    assert np.abs(patch - patch.mean(axis=1, keepdims=True)).max() < 0.02
    assert patch.mean() > 0.5 and len({tuple(p) for p in patch.round(2)}) > 1
    assert np.abs(patch.mean(axis=0) - np.array(colours(0.5)[:3])).max() > 0.2
    # Imaged without a result: grey too, away from its ×.
    side = np.array([well_pixels(fig, ax, pixels, "C05", -0.4, dy) for dy in np.linspace(-0.1, 0.1, 5)])
    assert np.abs(side - side.mean(axis=1, keepdims=True)).max() < 0.02 and side.mean() > 0.5
    # Red × in wells with missing sites: across C05 (no value), in B03's corner.
    red = np.array([0.84, 0.15, 0.16])
    assert np.abs(well_pixels(fig, ax, pixels, "C05", 0.0, 0.0) - red).max() < 0.15
    assert np.abs(well_pixels(fig, ax, pixels, "B03", 0.3, -0.3) - red).max() < 0.15
    assert np.abs(well_pixels(fig, ax, pixels, "B04", 0.3, -0.3) - red).max() > 0.3

    png = png_bytes(fig)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png == png_bytes(fig)  # the same figure, the same bytes
    (tmp_path / "heatmap_96.png").write_bytes(png)


def test_384_well_heatmap_layout() -> None:
    values = {f"{row_label(r)}{c + 1:02d}": float(r * 24 + c) for r in range(16) for c in range(20)}
    fig = plate_heatmap(values, title="P384", label="median", wells_with_missing=["B03"], robust=True)
    ax = fig.axes[0]
    grid = ax.images[0].get_array()
    assert grid.shape == (16, 24)
    assert grid.mask[:, 20:].all() and not grid.mask[:, :20].any()
    assert [t.get_text() for t in ax.get_yticklabels()][-1] == "P"
    assert [t.get_text() for t in ax.get_xticklabels()][-1] == "24"
    assert len(ax.texts) == 0  # values are written on 96-well plates only
    pixels = rendered(fig)
    filled = well_patch(fig, ax, pixels, "A01")
    empty = well_patch(fig, ax, pixels, "A24")
    assert np.abs(filled - filled[0]).max() < 0.02  # one colour
    assert np.abs(empty.mean(axis=0) - filled[0]).max() > 0.2


def test_1536_well_heatmap_renders() -> None:
    values = {f"{row_label(r)}{c + 1:02d}": float(r + c) for r in range(32) for c in range(48) if r < 30}
    fig = plate_heatmap(values, title="P1536", label="cells", wells_with_missing=["AF48"])
    ax = fig.axes[0]
    assert ax.images[0].get_array().shape == (32, 48)
    assert [t.get_text() for t in ax.get_yticklabels()][-2:] == ["AE", "AF"]
    assert png_bytes(fig, dpi=60)[:4] == b"\x89PNG"


def test_no_values_at_all_still_draws() -> None:
    fig = plate_heatmap({}, title="nothing yet", label="cells", wells_with_missing=["A01", "B02"])
    assert fig.axes[0].images[0].get_array().mask.all()
    assert png_bytes(fig, dpi=40)[:4] == b"\x89PNG"
