"""Reading CellProfiler pipelines (.cppipe text, format versions 3 to 6)
without CellProfiler.

What the mesh needs to know about a pipeline before it runs it on every site:

* the module names, in order;
* the image names NamesAndTypes assigns: each is a channel the plate must have;
* the objects the pipeline makes (Identify* modules and the other modules that
  name new objects);
* the tables ExportToSpreadsheet writes and their file names (prefix,
  delimiter, "export all measurement types", combined object files);
* whether it can run one site at a time: modules that work across all image
  sets of a run (CalculateStatistics, CreateBatchFiles, LoadData,
  ExportToDatabase, ...) cannot.

A .cppipe file is a header (``CellProfiler Pipeline: http://www.cellprofiler.org``,
``Version:5``, ``ModuleCount:14``, ...) then one block per module: a line
``ModuleName:[module_num:1|...|enabled:True|...]`` followed by indented
``Setting label:value`` lines. Format 3 and 4 files escape characters in
labels and values (``\\x5B`` for ``[``, ``\\x7C`` for ``|``, ``\\'`` ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

HEADER = "CellProfiler Pipeline: http://www.cellprofiler.org"
HEADER_START = "CellProfiler Pipeline:"
MAX_PIPELINE_BYTES = 4 * 1024 * 1024
SUPPORTED_VERSIONS = range(3, 7)

#: Modules that work across all image sets of a run, with what to do instead.
ACROSS_IMAGE_SETS = {
    "CalculateStatistics": "remove it; cellmesh's plate report aggregates the plate",
    "CreateBatchFiles": "remove it; cellmesh already runs each site as its own batch",
    "LoadData": "load images with NamesAndTypes; cellmesh hands each site's images to CellProfiler",
    "ExportToDatabase": "export with ExportToSpreadsheet; cellmesh gathers the tables into plate reports",
    "MakeProjection": "project the stack before registering it, or register each plane as a channel",
    "TrackObjects": "track objects outside cellmesh; each site runs alone",
}
ACROSS_REASON = "runs across all image sets; cellmesh runs one site at a time"

IMAGE = "Image"
EXPERIMENT = "Experiment"
RELATIONSHIPS = "Object relationships"
DELIMITER_COMMA = 'Comma (",")'
NOT_USED = {"", "none", "do not use"}

_MODULE_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.]*):\[(.*)\]\s*$")
_ESCAPE_RE = re.compile(r"\\(x[0-9A-Fa-f]{2}|u[0-9A-Fa-f]{4}|.)")
_METADATA_TAG_RE = re.compile(r"\\g<[^>]*>|\(\?P<[^>]*>")


class PipelineError(ValueError):
    """The content is not a pipeline cellmesh can run; the message says why and what to do."""


@dataclass(frozen=True)
class Module:
    """One module of the pipeline, with its settings as (label, value) pairs in file order."""

    name: str
    number: int
    enabled: bool
    settings: tuple[tuple[str, str], ...]

    def get(self, label: str, default: str | None = None) -> str | None:
        """The value of the first setting with this label (case and a trailing ':' ignored)."""
        wanted = _norm(label)
        for key, value in self.settings:
            if _norm(key) == wanted:
                return value
        return default

    def is_yes(self, label: str) -> bool:
        return (self.get(label) or "").strip().lower() in ("yes", "true")

    def values(self, label: str) -> list[str]:
        wanted = _norm(label)
        return [value for key, value in self.settings if _norm(key) == wanted]

    @property
    def title(self) -> str:
        return f"{self.name} (module {self.number})"


@dataclass(frozen=True)
class ExportFile:
    """One file ExportToSpreadsheet writes into the output folder."""

    path: str
    """Relative to the output folder, e.g. "Image.csv" or "MyExpt_Nuclei.csv"."""
    objects: tuple[str, ...]
    """What it holds: "Image", "Experiment", an object name, or several objects
    combined into one file."""

    @property
    def table(self) -> str:
        return self.objects[0]


@dataclass(frozen=True)
class Pipeline:
    """What the mesh knows about a parsed pipeline."""

    version: int
    modules: tuple[Module, ...]
    image_names: tuple[str, ...]
    object_names: tuple[str, ...]
    exports: tuple[ExportFile, ...]
    problems: tuple[str, ...] = field(default=())
    """Why the pipeline cannot run one site at a time (empty if it can)."""

    @property
    def module_names(self) -> list[str]:
        return [m.name for m in self.modules]

    @property
    def tables(self) -> list[str]:
        """The per-image and per-object tables exported, e.g. ["Image", "Nuclei"]
        (the Experiment and relationship files are not per-object tables)."""
        return _unique(f.table for f in self.exports if f.table not in (EXPERIMENT, RELATIONSHIPS))

    @property
    def table_files(self) -> list[str]:
        """The files of those tables, as they appear in the output folder."""
        return _unique(f.path for f in self.exports if f.table not in (EXPERIMENT, RELATIONSHIPS))


def parse(content: bytes | str) -> Pipeline:
    """Reads a .cppipe; raises PipelineError if it is not one."""
    if isinstance(content, bytes):
        if len(content) > MAX_PIPELINE_BYTES:
            raise PipelineError(
                f"the pipeline is {len(content)} bytes; at most {MAX_PIPELINE_BYTES} (4 MiB) are accepted"
            )
        text = _decode(content)
    else:
        text = content
    lines = text.splitlines()
    if not lines or not lines[0].strip().startswith(HEADER_START):
        raise PipelineError(_not_a_pipeline(text))
    header: dict[str, str] = {}
    index = 1
    while index < len(lines) and lines[index].strip() and not _MODULE_RE.match(lines[index]):
        key, _, value = lines[index].partition(":")
        header[key.strip()] = value.strip()
        index += 1
    try:
        version = int(header.get("Version", ""))
    except ValueError:
        raise PipelineError(
            "not a CellProfiler pipeline: the header has no 'Version:' line after the first line"
        ) from None
    if version not in SUPPORTED_VERSIONS:
        raise PipelineError(
            f"pipeline format Version:{version} is not supported (3 to 6 are): "
            "open it in CellProfiler 4 or later and save it again"
        )
    escaped = version < 5
    modules: list[Module] = []
    name = ""
    attributes = ""
    settings: list[tuple[str, str]] = []

    def close() -> None:
        if name:
            modules.append(_module(name, attributes, settings, len(modules) + 1))

    for line_number, line in enumerate(lines[index:], start=index + 1):
        if not line.strip():
            continue
        match = _MODULE_RE.match(line)
        if match and not line[0].isspace():
            close()
            name, attributes = match.group(1), match.group(2)
            settings = []
            continue
        if not name or not line[0].isspace():
            raise PipelineError(
                f"line {line_number} is neither a module nor one of its settings: {line[:80]!r}; "
                "the file is damaged (save the pipeline again from CellProfiler)"
            )
        label, _, value = line.strip().partition(":")
        if escaped:
            label, value = _unescape(label), _unescape(value)
        settings.append((label, value))
    close()
    count = header.get("ModuleCount")
    if count is not None and count.isdigit() and int(count) != len(modules):
        raise PipelineError(
            f"the header says ModuleCount:{count} but {len(modules)} modules follow: "
            "the file is truncated or damaged"
        )
    if not modules:
        raise PipelineError("the pipeline has no modules")
    return _analyse(version, tuple(modules))


def check_runs_per_site(pipeline: Pipeline) -> None:
    """Raises PipelineError naming every module that stops the pipeline from
    running one site at a time, and what to do about it."""
    if pipeline.problems:
        raise PipelineError("; ".join(pipeline.problems))


def parse_for_sites(content: bytes | str) -> Pipeline:
    """`parse`, then `check_runs_per_site`."""
    pipeline = parse(content)
    check_runs_per_site(pipeline)
    return pipeline


# -- reading -------------------------------------------------------------------


def _decode(content: bytes) -> str:
    if b"\x00" in content[:4096]:
        if content.startswith(b"\x89HDF"):
            raise PipelineError(
                "not a CellProfiler pipeline: this is a project file (.cpproj); "
                "export the pipeline from CellProfiler (File > Export > Pipeline) and send the .cppipe"
            )
        raise PipelineError(_not_a_pipeline(""))
    if content.startswith(b"\xef\xbb\xbf"):
        content = content[3:]
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError:
        return content.decode("latin-1")


def _not_a_pipeline(text: str) -> str:
    if text.lstrip().startswith("{"):
        return (
            f"not a CellProfiler pipeline: first line must be '{HEADER}'; "
            "this looks like a JSON pipeline: save it from CellProfiler as a .cppipe"
        )
    if not text.strip():
        return f"not a CellProfiler pipeline: the content is empty; first line must be '{HEADER}'"
    return f"not a CellProfiler pipeline: first line must be '{HEADER}'"


def _unescape(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        code = match.group(1)
        if code[0] in "xu" and len(code) > 1:
            return chr(int(code[1:], 16))
        return code

    return _ESCAPE_RE.sub(one, text)


def _module(name: str, attributes: str, settings: list[tuple[str, str]], position: int) -> Module:
    number_match = re.search(r"module_num:(\d+)", attributes)
    enabled_match = re.search(r"enabled:(True|False)", attributes)
    return Module(
        name=name,
        number=int(number_match.group(1)) if number_match else position,
        enabled=enabled_match is None or enabled_match.group(1) == "True",
        settings=tuple(settings),
    )


def _norm(label: str) -> str:
    return label.strip().rstrip(":").strip().lower()


def _unique(items: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for item in items:
        seen.setdefault(item, None)
    return list(seen)


def _used(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in NOT_USED


# -- analysis ------------------------------------------------------------------


def _analyse(version: int, modules: tuple[Module, ...]) -> Pipeline:
    problems: list[str] = []
    image_names: list[str] = []
    object_names: list[str] = []
    exports: list[ExportFile] = []
    enabled = [m for m in modules if m.enabled]
    for module in enabled:
        if module.name in ACROSS_IMAGE_SETS:
            problems.append(f"{module.title} {ACROSS_REASON}: {ACROSS_IMAGE_SETS[module.name]}")
        elif module.name == "CorrectIlluminationCalculate":
            how = module.get("Calculate function for each image individually, or based on all images?") or ""
            if how.strip().lower().startswith("all"):
                problems.append(
                    f"{module.title} {ACROSS_REASON} (it calculates the illumination function from "
                    f"'{how}'): calculate it once in another pipeline and register it as a channel, "
                    "or choose 'Each'"
                )
        if module.name == "NamesAndTypes":
            images, objects = _names_and_types(module)
            image_names += images
            object_names += objects
        elif module.name in ("LoadImages", "LoadSingleImage"):
            image_names += [
                v
                for label in ("Name this loaded image", "Name the image that will be loaded")
                for v in module.values(label)
                if _used(v)
            ]
        else:
            object_names += _objects_made(module)
    objects = _unique(object_names)
    for module in enabled:
        if module.name == "ExportToSpreadsheet":
            files, why = _spreadsheet_files(module, objects)
            exports += files
            problems += why
    if not _unique(image_names):
        problems.append(
            "the pipeline assigns no image names: add NamesAndTypes so that each channel gets a name"
        )
    if not any(m.name == "ExportToSpreadsheet" for m in enabled):
        problems.append(
            "the pipeline has no enabled ExportToSpreadsheet module: cellmesh collects each site's "
            "measurements from the tables it writes; add one"
        )
    return Pipeline(
        version=version,
        modules=modules,
        image_names=tuple(_unique(image_names)),
        object_names=tuple(objects),
        exports=tuple(exports),
        problems=tuple(problems),
    )


def _names_and_types(module: Module) -> tuple[list[str], list[str]]:
    """(image names, object names) NamesAndTypes assigns."""
    method = (module.get("Assign a name to") or "").strip().lower()
    if method.startswith("all"):
        name = module.get("Name to assign these images") or ""
        return ([name] if _used(name) else []), []
    images: list[str] = []
    objects: list[str] = []
    block: dict[str, str] | None = None
    blocks: list[dict[str, str]] = []
    for label, value in module.settings:
        key = _norm(label)
        if key in ("select the rule criteria", "single image location"):
            block = {}
            blocks.append(block)
        if block is not None:
            block.setdefault(key, value)
    for block in blocks:
        kind = block.get("select the image type", "").strip().lower()
        if kind == "objects":
            name = block.get("name to assign these objects", "")
            if _used(name):
                objects.append(name)
                images.append(name)
            continue
        name = block.get("name to assign these images") or block.get("name to assign this image") or ""
        if _used(name):
            images.append(name)
    return images, objects


def _objects_made(module: Module) -> list[str]:
    """The names of the new objects a module makes."""
    made: list[str] = []
    for label, value in module.settings:
        key = _norm(label)
        if not key.startswith("name the") or "object" not in key or "outline" in key:
            continue
        if not _used(value):
            continue
        if key == "name the new primary objects" and not (
            module.is_yes("Discard secondary objects touching the border of the image?")
            and module.is_yes("Discard the associated primary objects?")
        ):
            continue
        if module.name == "RelateObjects" and not module.is_yes(
            "Do you want to save the children with parents as a new object set?"
        ):
            continue
        made.append(value.strip())
    return made


def _output_folder(module: Module) -> tuple[str, str | None]:
    """(subfolder of the output folder, problem) for ExportToSpreadsheet's location."""
    location = module.get("Output file location") or "Default Output Folder|"
    choice, _, custom = location.partition("|")
    choice_l = choice.strip().lower()
    custom = custom.strip()
    if _METADATA_TAG_RE.search(custom):
        return "", (
            f"{module.title} writes into a folder named with metadata tags ({custom!r}): "
            "cellmesh keeps each site's tables in its own folder; choose the Default Output Folder"
        )
    if choice_l == "default output folder":
        return "", None
    if choice_l == "default output folder sub-folder":
        sub = custom.strip("/")
        return ("" if sub in ("", ".") else sub + "/"), None
    return "", (
        f"{module.title} writes its tables to '{choice.strip()}': cellmesh collects them from the "
        "Default Output Folder; choose it as the output file location"
    )


def _spreadsheet_files(module: Module, objects: list[str]) -> tuple[list[ExportFile], list[str]]:
    problems: list[str] = []
    folder, problem = _output_folder(module)
    if problem:
        problems.append(problem)
    delimiter = (module.get("Select the column delimiter") or DELIMITER_COMMA).strip()
    extension = "csv" if delimiter == DELIMITER_COMMA else "txt"
    prefix = ""
    if module.is_yes("Add a prefix to file names?"):
        prefix = module.get("Filename prefix") or ""

    def path(name: str) -> str:
        if _METADATA_TAG_RE.search(name):
            problems.append(
                f"{module.title} names a file with metadata tags ({name!r}): cellmesh keeps each "
                "site's tables in its own folder; use a plain file name"
            )
        return f"{folder}{prefix}{name}"

    if module.get("Export all measurement types?") is None or module.is_yes("Export all measurement types?"):
        names = [EXPERIMENT, IMAGE, *objects]
        return [ExportFile(path(f"{n}.{extension}"), (n,)) for n in names], problems

    groups: list[dict[str, str]] = []
    for label, value in module.settings:
        key = _norm(label)
        if key == "data to export":
            groups.append({"name": value.strip()})
        elif groups and key not in groups[-1]:
            groups[-1][key] = value
    files: list[ExportFile] = []
    current: list[str] = []
    current_group: dict[str, str] | None = None
    previous_is_object = False

    def flush() -> None:
        if current and current_group is not None:
            if current_group.get("use the object name for the file name?", "").strip().lower() == "no":
                file_name = current_group.get("file name", "").strip() or "DATA.csv"
            else:
                file_name = f"{current[0]}.{extension}"
            files.append(ExportFile(path(file_name), tuple(current)))

    for group in groups:
        name = group["name"]
        if not _used(name):
            continue
        is_object = name not in (IMAGE, EXPERIMENT, RELATIONSHIPS)
        combine = group.get("combine these object measurements with those of the previous object?", "")
        if is_object and previous_is_object and combine.strip().lower() == "yes":
            current.append(name)
        else:
            flush()
            current, current_group = [name], group
        previous_is_object = is_object
    flush()
    return files, problems
