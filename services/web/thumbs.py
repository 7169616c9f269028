"""Thumbnails of stored images: TIFF (any bit depth, planes or channels) or
anything Pillow reads, scaled to 8 bits between the 0.5th and 99.5th
percentiles, as PNG."""

from __future__ import annotations

import io

import numpy as np
import tifffile
from PIL import Image


class NotAnImage(ValueError):
    """The bytes are no image this page can draw."""


def _pixels(data: bytes) -> np.ndarray:
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        try:
            return np.asarray(tifffile.imread(io.BytesIO(data)))
        except Exception as exc:  # tifffile raises many kinds for a broken file
            raise NotAnImage(f"the TIFF cannot be read: {exc}") from exc
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im)
    except Exception as exc:
        raise NotAnImage(f"not an image Pillow or tifffile reads: {exc}") from exc


def _plane(pixels: np.ndarray) -> np.ndarray:
    """One 2-D plane (grey) or an H x W x 3 array (colour)."""
    if pixels.size == 0:
        raise NotAnImage("the image has no pixels")
    while pixels.ndim > 3 or (pixels.ndim == 3 and pixels.shape[-1] not in (3, 4)):
        pixels = pixels[0]
    if pixels.ndim == 3:
        pixels = pixels[..., :3]
    if pixels.ndim != 2 and pixels.ndim != 3:
        raise NotAnImage(f"an image of shape {pixels.shape} has no plane to draw")
    return pixels


def thumbnail_png(data: bytes, size: int) -> bytes:
    """A PNG at most `size` pixels on its longer side."""
    plane = _plane(_pixels(data)).astype(np.float64)
    finite = plane[np.isfinite(plane)]
    if finite.size == 0:
        raise NotAnImage("the image has no finite pixel values")
    low, high = np.percentile(finite, [0.5, 99.5])
    if high <= low:
        high = low + 1.0
    scaled = np.clip((np.nan_to_num(plane, nan=low) - low) / (high - low), 0.0, 1.0)
    image = Image.fromarray((scaled * 255.0 + 0.5).astype(np.uint8))
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()
