"""Ingest a folder of microscope images into a cellmesh.

What a lab runs against a folder, once or (with `watch`) while a microscope
is still writing into it:

1. Each file name is read with a regular expression with named groups, the
   way CellProfiler's Metadata module does: `Well` (or `WellRow` and
   `WellColumn`), `Channel`, and optionally `Plate` and `Site`. Every other
   group (here `ImageNumber`; `Timepoint`, `Compound`, ...) is the site's
   metadata, which pipelines see as `Metadata_<name>`; every image of a site
   must give it the same values. For example BBBC013's
   `Channel1-01-A-01.tif`::

       Channel(?P<Channel>\\d)-(?P<ImageNumber>\\d+)-(?P<WellRow>[A-P])-(?P<WellColumn>\\d+)\\.tif

   A channel map (`{"1": "GFP", "2": "DNA"}`) turns the microscope's channel
   values into the plate's channel names. Files that cannot be read this way
   are reported, never silently dropped.
2. Each image is uploaded to `images/<plate>/<well>/s<site>/<channel>/<file>`
   with its SHA-256 in the object's metadata, unless the catalog already has
   the same image or the store already holds the same bytes there.
3. The images are registered with the catalog in batches; a site becomes
   ready for CellProfiler once all of its channels are registered.

Running it again uploads and registers nothing that is already there.
"""

from __future__ import annotations

import asyncio
import contextlib
import mimetypes
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from cellmesh import keys
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.client import CellmeshClient, CellmeshError, ObjectStore, sha256_bytes
from cellmesh.common.v1 import types_pb2

__all__ = [
    "FileNameParser",
    "ImageFile",
    "IngestSummary",
    "Ingester",
    "ScanResult",
    "StabilityTracker",
    "Unmatched",
    "image_key",
    "normalize_well",
    "parse_channel_map",
    "read_if_unchanged",
    "scan_folder",
    "well_name",
]

_WELL = re.compile(r"^([A-Za-z]{1,2})0*(\d{1,3})$")


def well_name(row: str, column: str | int) -> str:
    """The catalog's well name: row letter(s) in upper case, then the column
    zero-padded to two digits (`("a", "1")` -> `"A01"`)."""
    row = row.strip().upper()
    if not re.fullmatch(r"[A-Z]|A[A-F]", row):
        raise ValueError(f"well row {row!r} is not A to Z or AA to AF (plates have at most 32 rows)")
    text = str(column).strip()
    if not text.isdigit() or not 1 <= int(text) <= 48:
        raise ValueError(f"well column {text!r} is not 1 to 48")
    return f"{row}{int(text):02d}"


def normalize_well(well: str) -> str:
    """`"D3"`, `"d03"`, `"D003"` -> `"D03"`."""
    m = _WELL.match(well.strip())
    if not m:
        raise ValueError(f"well {well!r} is not a row letter and a column number")
    return well_name(m.group(1), m.group(2))


def image_key(plate: str, well: str, site: int, channel: str, file_name: str) -> str:
    """Where an image is stored: `images/<plate>/<well>/s<site>/<channel>/<file name>`."""
    return keys.image_key(plate, well, site, channel, file_name)


def parse_channel_map(text: str | None) -> dict[str, str]:
    """`"1=GFP,2=DNA"` -> `{"1": "GFP", "2": "DNA"}` (raw value -> plate channel)."""
    mapping: dict[str, str] = {}
    if not text:
        return mapping
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        raw, sep, name = item.partition("=")
        raw, name = raw.strip(), name.strip()
        if not sep or not raw or not name:
            raise ValueError(f"channel map entry {item!r} is not RAW=NAME (e.g. 1=GFP)")
        if raw in mapping:
            raise ValueError(f"channel map gives {raw!r} twice")
        mapping[raw] = name
    return mapping


@dataclass(frozen=True)
class ImageFile:
    """A file whose name says which site and channel it is."""

    path: Path
    plate: str
    well: str
    site: int
    channel: str
    size: int
    mtime_ns: int
    metadata: Mapping[str, str] = field(default_factory=dict)
    """The pattern's other named groups (those that matched)."""

    @property
    def file_name(self) -> str:
        return self.path.name

    @property
    def key(self) -> str:
        return image_key(self.plate, self.well, self.site, self.channel, self.file_name)

    @property
    def slot(self) -> tuple[str, str, int, str]:
        """(plate, well, site, channel): what the catalog holds one image for."""
        return (self.plate, self.well, self.site, self.channel)

    @property
    def signature(self) -> tuple[int, int]:
        return (self.size, self.mtime_ns)


@dataclass(frozen=True)
class Unmatched:
    """A file that was not ingested, and why."""

    path: Path
    reason: str


@dataclass(frozen=True)
class ParsedName:
    plate: str
    well: str
    site: int
    channel: str
    metadata: Mapping[str, str] = field(default_factory=dict)


#: Groups that say which site and channel a file is; every other group is metadata.
SITE_GROUPS = frozenset({"Plate", "Well", "WellRow", "WellColumn", "Site", "Channel"})


class FileNameParser:
    """Reads plate, well, site and channel from file names.

    `pattern` is searched in the file name (as CellProfiler does). Its named
    groups: `Channel` (required); `Well`, or `WellRow` and `WellColumn`
    (required); `Plate` (else `plate`); `Site` (else `site`). Other groups
    (e.g. `ImageNumber`, `Timepoint`) are the site's metadata; a group that
    did not take part in the match is left out. With a `channel_map`, every
    channel value must be in it.
    """

    def __init__(
        self,
        pattern: str,
        plate: str | None = None,
        site: int = 0,
        channel_map: Mapping[str, str] | None = None,
    ) -> None:
        try:
            self.regex = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"the pattern is not a regular expression: {exc}") from exc
        groups = set(self.regex.groupindex)
        if "Channel" not in groups:
            raise ValueError("the pattern needs a (?P<Channel>...) group")
        if "Well" not in groups and not {"WellRow", "WellColumn"} <= groups:
            raise ValueError(
                "the pattern needs a (?P<Well>...) group, or (?P<WellRow>...) and (?P<WellColumn>...)"
            )
        if "Plate" not in groups and not plate:
            raise ValueError("the pattern has no (?P<Plate>...) group: give the plate's name")
        if site < 0:
            raise ValueError("the site number must be 0 or more")
        self.plate = plate or None
        self.site = site
        self.channel_map = dict(channel_map or {})

    def parse(self, file_name: str) -> ParsedName | str:
        """The file's site and channel, or why it cannot be read."""
        m = self.regex.search(file_name)
        if m is None:
            return "does not match the pattern"
        if any(ord(c) < 32 for c in file_name):
            return "the file name contains control characters"
        values = m.groupdict()
        plate = values.get("Plate") or self.plate
        if not plate:
            return "the pattern's Plate group is empty"
        if self.plate and plate != self.plate:
            return f"plate {plate!r} from the file name is not the plate asked for ({self.plate})"
        try:
            if values.get("Well"):
                well = normalize_well(str(values["Well"]))
            else:
                well = well_name(values.get("WellRow") or "", values.get("WellColumn") or "")
        except ValueError as exc:
            return str(exc)
        site_text = values.get("Site")
        if site_text:
            if not site_text.isdigit():
                return f"site {site_text!r} is not a number"
            site = int(site_text)
        else:
            site = self.site
        raw = values.get("Channel") or ""
        if not raw:
            return "the pattern's Channel group is empty"
        if self.channel_map:
            if raw not in self.channel_map:
                known = ", ".join(sorted(self.channel_map))
                return f"channel {raw!r} is not in the channel map ({known})"
            channel = self.channel_map[raw]
        else:
            channel = raw
        metadata = {
            name: value for name, value in values.items() if name not in SITE_GROUPS and value is not None
        }
        return ParsedName(plate, well, site, channel, metadata)


@dataclass
class ScanResult:
    """What a scan of the folder found."""

    images: list[ImageFile] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)


def _walk(folder: Path, recursive: bool) -> Iterator[os.DirEntry[str]]:
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_dir():
                if recursive:
                    yield from _walk(Path(entry.path), recursive)
            elif entry.is_file():
                yield entry


def scan_folder(folder: Path, parser: FileNameParser, recursive: bool = False) -> ScanResult:
    """Every file in `folder` (and its subfolders if `recursive`), read with
    `parser`. Two files for the same (plate, well, site, channel): the first
    in name order is kept, the other is reported."""
    if not folder.is_dir():
        raise CellmeshError(grpc.StatusCode.NOT_FOUND, f"{folder} is not a folder")
    result = ScanResult()
    slots: dict[tuple[str, str, int, str], Path] = {}
    for entry in _walk(folder, recursive):
        path = Path(entry.path)
        parsed = parser.parse(entry.name)
        if isinstance(parsed, str):
            result.unmatched.append(Unmatched(path, parsed))
            continue
        try:
            stat = entry.stat()
        except FileNotFoundError:
            continue  # removed since the listing: nothing to report
        image = ImageFile(
            path,
            parsed.plate,
            parsed.well,
            parsed.site,
            parsed.channel,
            stat.st_size,
            stat.st_mtime_ns,
            parsed.metadata,
        )
        first = slots.setdefault(image.slot, path)
        if first != path:
            result.unmatched.append(Unmatched(path, f"same plate, well, site and channel as {first.name}"))
            continue
        result.images.append(image)
    return result


class StabilityTracker:
    """Tells which files stopped changing: a file is stable once two scans in
    a row saw the same size and modification time (a microscope may still be
    writing the others). Empty files are never stable."""

    def __init__(self) -> None:
        self._last: dict[Path, tuple[int, int]] = {}

    def split(self, images: Iterable[ImageFile]) -> tuple[list[ImageFile], list[ImageFile]]:
        """(stable, still changing) among this scan's files."""
        stable: list[ImageFile] = []
        changing: list[ImageFile] = []
        seen: dict[Path, tuple[int, int]] = {}
        for image in images:
            seen[image.path] = image.signature
            if image.size > 0 and self._last.get(image.path) == image.signature:
                stable.append(image)
            else:
                changing.append(image)
        self._last = seen
        return stable, changing


def read_if_unchanged(image: ImageFile) -> bytes | None:
    """The file's bytes, or None if it is empty or changed since it was
    scanned (it is still being written)."""
    try:
        before = image.path.stat()
        if (before.st_size, before.st_mtime_ns) != image.signature or before.st_size == 0:
            return None
        data = image.path.read_bytes()
        after = image.path.stat()
    except FileNotFoundError:
        return None
    if (after.st_size, after.st_mtime_ns) != image.signature or len(data) != image.size:
        return None
    return data


@dataclass
class IngestSummary:
    """What an ingest did."""

    images: int = 0
    uploaded: int = 0
    bytes_uploaded: int = 0
    already_stored: int = 0
    already_registered: int = 0
    created: int = 0
    replaced: int = 0
    unchanged: int = 0
    sites_ready: int = 0
    not_ready: int = 0
    unmatched: list[Unmatched] = field(default_factory=list)
    conflicts: list[Unmatched] = field(default_factory=list)

    def add(self, other: IngestSummary) -> None:
        for name in (
            "images", "uploaded", "bytes_uploaded", "already_stored", "already_registered",
            "created", "replaced", "unchanged", "sites_ready",
        ):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.not_ready = other.not_ready  # a count of now, not a total
        self.unmatched.extend(other.unmatched)
        self.conflicts.extend(other.conflicts)

    @property
    def changed_anything(self) -> bool:
        return bool(
            self.uploaded
            or self.created
            or self.replaced
            or self.sites_ready
            or self.unmatched
            or self.conflicts
        )

    def lines(self, examples: int = 5) -> list[str]:
        """The summary for people."""
        out = [
            f"images found        {self.images}",
            f"uploaded            {self.uploaded} ({self.bytes_uploaded / 1e6:.1f} MB)",
            f"skipped             {self.already_registered + self.already_stored}"
            f" ({self.already_registered} already registered, {self.already_stored} already stored)",
            f"registered          {self.created} new, {self.replaced} replaced, {self.unchanged} unchanged",
            f"sites made ready    {self.sites_ready}",
        ]
        if self.not_ready:
            out.append(f"not ready yet       {self.not_ready} (empty or still being written; run again)")
        out.append(f"unmatched           {len(self.unmatched)}")
        out += [f"  {u.path.name}: {u.reason}" for u in self.unmatched[:examples]]
        if len(self.unmatched) > examples:
            out.append(f"  ... and {len(self.unmatched) - examples} more")
        if self.conflicts:
            out.append(f"conflicts           {len(self.conflicts)} (not uploaded; --replace replaces them)")
            out += [f"  {u.path.name}: {u.reason}" for u in self.conflicts[:examples]]
            if len(self.conflicts) > examples:
                out.append(f"  ... and {len(self.conflicts) - examples} more")
        return out


def _progress_bar(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="img",
        file=sys.stderr,
        disable=not enabled or not sys.stderr.isatty(),
        leave=False,
    )


class Ingester:
    """Uploads and registers a folder's images for one mesh.

    Keeps what it learnt between runs (the catalog's images, files already
    handled), so `watch` looks only at new or changed files.
    """

    def __init__(
        self,
        client: CellmeshClient,
        store: ObjectStore,
        parser: FileNameParser,
        *,
        concurrency: int = 8,
        batch_size: int = 1000,
        replace: bool = False,
        recursive: bool = False,
        progress: bool = True,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be 1 or more")
        self.client = client
        self.store = store
        self.parser = parser
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.replace = replace
        self.recursive = recursive
        self.progress = progress
        self._plates: dict[str, catalog_pb2.Plate] = {}
        self._registered: dict[tuple[str, str, int, str], str] = {}
        self._handled: dict[Path, tuple[int, int]] = {}
        self._reported: set[Path] = set()

    async def _load_plate(self, name: str) -> catalog_pb2.Plate:
        plate = self._plates.get(name)
        if plate is None:
            plate = await self.client.get_plate(name)
            for image in await self.client.list_images(name):
                s = image.site
                self._registered[(s.plate, s.well, s.site, image.channel)] = image.object.sha256
            self._plates[name] = plate
        return plate

    async def run_once(self, folder: Path, tracker: StabilityTracker | None = None) -> IngestSummary:
        """One pass over the folder. With a `tracker`, only files that did not
        change since its previous pass are taken."""
        scan = await asyncio.to_thread(scan_folder, folder, self.parser, self.recursive)
        summary = IngestSummary()
        for item in scan.unmatched:
            if item.path not in self._reported:
                self._reported.add(item.path)
                summary.unmatched.append(item)
        todo = [i for i in scan.images if self._handled.get(i.path) != i.signature]
        if tracker is not None:
            todo, changing = tracker.split(todo)
            summary.not_ready += len(changing)
        ready: list[ImageFile] = []
        for image in todo:
            plate = await self._load_plate(image.plate)
            if image.channel not in plate.channels:
                self._handled[image.path] = image.signature
                if image.path not in self._reported:
                    self._reported.add(image.path)
                    known = ", ".join(plate.channels)
                    summary.unmatched.append(
                        Unmatched(
                            image.path,
                            f"channel {image.channel!r} is not one of plate {plate.name}'s ({known})",
                        )
                    )
                continue
            ready.append(image)
        ready.sort(key=lambda i: i.slot)
        summary.images = len(ready)
        with contextlib.closing(_progress_bar(len(ready), self.progress)) as bar:
            for start in range(0, len(ready), self.batch_size):
                await self._batch(ready[start : start + self.batch_size], summary, bar)
        return summary

    async def _batch(self, images: list[ImageFile], summary: IngestSummary, bar: Any) -> None:
        gate = asyncio.Semaphore(self.concurrency)

        async def one(image: ImageFile) -> tuple[ImageFile, catalog_pb2.ImageRegistration | None]:
            async with gate:
                try:
                    return image, await self._prepare(image, summary)
                finally:
                    bar.update(1)

        prepared = await asyncio.gather(*(one(i) for i in images))
        pending = [(i, r) for i, r in prepared if r is not None]
        if not pending:
            return
        reply = await self.client.register_images([r for _, r in pending])
        summary.sites_ready += reply.sites_ready
        for (image, registration), outcome in zip(pending, reply.outcomes, strict=True):
            if outcome == catalog_pb2.REGISTRATION_OUTCOME_CREATED:
                summary.created += 1
            elif outcome == catalog_pb2.REGISTRATION_OUTCOME_REPLACED:
                summary.replaced += 1
            else:
                summary.unchanged += 1
            self._registered[image.slot] = registration.object.sha256
            self._handled[image.path] = image.signature

    async def _prepare(
        self, image: ImageFile, summary: IngestSummary
    ) -> catalog_pb2.ImageRegistration | None:
        """Uploads the image if needed; returns its registration, or None if
        there is nothing to register."""
        data = await asyncio.to_thread(read_if_unchanged, image)
        if data is None:
            summary.not_ready += 1
            return None
        digest = sha256_bytes(data)
        registered = self._registered.get(image.slot)
        if registered == digest:
            summary.already_registered += 1
            self._handled[image.path] = image.signature
            return None
        if registered is not None and not self.replace:
            self._handled[image.path] = image.signature
            summary.conflicts.append(
                Unmatched(
                    image.path,
                    f"{image.well} site {image.site} {image.channel} is registered with other content",
                )
            )
            return None
        stored = await self.store.head(image.key)
        if stored is not None and stored.sha256 == digest and stored.size == len(data):
            summary.already_stored += 1
            ref = types_pb2.ObjectRef(key=image.key, size=len(data), sha256=digest)
        else:
            kind = mimetypes.guess_type(image.file_name)[0] or "application/octet-stream"
            ref = await self.store.upload_bytes(image.key, data, kind)
            summary.uploaded += 1
            summary.bytes_uploaded += len(data)
        return catalog_pb2.ImageRegistration(
            site=types_pb2.SiteRef(plate=image.plate, well=image.well, site=image.site),
            channel=image.channel,
            object=ref,
            file_name=image.file_name,
            replace=registered is not None,
            metadata=dict(image.metadata),
        )

    async def watch(
        self,
        folder: Path,
        interval: float,
        stop: asyncio.Event,
        on_pass: Callable[[IngestSummary], None] | None = None,
    ) -> IngestSummary:
        """Scans the folder every `interval` seconds until `stop` is set,
        taking each file once it stopped changing between two scans. Returns
        the totals; `on_pass` gets each pass's summary."""
        tracker = StabilityTracker()
        total = IngestSummary()
        while True:
            one = await self.run_once(folder, tracker)
            total.add(one)
            if on_pass is not None:
                on_pass(one)
            if stop.is_set():
                return total
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
            if stop.is_set():
                return total
