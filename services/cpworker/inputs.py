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
  ``FileName_<channel>``/``PathName_<channel>`` for every channel and
  ``Metadata_Plate``/``Metadata_Well``/``Metadata_Site``.

Either way CellProfiler is told which file each image name must come from
(`SiteInputs.expected`); the runners check it got exactly one image set made
of those files (services/cpworker/cp_child.py, runner.py).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
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
    expected: dict[str, Path]
    """Image name -> the file CellProfiler must load for it."""


def prepare_pipeline(path: Path) -> PreparedPipeline:
    """Reads a registered pipeline; a NamesAndTypes one gets a bound copy beside
    it (``<name>.bound.cppipe``, written once)."""
    try:
        parsed = cppipe.parse(path.read_bytes())
    except cppipe.PipelineError as exc:
        raise InputsProblem(f"the pipeline cannot be read: {exc}") from exc
    if parsed.loaddata:
        return PreparedPipeline(path, parsed)
    bound = path.with_name(path.stem + ".bound.cppipe")
    if not bound.exists():
        scratch = bound.with_name(bound.name + ".tmp")
        scratch.write_text(cppipe.bind_channels(parsed), encoding="utf-8" if parsed.utf8 else "latin-1")
        scratch.replace(bound)
    return PreparedPipeline(bound, parsed)


def channel_path(input_dir: Path, channel: str, file_name: str) -> Path:
    """Where a channel's file goes: its own folder, named after the channel."""
    return input_dir / channel / file_name


def site_inputs(
    pipeline: PreparedPipeline,
    input_dir: Path,
    channel_files: Mapping[str, Path],
    site: tuple[str, str, int],
) -> SiteInputs:
    """The run's inputs once the channels' files are in place; writes the
    LoadData CSV of a LoadData pipeline. ``site`` is (plate, well, site)."""
    if pipeline.uses_loaddata:
        for relative in pipeline.parsed.loaddata:
            target = input_dir / relative
            if target.resolve() in {p.resolve() for p in channel_files.values()}:
                raise InputsProblem(f"LoadData's CSV {relative} would replace an image of the site")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(loaddata_csv(channel_files, site), encoding="utf-8")
        return SiteInputs(input_dir, list(channel_files.values()), dict(channel_files))
    needed = list(pipeline.parsed.image_names)
    missing = [name for name in needed if name not in channel_files]
    if missing:
        raise InputsProblem(
            f"the pipeline needs the channel(s) {', '.join(missing)}, but the site has only "
            f"{', '.join(sorted(channel_files)) or 'none'}"
        )
    expected = {name: channel_files[name] for name in needed}
    return SiteInputs(input_dir, list(expected.values()), expected)


def loaddata_csv(channel_files: Mapping[str, Path], site: tuple[str, str, int]) -> str:
    """One row: FileName_/PathName_ of every channel (absolute folders), then the site's metadata."""
    header: list[str] = []
    row: list[str] = []
    for channel, path in channel_files.items():
        header += [f"FileName_{channel}", f"PathName_{channel}"]
        row += [path.name, str(path.parent.resolve())]
    plate, well, number = site
    header += ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]
    row += [plate, well, str(number)]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerow(row)
    return out.getvalue()
