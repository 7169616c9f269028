"""A stand-in for a microscope: generated sites with known nuclei counts,
uploaded and registered channel by channel over time, in an order where
sites complete out of order — the way images arrive from a real instrument."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cellmesh import keys
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.common.v1 import types_pb2

from services.common import synth
from services.common.retry import with_backoff
from services.common.s3 import ObjectStore, ObjectStoreError


def plate_wells(rows: int, columns: int) -> list[str]:
    return [f"{chr(ord('A') + r)}{c:02d}" for r in range(rows) for c in range(1, columns + 1)]


@dataclass(frozen=True)
class SiteImages:
    well: str
    site: int
    nuclei: int
    files: dict[str, Path]


def generate_plate(
    folder: Path, plate: str, wells: Iterable[str], sites: int, size: int, seed: int
) -> list[SiteImages]:
    out = []
    for well in wells:
        for site in range(sites):
            nuclei = synth.nuclei_for(well, site, seed)
            files = synth.write_site(folder, plate, well, site, nuclei, size=size, seed=seed)
            out.append(SiteImages(well, site, nuclei, files))
    return out


def arrival_order(sites: list[SiteImages], seed: int) -> list[tuple[SiteImages, str]]:
    """Every (site, channel), shuffled within a sliding window so sites finish
    out of order but the plate still fills roughly front to back."""
    rng = random.Random(seed)
    events = [(s, channel) for s in sites for channel in s.files]
    window = 16
    out: list[tuple[SiteImages, str]] = []
    for i in range(0, len(events), window):
        chunk = events[i : i + window]
        rng.shuffle(chunk)
        out.extend(chunk)
    return out


async def acquire(
    store: ObjectStore,
    catalog: catalog_pb2_grpc.CatalogServiceAsyncStub,
    plate: str,
    sites: list[SiteImages],
    images_per_second: float,
    seed: int = 0,
) -> int:
    """Uploads and registers every channel image at about `images_per_second`;
    returns the number of images registered."""
    events = arrival_order(sites, seed)
    batch = max(1, int(images_per_second // 10))
    count = 0
    for i in range(0, len(events), batch):
        regs = []
        for site, channel in events[i : i + batch]:
            path = site.files[channel]
            key = keys.image_key(plate, site.well, site.site, channel, path.name)
            stored = await with_backoff(
                partial(store.put_file, key, path, "image/tiff"),
                f"uploading {path.name}",
                transient=lambda exc: isinstance(exc, ObjectStoreError),
            )
            regs.append(
                catalog_pb2.ImageRegistration(
                    site=types_pb2.SiteRef(plate=plate, well=site.well, site=site.site),
                    channel=channel,
                    object=types_pb2.ObjectRef(key=stored.key, size=stored.size, sha256=stored.sha256),
                    file_name=path.name,
                )
            )
        await with_backoff(
            partial(catalog.RegisterImages, catalog_pb2.RegisterImagesRequest(images=regs), timeout=60),
            "registering images",
        )
        count += len(regs)
        await asyncio.sleep(len(regs) / images_per_second)
    return count
