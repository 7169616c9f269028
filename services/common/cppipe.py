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
  sets of a run (CalculateStatistics, CreateBatchFiles, ExportToDatabase, ...)
  cannot;
* how its images come in: NamesAndTypes (whose file-name rules `bind_channels`
  replaces, so that the catalog's channels decide which file is which image),
  or LoadData (`Pipeline.loaddata`: where it reads the CSV the worker writes
  for each site).
* whether it may run on every worker at all (`check_safe`): stock CellProfiler
  4.2 modules only unless an operator enables others, files written only
  inside the run's Default Output Folder and read only from the run's folders,
  and nothing CellProfiler would evaluate as Python while loading it.

A .cppipe file is a header (``CellProfiler Pipeline: http://www.cellprofiler.org``,
``Version:5``, ``ModuleCount:14``, ...) then one block per module: a line
``ModuleName:[module_num:1|...|enabled:True|...]`` followed by indented
``Setting label:value`` lines. Format 3 and 4 files escape characters in
labels and values (``\\x5B`` for ``[``, ``\\x7C`` for ``|``, ``\\'`` ...).
"""

from __future__ import annotations

import ast
import posixpath
import re
import sys
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, replace

HEADER = "CellProfiler Pipeline: http://www.cellprofiler.org"
HEADER_START = "CellProfiler Pipeline:"
MAX_PIPELINE_BYTES = 4 * 1024 * 1024
SUPPORTED_VERSIONS = range(3, 7)

#: Modules that work across all image sets of a run and that cellmesh cannot
#: run, with what to do instead.
ACROSS_IMAGE_SETS = {
    "CreateBatchFiles": "remove it; cellmesh already runs each site as its own batch",
    "ExportToDatabase": "export with ExportToSpreadsheet; cellmesh gathers the tables into plate reports",
}
#: Modules that work across all image sets of a run: a pipeline with one of
#: them runs once per plate (a plate-scope stage), over every site.
PLATE_MODULES = {
    "CalculateStatistics": "computes statistics over all image sets",
    "MakeProjection": "projects the images of all image sets",
    "TrackObjects": "tracks objects across image sets",
}
SCOPE_SITE = "site"
SCOPE_PLATE = "plate"
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
    """Why cellmesh cannot run the pipeline (empty if it can)."""
    plate_reasons: tuple[str, ...] = field(default=())
    """Why the pipeline must run over a whole plate at once (its modules that
    work across image sets); empty if it can run one site at a time."""
    source: str = field(default="", repr=False, compare=False)
    """The text as read, for `check_safe` (which reads it the way CellProfiler does)."""
    utf8: bool = True
    """Whether the bytes were UTF-8 (CellProfiler reads other files with escapes decoded)."""
    loaddata: tuple[str, ...] = field(default=())
    """Where the pipeline's LoadData module reads its CSV, relative to the
    Default Input Folder (e.g. "load_data.csv"); empty for NamesAndTypes
    pipelines. Its image names are the CSV's columns, so the plate's channels
    give them, not the pipeline."""

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
        text, utf8 = _decode(content)
    else:
        text, utf8 = content, True
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
    return replace(_analyse(version, tuple(modules)), source=text, utf8=utf8)


def decide_scope(pipeline: Pipeline, asked: str = "") -> tuple[str, list[str]]:
    """(scope, why): SCOPE_PLATE when the pipeline has modules that work
    across image sets or the user asks for it, SCOPE_SITE otherwise. Asking
    for SCOPE_SITE for a pipeline that needs the plate raises PipelineError."""
    reasons = list(pipeline.plate_reasons)
    if asked == SCOPE_SITE and reasons:
        raise PipelineError(
            "the pipeline cannot run one site at a time: "
            + "; ".join(reasons)
            + "; register it with scope PLATE (or leave the scope unset)"
        )
    if reasons:
        return SCOPE_PLATE, reasons
    if asked == SCOPE_PLATE:
        return SCOPE_PLATE, ["asked for at registration"]
    return SCOPE_SITE, []


def grouping_keys(pipeline: Pipeline) -> list[str]:
    """The metadata keys the pipeline groups its image sets by, in order
    (e.g. ["Well"] for Metadata_Well): the enabled Groups module's "Metadata
    category" settings when "Do you want to group your images?" is Yes, or
    LoadData's "Select metadata tags for grouping" when "Group images by
    metadata?" is Yes. Empty when it does not group (one group: the whole
    run)."""
    keys: list[str] = []
    for module in pipeline.modules:
        if not module.enabled:
            continue
        if module.name == "Groups" and module.is_yes("Do you want to group your images?"):
            keys += [v.strip() for v in module.values("Metadata category")]
        elif module.name == "LoadData" and module.is_yes("Group images by metadata?"):
            for value in module.values("Select metadata tags for grouping"):
                keys += [v.strip() for v in value.split(",")]
    out: list[str] = []
    for key in keys:
        key = key.removeprefix("Metadata_")
        if key and key != "None" and key not in out:
            out.append(key)
    return out


#: NamesAndTypes' image set matching method that `bind_channels` chooses.
MATCH_BY_ORDER = "Order"


def channel_rule(channel: str, per_site: bool = False) -> str:
    """The NamesAndTypes rule that selects the file of ``channel``: the worker
    puts it, and nothing else, in a sub-folder of the Default Input Folder
    named after the channel (CellProfiler's "directory" is the file's folder).
    A run over several sites (a plate stage) has one numbered sub-folder per
    site inside it, so the files of one site share a number and CellProfiler,
    ordering each name's files by path, pairs them site by site."""
    if per_site:
        return f'and (directory does containregexp "/{channel}/[0-9]{{5}}$")'
    return f'and (directory does endwith "/{channel}")'


def bind_channels(pipeline: Pipeline, channels: Collection[str] | None = None, per_site: bool = False) -> str:
    """The pipeline's text with every enabled NamesAndTypes rule of a name in
    ``channels`` (default: every rule) replaced by `channel_rule` of the name
    it assigns, and image sets matched by order. Rules of other names (an
    illumination function a plate stage made, an attached file) are kept: they
    pick their file from the Default Input Folder as the pipeline says.

    So CellProfiler takes each image name from the file the catalog registered
    under that channel, never from the microscope's file name; everything else
    NamesAndTypes says about each image (its type, intensity range, maximum
    intensity, 3D) is kept. Each site then forms one image set: one file per
    rule. Only the values of those settings change, line by line, so the text
    is otherwise the one registered (and checked by `check_safe`)."""
    lines = pipeline.source.splitlines(keepends=True)
    in_module = False
    settings: list[tuple[int, str, str]] = []  # (line index, label, value) of one NamesAndTypes
    edits: dict[int, str] = {}

    def bind_module() -> None:
        blocks: list[dict[str, str]] = []
        rule_lines: list[int] = []
        for index, label, value in settings:
            key = _norm(label)
            if key == "image set matching method":
                edits[index] = _with_value(lines[index], MATCH_BY_ORDER)
            if key in ("select the rule criteria", "single image location"):
                blocks.append({})
                rule_lines.append(index if key == "select the rule criteria" else -1)
            if blocks:
                blocks[-1].setdefault(key, value)
        for block, index in zip(blocks, rule_lines, strict=True):
            if index < 0:
                continue
            kind = block.get("select the image type", "").strip().lower()
            if kind == "objects":
                name = block.get("name to assign these objects", "")
            else:
                name = block.get("name to assign these images", "")
            if channels is None or name.strip() in channels:
                edits[index] = _with_value(lines[index], channel_rule(name.strip(), per_site))

    escaped = pipeline.version < 5
    for index, line in enumerate(lines):
        match = _MODULE_RE.match(line.rstrip("\r\n"))
        if match and not line[0].isspace():
            if in_module:
                bind_module()
            enabled = re.search(r"enabled:(True|False)", match.group(2))
            in_module = match.group(1) == "NamesAndTypes" and (enabled is None or enabled.group(1) == "True")
            settings = []
        elif in_module and line.strip() and line[0].isspace():
            label, _, value = line.strip().partition(":")
            if escaped:
                label, value = _unescape(label), _unescape(value)
            settings.append((index, label, value))
    if in_module:
        bind_module()
    return "".join(edits.get(i, line) for i, line in enumerate(lines))


def _with_value(line: str, value: str) -> str:
    """A setting line with its value replaced, its indentation, label and line end kept."""
    body = line.rstrip("\r\n")
    end = line[len(body) :]
    indent = body[: len(body) - len(body.lstrip())]
    label = body.strip().partition(":")[0]
    return f"{indent}{label}:{value}{end}"


def check_runs_per_site(pipeline: Pipeline) -> None:
    """Raises PipelineError naming every module that stops the pipeline from
    running one site at a time, and what to do about it."""
    if pipeline.problems:
        raise PipelineError("; ".join(pipeline.problems))


# -- reading -------------------------------------------------------------------


def _decode(content: bytes) -> tuple[str, bool]:
    """The text, and whether it was UTF-8 (else it is read as Latin-1)."""
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
        return content.decode("utf-8"), True
    except UnicodeDecodeError:
        return content.decode("latin-1"), False


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
    plate_reasons: list[str] = []
    image_names: list[str] = []
    object_names: list[str] = []
    exports: list[ExportFile] = []
    loaddata: list[str] = []
    enabled = [m for m in modules if m.enabled]
    for module in enabled:
        if module.name in ACROSS_IMAGE_SETS:
            problems.append(f"{module.title} {ACROSS_REASON}: {ACROSS_IMAGE_SETS[module.name]}")
        elif module.name in PLATE_MODULES:
            plate_reasons.append(f"{module.title} {PLATE_MODULES[module.name]}")
        elif module.name == "CorrectIlluminationCalculate":
            how = module.get("Calculate function for each image individually, or based on all images?") or ""
            if how.strip().lower().startswith("all"):
                plate_reasons.append(
                    f"{module.title} calculates its illumination function from all images ('{how}')"
                )
        if module.name == "NamesAndTypes":
            images, objects = _names_and_types(module)
            image_names += images
            object_names += objects
            problems += _single_image_problems(module)
        elif module.name == "LoadData":
            csv_path, why = _loaddata_csv(module)
            loaddata += [csv_path] if csv_path else []
            problems += why
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
    loaders = [m for m in enabled if m.name in ("LoadData", "NamesAndTypes")]
    if len(loaders) > 1:
        problems.append(
            f"the pipeline loads images with {' and '.join(m.title for m in loaders)}: cellmesh gives "
            "each site's images to one input module; keep one NamesAndTypes or one LoadData"
        )
    if not _unique(image_names) and not any(m.name == "LoadData" for m in enabled):
        problems.append(
            "the pipeline assigns no image names: add NamesAndTypes so that each channel gets a name"
        )
    if not any(m.name in WRITES_FILES for m in enabled):
        problems.append(
            "the pipeline writes no files (no enabled ExportToSpreadsheet, SaveImages or other module "
            "that writes into the output folder): cellmesh keeps what a site's run writes; add one"
        )
    return Pipeline(
        version=version,
        modules=modules,
        image_names=tuple(_unique(image_names)),
        object_names=tuple(objects),
        exports=tuple(exports),
        problems=tuple(problems),
        plate_reasons=tuple(plate_reasons),
        loaddata=tuple(loaddata),
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


def _single_image_problems(module: Module) -> list[str]:
    """NamesAndTypes' "single images" each name one fixed file of the machine
    the pipeline was made on; cellmesh gives CellProfiler the catalog's files."""
    if (module.get("Assign a name to") or "").strip().lower().startswith("all"):
        return []
    count = (module.get("Single images count") or "0").strip()
    if count in ("", "0"):
        return []
    return [
        f"{module.title} assigns {count} single image(s), each a fixed file: register that file as a "
        "channel of the plate and assign it with a rule instead"
    ]


def _loaddata_csv(module: Module) -> tuple[str, list[str]]:
    """(where LoadData reads its CSV, relative to the Default Input Folder, what is wrong).

    The worker writes each site's CSV there (cellprofiler_core 4.2's
    LoadData.csv_path: the folder setting joined with "Name of the file")."""
    title = module.title
    location = module.get("Input data file location") or f"{IN_FOLDER}|"
    name = (module.get("Name of the file") or "").strip()
    problems: list[str] = []
    parsed = _location(location)
    choice, sub = parsed if parsed is not None else (location.partition("|")[0], "")
    if choice not in (IN_FOLDER, IN_SUBFOLDER):
        problems.append(
            f"{title} setting 'Input data file location' is {choice.strip()!r} ({location!r}): cellmesh "
            "writes each site's CSV into the run's Default Input Folder; choose 'Default Input Folder' "
            "or a 'Default Input Folder sub-folder'"
        )
    elif choice == IN_SUBFOLDER and (why := _path_problem(sub) or _tag_problem(sub)):
        problems.append(
            f"{title} setting 'Input data file location' names a sub-folder that {why} ({location!r}): "
            "the CSV must stay inside the Default Input Folder"
        )
    if not name:
        problems.append(f"{title} setting 'Name of the file' is empty: name the CSV, e.g. load_data.csv")
    elif why := _path_problem(name) or _tag_problem(name):
        problems.append(
            f"{title} setting 'Name of the file' {why} ({name!r}): the CSV must stay inside the "
            "Default Input Folder"
        )
    if module.is_yes("Process just a range of rows?"):
        first = (module.get("Rows to process") or "1").split(",")[0].strip()
        if first not in ("", "1"):
            problems.append(
                f"{title} processes only rows from {first} on ('Process just a range of rows?'): cellmesh "
                "writes one row per site; answer No"
            )
    if problems:
        return "", problems
    folder = sub.strip() if choice == IN_SUBFOLDER else ""
    return posixpath.normpath(posixpath.join(folder.replace("\\", "/"), name.replace("\\", "/"))), []


def _tag_problem(path: str) -> str | None:
    return "holds metadata tags" if _TAG_RE.search(path) else None


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


# -- what a pipeline may do ------------------------------------------------------
#
# A registered pipeline is code that every worker runs, so registration refuses
# what would let it act outside its site's run: modules that run programs or
# load code (unless an operator enables them for the pipeline), files written
# outside the run's Default Output Folder, files read from outside the run's
# folders or from the network, and anything CellProfiler would evaluate as
# Python while it loads the pipeline. The checks read the file the way
# CellProfiler 4.2's own text reader does (``Pipeline.parse_pipeline`` and
# ``setup_module`` in cellprofiler_core/pipeline/_pipeline.py): it strips each
# line, ends a module at a blank line, ignores setting labels (settings are
# taken by position), decodes ``\xNN`` escapes in every version, and eval()s
# every module attribute inside ``[...]``.

#: The modules that ship with CellProfiler 4.2.8: the ``builtin_modules`` tables of
#: cellprofiler_core/constants/modules/__init__.py (the first six) and
#: cellprofiler/modules/__init__.py (the other 88), read from the installed
#: cellprofiler 4.2.8.1 and cellprofiler-core 4.2.8.1 packages.
STOCK_MODULES = frozenset(
    {
        # cellprofiler_core.modules
        "Align", "Groups", "Images", "LoadData", "Metadata", "NamesAndTypes",
        # cellprofiler.modules
        "CalculateMath", "CalculateStatistics", "ClassifyObjects", "Closing", "ColorToGray",
        "CombineObjects", "ConvertImageToObjects", "ConvertObjectsToImage",
        "CorrectIlluminationApply", "CorrectIlluminationCalculate", "CreateBatchFiles", "Crop",
        "DefineGrid", "DilateImage", "DilateObjects", "DisplayDataOnImage", "DisplayDensityPlot",
        "DisplayHistogram", "DisplayPlatemap", "DisplayScatterPlot", "EditObjectsManually",
        "EnhanceEdges", "EnhanceOrSuppressFeatures", "ErodeImage", "ErodeObjects",
        "ExpandOrShrinkObjects", "ExportToDatabase", "ExportToSpreadsheet", "FillObjects",
        "FilterObjects", "FindMaxima", "FlagImage", "FlipAndRotate", "GaussianFilter",
        "GrayToColor", "IdentifyDeadWorms", "IdentifyObjectsInGrid", "IdentifyObjectsManually",
        "IdentifyPrimaryObjects", "IdentifySecondaryObjects", "IdentifyTertiaryObjects",
        "ImageMath", "InvertForPrinting", "LabelImages", "MakeProjection", "MaskImage",
        "MaskObjects", "MatchTemplate", "MeasureColocalization", "MeasureGranularity",
        "MeasureImageAreaOccupied", "MeasureImageIntensity", "MeasureImageOverlap",
        "MeasureImageQuality", "MeasureImageSkeleton", "MeasureObjectIntensity",
        "MeasureObjectIntensityDistribution", "MeasureObjectNeighbors", "MeasureObjectOverlap",
        "MeasureObjectSizeShape", "MeasureObjectSkeleton", "MeasureTexture", "MedialAxis",
        "MedianFilter", "Morph", "MorphologicalSkeleton", "Opening", "OverlayObjects",
        "OverlayOutlines", "ReduceNoise", "RelateObjects", "RemoveHoles", "RescaleIntensity",
        "Resize", "ResizeObjects", "RunImageJMacro", "SaveCroppedObjects", "SaveImages",
        "ShrinkToObjectCenters", "Smooth", "SplitOrMergeObjects", "StraightenWorms", "Threshold",
        "Tile", "TrackObjects", "UnmixColors", "UntangleWorms", "Watershed",
    }
)  # fmt: skip

#: Old names CellProfiler 4.2 still loads, as the module they became
#: (``renamed_modules`` in cellprofiler_core/constants/modules/__init__.py).
RENAMED_MODULES = {
    "ApplyThreshold": "Threshold",
    "CalculateImageOverlap": "MeasureImageOverlap",
    "CropObjects": "SaveCroppedObjects",
    "Dilation": "DilateImage",
    "MeasureNeurons": "MeasureObjectSkeleton",
    "MeasureCorrelation": "MeasureColocalization",
    "NoiseReduction": "ReduceNoise",
    "ReassignObjectNumbers": "SplitOrMergeObjects",
    "SplitIntoContiguousObjects": "SplitOrMergeObjects",
    "Erosion": "ErodeImage",
}

#: Modules CellProfiler 4.2 no longer has (``replaced_modules`` there), with what replaced them.
REPLACED_MODULES = {
    "LoadImageDirectory": "LoadData",
    "GroupMovieFrames": "LoadData",
    "IdentifyPrimLoG": "IdentifyPrimaryObjects",
    "FileNameMetadata": "Metadata",
    "LoadSingleImage": "NamesAndTypes",
    "LoadImages": "NamesAndTypes",
}

#: Modules that run other programs or load code, and what they do. Each one needs
#: an operator's say-so for the pipeline (``allow_modules``). RunImageJMacro is
#: stock; the others are CellProfiler-plugins modules, named here to say what they do.
RUNS_CODE = {
    "RunImageJMacro": "runs external programs (ImageJ/Fiji and a macro file)",
    "RunImageJScript": "runs external programs (ImageJ scripts; a plugin)",
    "RunCellpose": "loads and runs a Cellpose model (a plugin)",
    "RunStarDist": "loads and runs a StarDist model (a plugin)",
    "RunOmnipose": "loads and runs an Omnipose model (a plugin)",
    "Predict": "runs the ilastik program (a plugin)",
}

#: Stock modules that in one mode load a classifier file with joblib, a Python
#: pickle that runs code when loaded: (the label of the mode setting, that mode).
LOADS_PICKLE = {
    "FilterObjects": ("Select the filtering mode", "Classifiers"),
    "FlagImage": ("Flag is based on", "Classifier"),
    "ClassifyObjects": ("Make classification decision based on", "Classifier Model"),
}

OPERATOR_MUST_ENABLE = "an operator must enable it for this pipeline"

# CellProfiler's folder choices (cellprofiler_core/preferences: *_FOLDER_NAME,
# FOLDER_CHOICE_TRANSLATIONS; SaveImages adds "Same folder as image").
IN_FOLDER = "Default Input Folder"
IN_SUBFOLDER = "Default Input Folder sub-folder"
OUT_FOLDER = "Default Output Folder"
OUT_SUBFOLDER = "Default Output Folder sub-folder"
ELSEWHERE = "Elsewhere..."
URL_FOLDER = "URL"
NO_FOLDER = "None"
WITH_IMAGE = "Same folder as image"
_FOLDER_CHOICES = {
    IN_FOLDER: IN_FOLDER,
    OUT_FOLDER: OUT_FOLDER,
    "Absolute path elsewhere": ELSEWHERE,
    "Default input directory sub-folder": IN_SUBFOLDER,
    IN_SUBFOLDER: IN_SUBFOLDER,
    "Default output directory sub-folder": OUT_SUBFOLDER,
    OUT_SUBFOLDER: OUT_SUBFOLDER,
    URL_FOLDER: URL_FOLDER,
    NO_FOLDER: NO_FOLDER,
    ELSEWHERE: ELSEWHERE,
    WITH_IMAGE: WITH_IMAGE,
}

#: Stock modules that write files, with the label of the folder they write to.
#: CellProfiler takes settings by position, not by label, so every folder
#: setting of these modules is taken as where they write, except SaveImages'
#: second ("Base image folder"), which only says where mirrored sub-folders start.
WRITES_FILES = {
    "ExportToSpreadsheet": "Output file location",
    "SaveImages": "Output file location",
    "SaveCroppedObjects": "Directory",
    "MeasureObjectSkeleton": "File output directory",
    "ExportToDatabase": "Output file location",
    "CalculateStatistics": "Output file location",
}
#: Stock modules that read files (rules, classifiers, metadata tables, worm
#: training sets, ImageJ) from folder settings with these labels: reading from
#: the Default Input or Output Folder is fine, from anywhere else it is not.
READS_FILES = {
    "Metadata": ("Metadata file location",),
    "FilterObjects": ("Select the location of the rules or classifier file",),
    "FlagImage": ("Rules file location",),
    "ClassifyObjects": ("Select the location of the classifier model file",),
    "LoadData": ("Input data file location", "Base image location"),
    "StraightenWorms": ("Training set file location",),
    "UntangleWorms": ("Training set file location",),
    "RunImageJMacro": ("Executable directory", "Macro directory"),
}
#: SaveImages settings that become part of a file name.
SAVEIMAGES_FILE_NAMES = ("Enter single file name", "Enter file prefix", "Text to append to the image name")
#: Where SaveImages' settings are, by revision (CellProfiler reads them by
#: position, whatever their labels say; cellprofiler/modules/saveimages.py
#: ``settings()`` and ``upgrade_settings``): (output folder, "Create subfolders
#: in the output folder?", "Base image folder", the settings that become part
#: of file names). A SaveImages of another revision has every folder setting
#: checked as an output folder.
SAVEIMAGES_POSITIONS = {11: (11, 19, 20, (6, 9)), **{rev: (9, 14, 15, (4, 7)) for rev in range(12, 17)}}
#: Joiner settings, which CellProfiler reads with eval() (cellprofiler_core/setting/_joiner.py).
JOINERS = {"Metadata": ("Match file and image metadata",), "NamesAndTypes": ("Match metadata",)}

_MODULE_ATTRIBUTES = frozenset(
    {"module_num", "svn_version", "variable_revision_number", "show_window", "notes", "batch_state",
     "enabled", "wants_pause"}
)  # fmt: skip
_BATCH_STATE_RE = re.compile(r"array\(\[[0-9,\s]*\],\s*dtype=uint8\)")
_NOTES_RE = re.compile(r"(?P<note>\|notes:\[.*?\]\|)")
_LINE_BREAK_RE = re.compile(r"\r\n|\r|\n")  # what a text-mode file splits on
_TAG_RE = re.compile(r"\\g<[^>]*>|\(\?<[^>]*>\)|\(\?P<[^>]*>")  # metadata tags, as apply_metadata finds them
_ESCAPING_RE = re.compile(r"(^|/)\.\.(/|$)")
# Python a Joiner's eval() (no builtins) may meet in a plain value; anything else is code.
_PLAIN_NODES = (
    ast.Expression, ast.Constant, ast.Name, ast.Load, ast.Tuple, ast.List, ast.Dict, ast.Set,
    ast.UnaryOp, ast.UAdd, ast.USub, ast.Not, ast.Invert, ast.BinOp, ast.Add, ast.Sub, ast.Div,
    ast.FloorDiv, ast.BitOr, ast.BitAnd, ast.BitXor, ast.Compare, ast.Eq, ast.NotEq, ast.Lt,
    ast.LtE, ast.Gt, ast.GtE, ast.BoolOp, ast.And, ast.Or, ast.Attribute,
)  # fmt: skip


def check_safe(pipeline: Pipeline, allow_modules: Collection[str] = ()) -> None:
    """Raises PipelineError naming every module (number and name) and setting
    that would let the pipeline act outside its site's run.

    ``allow_modules`` names the modules an operator enabled for this pipeline:
    modules that run programs or load code (RunImageJMacro, plugins such as
    RunCellpose, FilterObjects with a classifier) and modules that are not
    stock CellProfiler 4.2 modules. It enables the module, not its settings:
    the locations it writes to and reads from are checked all the same.
    """
    problems = safety_problems(pipeline, allow_modules)
    if problems:
        raise PipelineError("; ".join(problems))


def safety_problems(pipeline: Pipeline, allow_modules: Collection[str] = ()) -> list[str]:
    """What `check_safe` refuses, one sentence per problem (empty if nothing)."""
    problems: list[str] = []
    if not pipeline.utf8:
        problems.append(
            "the pipeline is not UTF-8 text: CellProfiler 4.2 would read it with escape sequences "
            "decoded, differently from what was checked; save it again from CellProfiler 4.2"
        )
    read, image_plane_details, stopped = _cellprofiler_reads(pipeline.source)
    if image_plane_details:
        problems.append(
            "the pipeline carries its own list of image files (HasImagePlaneDetails:True): cellmesh "
            "hands each site's images to CellProfiler; export the pipeline without its file list"
        )
    if stopped:
        problems.append(f"CellProfiler 4.2 would stop reading the pipeline: {stopped}")
    ours = [m.name for m in pipeline.modules]
    theirs = [r.name for r in read]
    if not stopped and theirs != ours:
        problems.append(
            "CellProfiler 4.2 would read other modules from this file than cellmesh does "
            f"(it reads {', '.join(theirs[:20])}; cellmesh reads {', '.join(ours[:20])}): "
            "save the pipeline again from CellProfiler 4.2"
        )
        return problems
    allowed = set(allow_modules)
    for position, item in enumerate(read):
        number = pipeline.modules[position].number if position < len(pipeline.modules) else position + 1
        name = _canonical(item.name)
        module = Module(name=item.name, number=number, enabled=True, settings=item.settings)
        attributes, wrong = _attributes(module.title, item.attributes)
        problems += wrong
        problems += _module_problems(module, name, allowed)
        problems += _location_problems(module, name, attributes.get("variable_revision_number"))
        problems += _code_problems(module, name)
    return problems


def parse_for_sites(
    content: bytes | str, *, allow_modules: Collection[str] = (), input_files: Collection[str] = ()
) -> Pipeline:
    """`parse`, then `check_safe`, `check_runs_per_site` and `input_file_problems`
    (``input_files``: the names of the files every run gets besides its channel
    images, i.e. the attachments), refusing with every problem in one error.
    The pipeline's ``image_names`` are then the channels a plate must have: the
    names NamesAndTypes assigns to input files are not among them."""
    pipeline = parse(content)
    problems = safety_problems(pipeline, allow_modules) + list(pipeline.problems)
    problems += input_file_problems(pipeline, input_files)
    if problems:
        raise PipelineError("; ".join(problems))
    bound = bound_images(pipeline, input_files)
    return replace(pipeline, image_names=tuple(n for n in pipeline.image_names if n not in bound))


@dataclass(frozen=True)
class _Read:
    """One module as CellProfiler 4.2's text reader sees it."""

    name: str
    attributes: str
    settings: tuple[tuple[str, str], ...]


def _cellprofiler_reads(text: str) -> tuple[list[_Read], bool, str]:
    """(modules, whether a file list follows, why it stops reading if it does),
    the way cellprofiler_core 4.2.8's Pipeline.parse_pipeline reads the text.

    Like CellProfiler, it stops at the first module it cannot read: nothing
    after that is ever evaluated."""
    lines = _LINE_BREAK_RE.split(text)
    if lines and lines[-1] == "":
        lines.pop()
    stream = iter(lines)

    def readline() -> str | None:
        line = next(stream, None)
        return None if line is None else line.strip()

    first = readline()
    if first is None or not first.startswith(HEADER):
        return [], False, f"its first line is not exactly '{HEADER}'"
    count = sys.maxsize
    details = False
    while True:
        line = readline()
        if line is None:
            return [], details, "the file ends in its header"
        if not line:
            break
        parts = line.split(":")
        if len(parts) != 2:
            return [], details, f"the header line {line[:60]!r} is not one 'Key:value'"
        key, value = parts
        try:
            if key in ("Version", "SVNRevision", "DateRevision"):
                int(value)
            elif key == "ModuleCount":
                count = int(value)
        except ValueError:
            return [], details, f"the header line {line[:60]!r} has no number"
        if key == "HasImagePlaneDetails":
            details = value == "True"
    read: list[_Read] = []
    for _ in range(count):
        line = readline()
        if line is None:
            break
        colon = line.find(":")
        if colon == -1:
            return read, details, f"after module {len(read)} comes {line[:60]!r}, which is not a module"
        settings: list[tuple[str, str]] = []
        while True:
            setting = readline()
            if not setting:  # None or blank: the module ends
                break
            label, colon_found, value = setting.partition(":")
            if not colon_found:
                return (
                    read,
                    details,
                    f"module {len(read) + 1} has a setting line without ':' ({setting[:60]!r})",
                )
            settings.append((_cp_unescape(label), _cp_unescape(value)))
        read.append(_Read(line[:colon].strip(), line[colon + 1 :], tuple(settings)))
    return read, details, ""


def _cp_unescape(setting: str) -> str:
    """A setting's value as CellProfiler 4.2 decodes it (in every format version)."""
    if r"\\\\g<" in setting:
        if r"\x7C" in setting:
            setting = setting.replace(r"\x7C\\\\g<", r"|\g<")
        else:
            setting = setting.replace(r"\\\\g<", r"\g<")
    if "\\x" in setting:
        try:
            setting = setting.encode("utf-8").decode("unicode_escape")
        except UnicodeDecodeError:
            pass
    if len(setting) > 1:
        setting = setting.replace("\x00", "").strip("ÿþ")
    return setting


def _canonical(name: str) -> str:
    """The module CellProfiler 4.2 loads for a name (it keeps what follows the last '.')."""
    short = name.split(".")[-1]
    return RENAMED_MODULES.get(short, short)


def _attributes(title: str, attributes: str) -> tuple[dict[str, object], list[str]]:
    """(the module attributes, ``[module_num:1|...]``, what is wrong with them):
    they must be plain values, for CellProfiler eval()s each one, with Python's
    builtins, while it loads the pipeline."""
    values: dict[str, object] = {}
    if len(attributes) < 2 or attributes[0] != "[" or attributes[-1] != "]":
        return values, [
            f"{title} has no [...] attributes: the file is damaged (save it again from CellProfiler)"
        ]
    attributes = attributes.replace("dtype='|S", "dtype='S")
    pieces = _NOTES_RE.split(attributes)
    if len(pieces) == 3:
        before, note, after = pieces
        parts = before[1:].split("|") + [note[1:-1]] + after[:-1].split("|")
    else:
        parts = attributes[1:-1].split("|")
    problems: list[str] = []
    seen: set[str] = set()
    for part in parts:
        if part.isascii():
            try:
                part = part.encode("utf-8").decode("unicode_escape")
            except UnicodeDecodeError:
                problems.append(f"{title} has a damaged attribute ({part[:60]!r})")
                continue
        else:
            part = part.replace("\\", "")
        key, colon, value = part.partition(":")
        if not colon or key not in _MODULE_ATTRIBUTES or key in seen:
            why = "is given twice" if key in seen else "is not one CellProfiler writes"
            problems.append(
                f"{title} has an attribute {part[:60]!r} that {why}: save the pipeline again from CellProfiler"
            )
            continue
        seen.add(key)
        expression = value.lstrip(" \t")
        if key == "batch_state":
            if not _BATCH_STATE_RE.fullmatch(expression.rstrip()):
                problems.append(_code_attribute(title, key, value))
            continue
        try:
            tree = ast.parse(expression, mode="eval")
        except SyntaxError:
            if key != "notes":  # CellProfiler reads unparsable notes as text
                problems.append(_code_attribute(title, key, value))
            continue
        except (ValueError, RecursionError, MemoryError):
            problems.append(_code_attribute(title, key, value))
            continue
        try:
            values[key] = ast.literal_eval(tree)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            problems.append(_code_attribute(title, key, value))
    return values, problems


def _code_attribute(title: str, key: str, value: str) -> str:
    return (
        f"{title} has an attribute '{key}:{value[:60]}' that is not a plain value: CellProfiler "
        "evaluates module attributes as Python when it loads the pipeline; save it again from CellProfiler"
    )


def _module_problems(module: Module, name: str, allowed: set[str]) -> list[str]:
    if module.name in allowed or name in allowed:
        return []
    if name in RUNS_CODE:
        return [f"{module.title} {RUNS_CODE[name]}; {OPERATOR_MUST_ENABLE}"]
    if name in REPLACED_MODULES:
        return [
            f"{module.title} is not a CellProfiler 4.2 module: CellProfiler 4 replaced it with "
            f"{REPLACED_MODULES[name]}; open the pipeline in CellProfiler 4.2 and save it again"
        ]
    if name not in STOCK_MODULES:
        return [f"{module.title} is not a stock CellProfiler 4.2 module (a plugin?); {OPERATOR_MUST_ENABLE}"]
    if name in LOADS_PICKLE:
        label, mode = LOADS_PICKLE[name]
        if any(v.strip() == mode for v in module.values(label)):
            return [
                f"{module.title} loads a classifier file with joblib (a Python pickle, which runs code) "
                f"because '{label}' is '{mode}'; {OPERATOR_MUST_ENABLE}, or choose another mode"
            ]
    return []


def _location(value: str) -> tuple[str, str] | None:
    """(CellProfiler's folder choice, path) if the value is a folder setting ("Choice|path")."""
    choice, bar, path = value.partition("|")
    if not bar:
        return None
    if choice in _FOLDER_CHOICES:
        return _FOLDER_CHOICES[choice], path
    if choice.startswith(("Default Image", "Default image", "Default input")):
        return IN_FOLDER, path  # as cellprofiler_core's standardize_default_folder_names does
    if choice.startswith("Default output"):
        return OUT_FOLDER, path
    return None


def _path_problem(path: str, separators: str = "/\\") -> str | None:
    """Why a path taken relative to a folder could lead out of it, or None.
    Metadata tags are fine, but not together with '..' (a tag's value is not known)."""
    tagged = bool(_TAG_RE.search(path))
    plain = _TAG_RE.sub("TAG", path)
    if plain[:1] and plain[0] in separators:
        return "is an absolute path"
    depth = 0
    for part in re.split(f"[{re.escape(separators)}]", plain):
        if part == "..":
            if tagged:
                return "combines metadata tags with '..'"
            depth -= 1
            if depth < 0:
                return "leads out of its folder with '..'"
        elif part not in ("", "."):
            depth += 1
    return None


def _location_problems(module: Module, name: str, revision: object) -> list[str]:
    """Files are written only inside the run's Default Output Folder and read
    only from the run's folders; file and object names do not lead out of them.
    Every folder setting of a module that writes files is where it writes,
    except SaveImages' base image folder, found by its position."""
    problems: list[str] = []
    positions = (
        SAVEIMAGES_POSITIONS.get(revision) if name == "SaveImages" and isinstance(revision, int) else None
    )
    if positions is not None:
        file_names = set(positions[3])
    elif name == "SaveImages":
        wanted = {_norm(label) for label in SAVEIMAGES_FILE_NAMES}
        file_names = {i for i, (label, _) in enumerate(module.settings) if _norm(label) in wanted}
    else:
        file_names = set()
    for index, (label, value) in enumerate(module.settings):
        where = f"{module.title} setting '{label.strip()}'"
        location = _location(value)
        if location is None:
            if index in file_names:
                why = _path_problem(value)
            else:
                why = _path_problem(value, "/") if _might_be_path(value) else None
            if why:
                problems.append(
                    f"{where} {why} ({value!r}): file and object names must stay inside the run's folders"
                )
            continue
        if positions is not None and index == positions[2]:
            create = module.settings[positions[1]][1] if positions[1] < len(module.settings) else ""
            problems += _base_folder_problems(where, location, value, create)
            continue
        why, remedy = _folder_problem(*location, writes=name in WRITES_FILES, reads=name in READS_FILES)
        if why:
            problems.append(f"{where} {why} ({value!r}): {remedy}")
    return problems


def _folder_problem(choice: str, path: str, *, writes: bool, reads: bool) -> tuple[str | None, str]:
    """(why a folder setting leads outside the run's folders or None, what to do)."""
    if writes:
        remedy = "choose 'Default Output Folder', or a 'Default Output Folder sub-folder' inside it"
    else:
        remedy = "keep the file in the Default Input Folder or the Default Output Folder"
    if choice == WITH_IMAGE:
        return "writes next to the input images", remedy
    if choice == URL_FOLDER:
        return ("reads from the network" if path.strip() else None), remedy
    if choice == ELSEWHERE:
        # An empty 'Elsewhere...' is CellProfiler's own working folder, private to it;
        # stock pipelines keep it in read settings they do not use.
        if path.strip() or not reads:
            return "points outside the run's folders ('Elsewhere...')", remedy
        return None, remedy
    if choice in (IN_FOLDER, IN_SUBFOLDER) and writes:
        return "writes into the Default Input Folder, where the site's images are", remedy
    if choice in (IN_SUBFOLDER, OUT_SUBFOLDER):
        sub = _path_problem(path)
        return (f"names a sub-folder that {sub}" if sub else None), remedy
    return None, remedy


def _base_folder_problems(where: str, location: tuple[str, str], value: str, create: str) -> list[str]:
    """SaveImages' "Base image folder": with "Create subfolders in the output
    folder?" it writes into the output folder plus the images' folder relative
    to it, which stays inside only if it is the Default Input Folder (where
    cellmesh puts a site's images); without, CellProfiler does not use it."""
    if create.strip().lower() not in ("yes", "true") or location[0] == IN_FOLDER:
        return []
    return [
        f"{where} ({value!r}) with 'Create subfolders in the output folder?' set to Yes mirrors the "
        "images' folders relative to it, which can lead outside the Default Output Folder: choose "
        "'Default Input Folder' as the base image folder, or create no sub-folders"
    ]


def _might_be_path(value: str) -> bool:
    """Whether a value not known to be a path could still be taken as one and lead
    outside (an absolute path, or '..' between '/'): object and file names are."""
    plain = _TAG_RE.sub("TAG", value.strip())
    return plain.startswith("/") or bool(_ESCAPING_RE.search(plain))


def _code_problems(module: Module, name: str) -> list[str]:
    """Metadata and NamesAndTypes hold Joiner settings, which CellProfiler reads
    with eval(): a Joiner must be a plain list of dictionaries, and no value of
    those modules may be Python code beyond plain values."""
    if name not in JOINERS:
        return []
    problems: list[str] = []
    joiners = {_norm(label) for label in JOINERS[name]}
    for label, value in module.settings:
        where = f"{module.title} setting '{label.strip()}'"
        if _norm(label) in joiners and value.strip():
            try:
                joins = ast.literal_eval(value.strip())
                ok = isinstance(joins, list) and all(isinstance(j, dict) for j in joins)
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                ok = False
            if not ok:
                problems.append(
                    f"{where} is not a list of metadata matches like [{{'DNA': 'Well', 'GFP': 'Well'}}] "
                    f"({value[:80]!r}): CellProfiler evaluates it as Python"
                )
        elif _is_code(value):
            problems.append(
                f"{where} is Python code ({value[:80]!r}): CellProfiler evaluates some of this "
                "module's settings as Python; save the pipeline again from CellProfiler"
            )
    return problems


def _is_code(value: str) -> bool:
    try:
        tree = ast.parse(value.lstrip(" \t"), mode="eval")
    except SyntaxError:
        return False  # eval() would refuse it too
    except (ValueError, RecursionError, MemoryError):
        return True
    for node in ast.walk(tree):
        if not isinstance(node, _PLAIN_NODES):
            return True
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            return True
    return False


# -- files a pipeline reads ------------------------------------------------------
#
# Besides the site's channel images, a pipeline may read files: a metadata CSV
# (Metadata "Import from file"), rules or a classifier (FilterObjects,
# FlagImage, ClassifyObjects), a worm training set (UntangleWorms,
# StraightenWorms), an ImageJ macro, or files NamesAndTypes assigns an image
# name to by rule (an illumination function, Channel1ILLUM.mat). Each must be
# an input file of the run: a pipeline attachment (later also a plate artifact
# of an earlier stage), placed in the run's Default Input Folder under its
# name. Registration refuses a pipeline that reads a file no input provides.
# LoadData's CSV is written by the worker and is not checked here.

MAX_INPUT_NAME = 255
#: The Images module's filters by choice (cellprofiler_core/constants/modules/images.py).
IMAGES_ONLY_FILTER = 'and (extension does isimage) (directory doesnot containregexp "[\\\\/]\\.")'
#: Extensions CellProfiler's "isimage" takes for images (its Java IsImagePredicate:
#: what Bio-Formats reads); an illumination function (.npy, .mat), a CSV or XML is not.
_NOT_IMAGE_EXTENSIONS = frozenset(
    {"npy", "mat", "csv", "txt", "xml", "json", "h5", "model", "pkl", "ijm", "py"}
)
_EXTENSION_TESTS: dict[str, Callable[[str], bool]] = {
    "istif": lambda ext: ext.lower() in ("tif", "tiff", "ome.tif", "ome.tiff"),
    "isjpeg": lambda ext: ext.lower() in ("jpg", "jpeg"),
    "ispng": lambda ext: ext.lower() == "png",
    "isimage": lambda ext: ext.rsplit(".", 1)[-1].lower() not in _NOT_IMAGE_EXTENSIONS,
    "isflex": lambda ext: ext.lower() == "flex",
    "ismovie": lambda ext: ext.lower() in ("mov", "avi"),
}
#: Modules whose file names are files they write, not read (their folders are checked by check_safe).
_WRITERS = frozenset(WRITES_FILES) | {"LoadData"}
#: What a module does with the file it reads, for the messages.
_READ_VERBS = {
    "Metadata": "imports",
    "UntangleWorms": "reads its worm training set",
    "StraightenWorms": "reads its worm training set",
    "FilterObjects": "reads",
    "FlagImage": "reads its rules",
    "ClassifyObjects": "reads its classifier",
    "RunImageJMacro": "runs the macro",
}


@dataclass(frozen=True)
class FileRead:
    """A file a module reads, and where from."""

    module: str
    """The module's title, e.g. "Metadata (module 2)"."""
    name: str
    """The module's name, e.g. "Metadata"."""
    setting: str
    """The label of the setting that names the file."""
    path: str
    """The file's path relative to its folder (with a sub-folder if one is given)."""
    folder: str
    """CellProfiler's folder choice: Default Input Folder, Default Output Folder, Elsewhere..."""


def check_input_name(name: str) -> str | None:
    """What is wrong with an input file's name (relative to the Default Input
    Folder), or None: '/'-separated parts, none empty, hidden or '..', printable,
    at most 255 characters."""
    if not name:
        return "an input file needs a name, e.g. '1049_Metadata.csv'"
    if len(name) > MAX_INPUT_NAME:
        return f"input file name {name[:40]!r}... is longer than {MAX_INPUT_NAME} characters"
    if any(ord(c) < 32 or c in '\\"' for c in name):
        return f"input file name {name!r} has a control character, a backslash or a quote"
    for part in name.split("/"):
        if not part or part.startswith(".") or part.strip() != part:
            return (
                f"input file name {name!r} must be a path relative to the Default Input Folder "
                "whose parts are not empty, do not start with '.' and have no space around them "
                "(e.g. 'illum/Channel1ILLUM.mat')"
            )
    return None


def parse_rule(text: str) -> object:
    """A CellProfiler file filter (``and (file does contain "w1") (extension does istif)``)
    as nested lists: ``["and", [...], [...]]``, predicates as lists of words and
    literals. Raises ValueError if it is not one."""
    pos = 0

    def skip() -> None:
        nonlocal pos
        while pos < len(text) and text[pos] == " ":
            pos += 1

    def literal() -> str:
        nonlocal pos
        out = []
        pos += 1
        while pos < len(text):
            c = text[pos]
            if c == "\\" and pos + 1 < len(text):
                out.append(text[pos + 1])
                pos += 2
                continue
            if c == '"':
                pos += 1
                return "".join(out)
            out.append(c)
            pos += 1
        raise ValueError("unterminated literal")

    def sequence(closing: bool) -> list[object]:
        nonlocal pos
        items: list[object] = []
        while True:
            skip()
            if pos >= len(text):
                if closing:
                    raise ValueError("missing ')'")
                return items
            c = text[pos]
            if c == ")":
                if not closing:
                    raise ValueError("unexpected ')'")
                pos += 1
                return items
            if c == "(":
                pos += 1
                items.append(sequence(True))
            elif c == '"':
                items.append(("literal", literal()))
            else:
                match = re.match(r"(?:\\.|[^ )(])+", text[pos:])
                assert match is not None
                items.append(re.sub(r"\\(.)", r"\1", match.group(0)))
                pos += len(match.group(0))

    return sequence(False)


def rule_matches(rule: object, file_name: str) -> bool | None:
    """Whether a parsed rule accepts a file of this name in the Default Input
    Folder: True, False, or None when it depends on what the name does not say
    (the folder's path, metadata, the image's contents)."""
    if not isinstance(rule, list) or not rule:
        return None
    head = rule[0]
    if head in ("and", "or"):
        values = [rule_matches(item, file_name) for item in rule[1:]]
        if head == "and":
            if any(v is False for v in values):
                return False
            return True if all(v is True for v in values) else None
        if any(v is True for v in values):
            return True
        return False if all(v is False for v in values) else None
    if len(rule) == 1 and isinstance(head, list):
        return rule_matches(head, file_name)
    words = [w[1] if isinstance(w, tuple) else w for w in rule]
    base = file_name.rsplit("/", 1)[-1]
    if head == "file" and len(words) == 4 and words[1] in ("does", "doesnot"):
        op, value = words[2], str(words[3])
        tests = {
            "contain": lambda: value in base,
            "containregexp": lambda: re.search(value, base) is not None,
            "startwith": lambda: base.startswith(value),
            "endwith": lambda: base.endswith(value),
            "eq": lambda: base == value,
        }
        if op not in tests:
            return None
        try:
            found = tests[op]()
        except re.error:
            return None
        return found if words[1] == "does" else not found
    if head == "extension" and len(words) == 3 and words[1] in ("does", "doesnot"):
        test = _EXTENSION_TESTS.get(str(words[2]))
        if test is None:
            return None
        ext = base.split(".", 1)[1] if "." in base else ""
        if base.lower().endswith((".ome.tif", ".ome.tiff")):
            ext = ".".join(base.split(".")[-2:])
        elif "." in ext:
            ext = ext.rsplit(".", 1)[-1]
        found = bool(test(ext))
        return found if words[1] == "does" else not found
    return None


def _rule(text: str) -> object | None:
    try:
        return parse_rule(text)
    except ValueError:
        return None


def _only_attachments(rule: object) -> bool:
    """Whether a rule matches no channel image: it insists on a non-image
    extension or on one exact file name (``file does eq``) at the top of an 'and'."""
    if _requires_non_image(rule):
        return True
    if not isinstance(rule, list) or not rule:
        return False
    if rule[0] == "and":
        return any(_only_attachments(item) for item in rule[1:])
    words = [w[1] if isinstance(w, tuple) else w for w in rule]
    return len(words) == 4 and words[:3] == ["file", "does", "eq"]


def _requires_non_image(rule: object) -> str | None:
    """The non-image extension a rule insists on (``file does endwith ".mat"``
    at the top of an 'and'), which no microscope's channel image has."""
    if not isinstance(rule, list) or not rule:
        return None
    if rule[0] == "and":
        for item in rule[1:]:
            found = _requires_non_image(item)
            if found:
                return found
        return None
    words = [w[1] if isinstance(w, tuple) else w for w in rule]
    if len(words) == 4 and words[:3] == ["file", "does", "endwith"]:
        ext = str(words[3]).lower().lstrip(".")
        if ext in _NOT_IMAGE_EXTENSIONS:
            return "." + ext
    return None


@dataclass(frozen=True)
class _Assignment:
    """One rule of NamesAndTypes: the image name, its type and its rule."""

    image_name: str
    image_type: str
    rule_text: str


def _assignments(module: Module) -> list[_Assignment]:
    if (module.get("Assign a name to") or "").strip().lower().startswith("all"):
        return []
    out: list[_Assignment] = []
    block: dict[str, str] | None = None
    for label, value in module.settings:
        key = _norm(label)
        if key == "single image location":
            block = None
            continue
        if key == "select the rule criteria":
            block = {"rule": value}
            out_index = len(out)
            out.append(_Assignment("", "", value))
            continue
        if block is not None and key not in block:
            block[key] = value
            out[out_index] = _Assignment(
                block.get("name to assign these images", "").strip(),
                block.get("select the image type", "").strip(),
                block["rule"],
            )
    return [a for a in out if _used(a.image_name)]


def _images_filter(pipeline: Pipeline) -> object | None:
    """The Images module's filter (None: every file passes)."""
    for module in pipeline.modules:
        if module.enabled and module.name == "Images":
            choice = (module.get("Filter images?") or "Images only").strip()
            if choice == "No filtering":
                return None
            if choice == "Custom":
                return _rule(module.get("Select the rule criteria") or "")
            return _rule(IMAGES_ONLY_FILTER)
    return None


def bound_images(pipeline: Pipeline, input_files: Collection[str]) -> dict[str, list[str]]:
    """The image names NamesAndTypes assigns to input files rather than to
    channel images: {image name: [input file names its rule matches]}. The
    worker hands these files to CellProfiler together with the channel images."""
    bound: dict[str, list[str]] = {}
    passes = _images_filter(pipeline)
    for module in pipeline.modules:
        if not module.enabled or module.name != "NamesAndTypes":
            continue
        for assignment in _assignments(module):
            rule = _rule(assignment.rule_text)
            matched = [
                n
                for n in sorted(input_files)
                if rule_matches(rule, n) is True and (passes is None or rule_matches(passes, n) is not False)
            ]
            if matched:
                bound.setdefault(assignment.image_name, []).extend(matched)
    return bound


def files_read(pipeline: Pipeline) -> list[FileRead]:
    """The files the pipeline's enabled modules read by name (not LoadData's CSV,
    not the files modules write), with the setting that names them."""
    reads: list[FileRead] = []
    for module in pipeline.modules:
        if not module.enabled or module.name in _WRITERS:
            continue
        name = _canonical(module.name)
        if name == "Metadata" and not module.is_yes("Extract metadata?"):
            continue
        if name == "UntangleWorms" and (module.get("Train or untangle worms?") or "").strip() == "Train":
            continue
        if name in ("FlagImage",) and not any(
            v.strip() in ("Rules", "Classifier") for v in module.values("Flag is based on")
        ):
            continue
        if name == "ClassifyObjects" and not any(
            v.strip() == "Classifier Model" for v in module.values("Make classification decision based on")
        ):
            continue
        location: tuple[str, str] | None = None
        method = ""
        for label, value in module.settings:
            key = _norm(label)
            if key == "metadata extraction method":
                method = value.strip()
            found = _location(value)
            if found is not None:
                location = found
                continue
            if (
                location is None
                or not value.strip()
                or not key.endswith(("file name", "filename"))
                or key.startswith("regular")
            ):
                continue
            if name == "Metadata" and method != "Import from file":
                continue
            if name == "FilterObjects":
                mode = (module.get("Select the filtering mode") or "").strip()
                if ("rules" in key and mode != "Rules") or ("classifier" in key and mode != "Classifiers"):
                    continue
            folder, sub = location
            sub = sub.strip().strip("/")
            path = value.strip()
            if folder in (IN_SUBFOLDER, OUT_SUBFOLDER) and sub not in ("", "."):
                path = f"{sub}/{path}"
            reads.append(FileRead(module.title, module.name, label.strip(), path, folder))
    return reads


def input_file_problems(pipeline: Pipeline, input_files: Collection[str]) -> list[str]:
    """Why the pipeline would read a file that no input file (attachment) and no
    channel image provides, one sentence each naming module, setting and file."""
    names = set(input_files)
    problems: list[str] = []
    for read in files_read(pipeline):
        verb = _READ_VERBS.get(_canonical(read.name), "reads")
        where = f"`{read.name}` ({read.module.partition(' (')[2].rstrip(')')}) setting '{read.setting}'"
        if _TAG_RE.search(read.path):
            problems.append(
                f"{where} {verb} a file named with metadata tags ({read.path!r}): cellmesh gives "
                "every site the same input files; name one file and attach it"
            )
        elif read.folder in (IN_FOLDER, IN_SUBFOLDER):
            if read.path not in names:
                problems.append(
                    f"{where} {verb} {read.path} from the Default Input Folder, which is not attached: "
                    f"attach it with --attach {read.path}"
                )
        elif read.folder in (OUT_FOLDER, OUT_SUBFOLDER, ELSEWHERE):
            problems.append(
                f"{where} {verb} {read.path} from the {read.folder.rstrip('.')}"
                f"{' (CellProfiler’s working folder)' if read.folder == ELSEWHERE else ''}, where cellmesh "
                "puts nothing: choose 'Default Input Folder' as its location and attach it with "
                f"--attach {read.path.rsplit('/', 1)[-1]}"
            )
    bound = bound_images(pipeline, names)
    for module in pipeline.modules:
        if not module.enabled or module.name != "NamesAndTypes":
            continue
        title = f"`{module.name}` (module {module.number})"
        for assignment in _assignments(module):
            files = bound.get(assignment.image_name, [])
            rule = _rule(assignment.rule_text)
            if files and assignment.image_type != "Illumination function" and not _only_attachments(rule):
                problems.append(
                    f"{title} assigns {assignment.image_name} to files matching "
                    f"'{assignment.rule_text}', which the input file {files[0]} matches too: CellProfiler "
                    f"would take it for a {assignment.image_name} image besides the channel's; rename the "
                    'attachment, or narrow the rule (e.g. file does eq "<its name>")'
                )
            elif len(files) > 1:
                problems.append(
                    f"{title} assigns {assignment.image_name} to files matching "
                    f"'{assignment.rule_text}', which several attachments match ({', '.join(files)}): "
                    "every site gets one file per image name; attach one of them"
                )
            elif not files:
                extension = _requires_non_image(rule)
                if extension or assignment.image_type == "Illumination function":
                    what = (
                        "an illumination function"
                        if assignment.image_type == "Illumination function"
                        else "a file"
                    )
                    ends = f" (a {extension} file, which no channel image is)" if extension else ""
                    example = _example_name(rule, extension or ".npy")
                    problems.append(
                        f"{title} assigns {assignment.image_name} to {what} matching "
                        f"'{assignment.rule_text}'{ends}, and no attachment matches: attach the file "
                        "under a name the rule matches" + (f", e.g. --attach {example}" if example else "")
                    )
    passes = _images_filter(pipeline)
    for module in pipeline.modules:
        if module.enabled and module.name == "NamesAndTypes":
            if (module.get("Assign a name to") or "").strip().lower().startswith("all"):
                taken = [n for n in sorted(names) if passes is None or rule_matches(passes, n) is not False]
                if taken:
                    problems.append(
                        f"`NamesAndTypes` (module {module.number}) assigns one name to all images, and "
                        f"the Images module's filter lets the input file {taken[0]} through: CellProfiler "
                        "would take it for an image; filter it out in the Images module (e.g. 'Images "
                        "only'), or assign names by rules"
                    )
    if passes is not None:
        for name in sorted(names):
            if rule_matches(passes, name) is False and any(
                rule_matches(_rule(a.rule_text), name) is True
                for m in pipeline.modules
                if m.enabled and m.name == "NamesAndTypes"
                for a in _assignments(m)
            ):
                problems.append(
                    f"the Images module's filter drops the attachment {name}, which NamesAndTypes "
                    f"assigns: set 'Filter images?' to Custom with a rule that passes it, e.g. "
                    f'or (extension does isimage) (file does endwith "{_suffix(name)}")'
                )
    return problems


def _suffix(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return "." + base.rsplit(".", 1)[-1] if "." in base else base


def _example_name(rule: object, default_suffix: str) -> str | None:
    """A file name the rule accepts, built from its 'file' predicates, or None."""
    eq = start = end = ""
    middle: list[str] = []

    def walk(node: object) -> None:
        nonlocal eq, start, end
        if not isinstance(node, list) or not node:
            return
        if node[0] == "and":
            for item in node[1:]:
                walk(item)
            return
        words = [w[1] if isinstance(w, tuple) else w for w in node]
        if len(words) == 4 and words[0] == "file" and words[1] == "does":
            value = str(words[3])
            if words[2] == "eq":
                eq = value
            elif words[2] == "startwith":
                start = value
            elif words[2] == "endwith":
                end = value
            elif words[2] == "contain":
                middle.append(value)

    walk(rule)
    name = eq or (start + "".join(middle) + (end or default_suffix))
    if name and check_input_name(name) is None and rule_matches(rule, name) is True:
        return name
    return None
