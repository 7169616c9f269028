"""How a site's images reach CellProfiler: the catalog's channels decide which
file is which image, never the microscope's file names.

* Each channel's file goes into a sub-folder of the site's input folder (the
  run's Default Input Folder) named after the channel, under its own file
  name: files of different channels never share a path, whatever they are
  called.
* A NamesAndTypes pipeline runs as `cppipe.bind_channels` rewrote it: each
  image name's rule selects the folder of the channel with that name.
* A LoadData pipeline runs unchanged: the worker writes the site's CSV where
  its LoadData reads it (`cppipe.Pipeline.loaddata`), one row with
  ``FileName_<channel>``/``PathName_<channel>`` for every channel,
  ``Metadata_Plate``/``Metadata_Well``/``Metadata_Site`` and a
  ``Metadata_<key>`` for each key of the site's metadata (the ingest
  pattern's other groups).

Either way CellProfiler is told which file each image name must come from
(`SiteInputs.expected`); the runners check it got exactly one image set made
of those files (services/cpworker/cp_child.py, runner.py).

A plate stage's run covers every site of the plate: each channel's folder
holds one numbered sub-folder per site (``<channel>/00000/<file>``, in the
claim's site order), the bound rules select them (`cppipe.channel_rule`),
and the runners check there is one image set per site, each made of one
site's files, in any order (a pipeline that groups numbers its image sets
group by group; `cp_child.match_image_sets`).

Image names that are not channels (an illumination function an earlier
plate stage made, an attached file) keep the pipeline's own rules: their
files are input files in the Default Input Folder and in the file list.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common import cppipe


class InputsProblem(ValueError):
    """The site's images cannot be given to this pipeline (an input problem)."""


@dataclass(frozen=True)
class PreparedPipeline:
    """A registered pipeline as the worker runs it."""

    path: Path
    """The file CellProfiler runs: the registered one, or its bound copy."""
    parsed: cppipe.Pipeline

    @property
    def uses_loaddata(self) -> bool:
        return bool(self.parsed.loaddata)


@dataclass(frozen=True)
class SiteInputs:
    """What one site's run is given."""

    input_dir: Path
    """The run's Default Input Folder."""
    files: list[Path]
    """CellProfiler's file list."""
    expected_sets: list[dict[str, Path]]
    """Per image set (one per site): image name -> the file CellProfiler must load for it."""

    @property
    def expected(self) -> dict[str, Path]:
        return self.expected_sets[0] if self.expected_sets else {}


def prepare_pipeline(path: Path, channels: Collection[str] = (), per_site: bool = False) -> PreparedPipeline:
    """Reads a registered pipeline; a NamesAndTypes one gets a copy beside it
    bound to ``channels`` (``<name>.bound-<key>.cppipe``, written once)."""
    try:
        parsed = cppipe.parse(path.read_bytes())
    except cppipe.PipelineError as exc:
        raise InputsProblem(f"the pipeline cannot be read: {exc}") from exc
    if parsed.loaddata:
        return PreparedPipeline(path, parsed)
    key = hashlib.sha256(json.dumps([sorted(channels), per_site]).encode()).hexdigest()[:12]
    bound = path.with_name(f"{path.stem}.bound-{key}.cppipe")
    if not bound.exists():
        scratch = bound.with_name(bound.name + ".tmp")
        text = cppipe.bind_channels(parsed, set(channels) if channels else None, per_site)
        scratch.write_text(text, encoding="utf-8" if parsed.utf8 else "latin-1")
        scratch.replace(bound)
    return PreparedPipeline(bound, parsed)


def channel_path(input_dir: Path, channel: str, file_name: str, site_index: int | None = None) -> Path:
    """Where a channel's file goes: its own folder, named after the channel
    (and, in a run over several sites, a numbered sub-folder per site)."""
    if site_index is not None:
        return input_dir / channel / f"{site_index:05d}" / file_name
    return input_dir / channel / file_name


def site_inputs(
    pipeline: PreparedPipeline,
    input_dir: Path,
    channel_files: Mapping[str, Path],
    site: tuple[str, str, int],
    input_files: Sequence[Path] = (),
    metadata: Mapping[str, str] | None = None,
) -> SiteInputs:
    """The run's inputs once the channels' files are in place; writes the
    LoadData CSV of a LoadData pipeline. ``site`` is (plate, well, site),
    ``metadata`` the site's other metadata."""
    return run_inputs(pipeline, input_dir, [(channel_files, site)], input_files, [metadata or {}])


def run_inputs(
    pipeline: PreparedPipeline,
    input_dir: Path,
    sites: Sequence[tuple[Mapping[str, Path], tuple[str, str, int]]],
    input_files: Sequence[Path] = (),
    metadata: Sequence[Mapping[str, str]] | None = None,
) -> SiteInputs:
    """The inputs of a run over one site or several (a plate stage): for each
    site its channels' files and (plate, well, site), and its metadata in
    ``metadata`` (same order); ``input_files`` are the other files in the
    Default Input Folder."""
    extra = list(input_files)
    if pipeline.uses_loaddata:
        images = {p.resolve() for files, _site in sites for p in files.values()}
        for relative in pipeline.parsed.loaddata:
            target = input_dir / relative
            if target.resolve() in images:
                raise InputsProblem(f"LoadData's CSV {relative} would replace an image of the site")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(loaddata_csv(sites, metadata=metadata), encoding="utf-8")
        listed = [p for files, _site in sites for p in files.values()]
        return SiteInputs(input_dir, listed + extra, [dict(files) for files, _site in sites])
    needed = list(pipeline.parsed.image_names)
    expected_sets: list[dict[str, Path]] = []
    for channel_files, _site in sites:
        missing = [name for name in needed if name not in channel_files]
        if missing and not extra:
            raise InputsProblem(
                f"the pipeline needs the channel(s) {', '.join(missing)}, but the site has only "
                f"{', '.join(sorted(channel_files)) or 'none'} and no other input file"
            )
        expected_sets.append({name: channel_files[name] for name in needed if name in channel_files})
    listed = [p for expected in expected_sets for p in expected.values()]
    return SiteInputs(input_dir, listed + extra, expected_sets)


def loaddata_csv(
    sites: Sequence[tuple[Mapping[str, Path], tuple[str, str, int]]] | Mapping[str, Path],
    site: tuple[str, str, int] | None = None,
    metadata: Sequence[Mapping[str, str]] | None = None,
) -> str:
    """One row per site: FileName_/PathName_ of every channel (absolute
    folders), then the site's metadata: ``Metadata_Plate``, ``_Well``,
    ``_Site``, then ``Metadata_<key>`` for every key any site of the run has
    (in name order; empty where a site has none). (One site may be given as
    its channel files and (plate, well, site).)"""
    if isinstance(sites, Mapping):
        assert site is not None
        sites = [(sites, site)]
    per_site = list(metadata) if metadata is not None else [{} for _ in sites]
    if len(per_site) != len(sites):
        raise ValueError(f"{len(sites)} sites but metadata for {len(per_site)}")
    keys = sorted({k for meta in per_site for k in meta})
    header: list[str] = []
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    for n, ((channel_files, (plate, well, number)), meta) in enumerate(zip(sites, per_site, strict=True)):
        row: list[str] = []
        names: list[str] = []
        for channel, path in channel_files.items():
            names += [f"FileName_{channel}", f"PathName_{channel}"]
            row += [path.name, str(path.parent.resolve())]
        names += ["Metadata_Plate", "Metadata_Well", "Metadata_Site"] + [f"Metadata_{k}" for k in keys]
        row += [plate, well, str(number)] + [meta.get(k, "") for k in keys]
        if n == 0:
            header = names
            writer.writerow(header)
        elif names != header:
            raise InputsProblem(f"site {well}/s{number} has other channels than the first site of the run")
        writer.writerow(row)
    return out.getvalue()
