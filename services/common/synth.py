"""Synthetic imaging sites with known ground truth.

A site is two 16-bit channels, ``DNA`` and ``GFP``, with a known number of
round, well-separated nuclei on a noisy background, so that a nuclei pipeline
must count exactly what was drawn. Counts vary smoothly over the plate
(:func:`nuclei_for`), so a per-well heatmap of the results shows a gradient.

Needs numpy and tifffile (for :func:`write_site`).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import numpy.typing as npt

CHANNELS = ("DNA", "GFP")
MIN_NUCLEI = 5
MAX_NUCLEI = 40

# Geometry, in pixels. Radii are drawn per nucleus; centres are kept far enough
# apart that no two nuclei touch, and away from the border so none is cut off.
_RADIUS_RANGE = (7.0, 11.0)
_GAP = 10.0
_MARGIN = 6.0
# Intensities, in counts of a 16-bit camera.
_BACKGROUND = 600.0
_NOISE_SD = 60.0
_DNA_PEAK_RANGE = (9000.0, 16000.0)
_GFP_LEVEL_RANGE = (1500.0, 6000.0)

_WELL_RE = re.compile(r"^([A-Pa-p])(\d{1,2})$")

Image16 = npt.NDArray[np.uint16]


def _rng(*parts: object) -> np.random.Generator:
    """A generator seeded from ``parts`` the same way in every process."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _parse_well(well: str) -> tuple[int, int]:
    """``"B03"`` -> (row index 1, column 3)."""
    match = _WELL_RE.match(well)
    if match is None:
        raise ValueError(f"not a well name: {well!r} (expected e.g. 'B03')")
    return ord(match.group(1).upper()) - ord("A"), int(match.group(2))


def nuclei_for(well: str, site: int, seed: int = 0) -> int:
    """How many nuclei site ``site`` of ``well`` gets, always the same for the same inputs.

    Rises from top-left to bottom-right of a 96-well layout (rows A-H, columns
    1-12; larger plates wrap around), with a small per-site jitter, within
    [MIN_NUCLEI, MAX_NUCLEI].
    """
    row, col = _parse_well(well)
    gradient = 0.6 * (row % 8) / 7 + 0.4 * ((col - 1) % 12) / 11
    jitter = int(_rng("nuclei", seed, well.upper(), site).integers(-2, 3))
    count = MIN_NUCLEI + round(gradient * (MAX_NUCLEI - MIN_NUCLEI)) + jitter
    return max(MIN_NUCLEI, min(MAX_NUCLEI, count))


def _place(nuclei: int, size: int, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """Centres and radii of ``nuclei`` non-touching disks inside a ``size`` square."""
    placed: list[tuple[float, float, float]] = []
    tries = 0
    while len(placed) < nuclei:
        tries += 1
        if tries > 200 * nuclei + 1000:
            raise ValueError(f"cannot place {nuclei} separated nuclei in a {size}x{size} site")
        r = float(rng.uniform(*_RADIUS_RANGE))
        lo, hi = r + _MARGIN, size - 1 - r - _MARGIN
        y, x = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
        if all((y - py) ** 2 + (x - px) ** 2 >= (r + pr + _GAP) ** 2 for py, px, pr in placed):
            placed.append((y, x, r))
    return placed


def make_site(nuclei: int, size: int = 512, seed: int = 0) -> dict[str, Image16]:
    """Draw one site: ``{"DNA": uint16 image, "GFP": uint16 image}``, each ``size`` x ``size``.

    DNA has ``nuclei`` bright, smooth, round nuclei (diameter 14-22 px), none
    touching another or the border. GFP has a per-nucleus level over a slightly
    larger disk (nucleus plus a rim of cytoplasm). Both have Gaussian noise.
    """
    if nuclei < 0:
        raise ValueError("nuclei must be >= 0")
    rng = _rng("site", seed, nuclei, size)
    dna = np.zeros((size, size), np.float64)
    gfp = np.zeros((size, size), np.float64)
    for y, x, r in _place(nuclei, size, rng):
        # Work in a window around the nucleus only.
        half = int(np.ceil(r + 4))
        y0, y1 = max(0, int(y) - half), min(size, int(y) + half + 2)
        x0, x1 = max(0, int(x) - half), min(size, int(x) + half + 2)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d = np.hypot(yy - y, xx - x)
        # A dome with a soft (sigmoid) edge: one intensity maximum per nucleus.
        edge = 1.0 / (1.0 + np.exp((d - r) / 0.8))
        dome = 1.0 - 0.35 * np.clip(d / r, 0.0, 1.0) ** 2
        dna[y0:y1, x0:x1] += rng.uniform(*_DNA_PEAK_RANGE) * edge * dome
        rim = 1.0 / (1.0 + np.exp((d - r - 2.5) / 0.8))
        gfp[y0:y1, x0:x1] += rng.uniform(*_GFP_LEVEL_RANGE) * rim
    out: dict[str, Image16] = {}
    for name, signal in (("DNA", dna), ("GFP", gfp)):
        noisy = signal + _BACKGROUND + rng.normal(0.0, _NOISE_SD, signal.shape)
        out[name] = np.clip(np.rint(noisy), 0, 65535).astype(np.uint16)
    return out


def site_filename(plate: str, well: str, site: int, channel: str) -> str:
    """``P1``, ``B03``, 2, ``DNA`` -> ``P1_B03_s2_DNA.tif``."""
    return f"{plate}_{well}_s{site}_{channel}.tif"


def write_site(
    directory: Path | str,
    plate: str,
    well: str,
    site: int,
    nuclei: int | None = None,
    *,
    size: int = 512,
    seed: int = 0,
) -> dict[str, Path]:
    """Write one site as ``{plate}_{well}_s{site}_{channel}.tif`` files in ``directory``.

    ``nuclei`` defaults to :func:`nuclei_for` (well, site, seed). Returns the
    path of each channel's file.
    """
    import tifffile  # only writing needs it

    _parse_well(well)
    if nuclei is None:
        nuclei = nuclei_for(well, site, seed)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    # Different sites with the same count still get different images.
    image_seed = int(_rng("image", seed, plate, well.upper(), site).integers(0, 2**31))
    images = make_site(nuclei, size, image_seed)
    paths: dict[str, Path] = {}
    for channel in CHANNELS:
        path = folder / site_filename(plate, well, site, channel)
        tifffile.imwrite(path, images[channel])
        paths[channel] = path
    return paths
