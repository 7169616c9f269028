"""What a registered pipeline may do (services/common/cppipe.py, `check_safe`):
every real pipeline still passes; hostile variants of the project's nuclei
pipeline are refused with a message naming the module and the setting."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import pytest

from services.common import cppipe
from services.common.cppipe import PipelineError

REPO = Path(__file__).resolve().parents[2]
NUCLEI = REPO / "examples" / "pipelines" / "nuclei.cppipe"
ATTRS = (
    "[module_num:{n}|svn_version:'Unknown'|variable_revision_number:{rev}|show_window:False|"
    "notes:[]|batch_state:array([], dtype=uint8)|enabled:{enabled}|wants_pause:False]"
)
EXPORT = "ExportToSpreadsheet (module 8)"

#: Every .cppipe under examples/pipelines and the shared data, and what
#: `check_runs_per_site` says of it today ("" = it runs one site at a time).
REAL_PIPELINES = {
    "examples/pipelines/nuclei.cppipe": "",
    "examples/pipelines/bbbc013_nuclei.cppipe": "",
    # The example workflows: plate stages that only save their illumination
    # functions, and the per-site analyses that read them (and a plate map).
    "examples/pipelines/illum_dna.cppipe": "",
    "examples/pipelines/nuclei_illum.cppipe": "`NamesAndTypes` (module 3) assigns IllumDNA",
    "examples/pipelines/bbbc013/illum.cppipe": "",
    "examples/pipelines/bbbc013/analysis.cppipe": (
        "`Metadata` (module 2) setting 'Metadata file name' imports 1049_Metadata.csv"
    ),
    "example_human/ExampleHuman.cppipe": "",
    "example_human/ExamplePercentPositive.cppipe": "",
    # Per plate (CalculateStatistics), see test_cppipe.py; they read files
    # that must be attached (ATTACHED).
    "bbbc013_translocation_plate/ExampleSBS.cppipe": "`NamesAndTypes` (module 3) assigns IllumDNA",
    "bbbc013_translocation_plate/derived/ExampleSBS_cp4.cppipe": (
        "`Metadata` (module 2) setting 'Metadata file name' imports 1049_Metadata.csv"
    ),
    # It only saves images (its illumination functions): valid.
    "bbbc013_translocation_plate/ExampleSBSIllumination.cppipe": "",
}
#: The files those pipelines read, by the names they read them under.
SBS_FILES = ("1049_Metadata.csv", "Channel1ILLUM.mat", "Channel2ILLUM.mat")
ATTACHED = {
    "bbbc013_translocation_plate/ExampleSBS.cppipe": SBS_FILES,
    "bbbc013_translocation_plate/derived/ExampleSBS_cp4.cppipe": SBS_FILES,
    "examples/pipelines/bbbc013/analysis.cppipe": (
        "1049_Metadata.csv",
        "Channel1ILLUM.npy",
        "Channel2ILLUM.npy",
    ),
    "examples/pipelines/nuclei_illum.cppipe": ("IllumDNA.npy",),
}
#: The channels of those pipelines once their files are given.
CHANNELS = {"examples/pipelines/nuclei_illum.cppipe": ("DNA", "GFP")}


def nuclei(*modules: str, export: dict[str, str] | None = None) -> str:
    """nuclei.cppipe with `modules` (blocks from `block`) before its
    ExportToSpreadsheet, which becomes module 9 (or later), and `export`
    replacing settings of ExportToSpreadsheet ({label: new value})."""
    text = NUCLEI.read_text(encoding="utf-8")
    head, sep, tail = text.partition("ExportToSpreadsheet:[module_num:8|")
    assert sep, "nuclei.cppipe changed: ExportToSpreadsheet is no longer module 8"
    for label, value in (export or {}).items():
        before = next(line for line in tail.splitlines() if line.strip().startswith(label + ":"))
        tail = tail.replace(before, f"    {label}:{value}", 1)
    n = 8 + len(modules)
    text = head + "".join(m + "\n" for m in modules) + f"ExportToSpreadsheet:[module_num:{n}|" + tail
    return text.replace("ModuleCount:8", f"ModuleCount:{n}")


def block(name: str, settings: list[tuple[str, str]], n: int = 8, rev: int = 1, enabled: bool = True) -> str:
    lines = [f"{name}:" + ATTRS.format(n=n, rev=rev, enabled=enabled)]
    return "\n".join(lines + [f"    {label}:{value}" for label, value in settings]) + "\n"


def save_images(labels: dict[int, str] | None = None, **changes: str) -> str:
    """ExampleHuman's SaveImages (revision 15) as module 8, with the settings
    named by label in `changes` (``**{label: value}``) given new values."""
    settings = {
        "Select the type of image to save": "Image",
        "Select the image to save": "DNA",
        "Select method for constructing file names": "From image filename",
        "Select image name for file prefix": "DNA",
        "Enter single file name": "OrigBlue",
        "Number of digits": "4",
        "Append a suffix to the image file name?": "Yes",
        "Text to append to the image name": "_Overlay",
        "Saved file format": "png",
        "Output file location": "Default Output Folder|",
        "Image bit depth": "8-bit integer",
        "Overwrite existing files without warning?": "Yes",
        "When to save": "Every cycle",
        "Record the file and path information to the saved image?": "Yes",
        "Create subfolders in the output folder?": "No",
        "Base image folder": "Elsewhere...|",
        "How to save the series": "T (Time)",
    }
    settings.update(changes)
    items = list(settings.items())
    for index, label in (labels or {}).items():  # relabel settings, keeping their positions
        items[index] = (label, items[index][1])
    return block("SaveImages", items, rev=15)


def refusal(text: str, allow_modules: Collection[str] = ()) -> str:
    with pytest.raises(PipelineError) as refused:
        cppipe.check_safe(cppipe.parse(text), allow_modules)
    return str(refused.value)


def accepted(text: str, allow_modules: Collection[str] = ()) -> None:
    pipeline = cppipe.parse(text)
    assert cppipe.safety_problems(pipeline, allow_modules) == []


# -- every real pipeline ---------------------------------------------------------------


def test_every_real_pipeline_passes_the_new_checks(shared_data: Path) -> None:
    """Every .cppipe in examples/pipelines and the shared data passes
    `check_safe`; those refused today are refused only for running across
    image sets, as before."""
    found = {p.relative_to(REPO).as_posix(): p for p in (REPO / "examples" / "pipelines").rglob("*.cppipe")}
    found |= {p.relative_to(shared_data).as_posix(): p for p in shared_data.rglob("*.cppipe")}
    assert sorted(found) == sorted(REAL_PIPELINES), (
        "a pipeline was added or removed: list it in REAL_PIPELINES"
    )
    for name, path in sorted(found.items()):
        pipeline = cppipe.parse(path.read_bytes())
        assert cppipe.safety_problems(pipeline) == [], name
        expected = REAL_PIPELINES[name]
        if not expected:
            assert cppipe.parse_for_sites(path.read_bytes()).image_names, name
            continue
        with pytest.raises(PipelineError) as refused:
            cppipe.parse_for_sites(path.read_bytes())
        # Exactly the per-site problems and the files it reads that are not
        # attached: nothing from the safety checks.
        expected_problems = list(pipeline.problems) + cppipe.input_file_problems(pipeline, ())
        assert str(refused.value) == "; ".join(expected_problems), name
        assert str(refused.value).startswith(expected), name
        attached = cppipe.parse_for_sites(path.read_bytes(), input_files=ATTACHED[name])
        assert attached.image_names == CHANNELS.get(name, ("rawGFP", "rawDNA")), name


def test_the_allow_list_is_cellprofiler_4_2s_modules() -> None:
    assert len(cppipe.STOCK_MODULES) == 94
    assert {"NamesAndTypes", "IdentifyPrimaryObjects", "ExportToSpreadsheet", "RunImageJMacro"} <= (
        cppipe.STOCK_MODULES
    )
    assert set(cppipe.RENAMED_MODULES.values()) <= cppipe.STOCK_MODULES
    assert not set(cppipe.REPLACED_MODULES) & cppipe.STOCK_MODULES


# -- where files go ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "fragment"),
    [
        (
            "Default Output Folder sub-folder|../../../../tmp/x",
            "names a sub-folder that leads out of its folder with '..'",
        ),
        ("Default Output Folder sub-folder|/tmp/x", "names a sub-folder that is an absolute path"),
        ("Default Output Folder sub-folder|a/../../x", "names a sub-folder that leads out of its folder"),
        ("Default Output Folder sub-folder|..\\..\\x", "names a sub-folder that leads out of its folder"),
        ("Elsewhere...|/tmp/x", "points outside the run's folders ('Elsewhere...')"),
        ("Elsewhere...|", "points outside the run's folders ('Elsewhere...')"),
        ("Absolute path elsewhere|/tmp/x", "points outside the run's folders ('Elsewhere...')"),
        ("Default Input Folder|", "writes into the Default Input Folder, where the site's images are"),
        ("Default Input Folder sub-folder|x", "writes into the Default Input Folder"),
        ("Default Image Folder|", "writes into the Default Input Folder"),
        # Format 5 files are read with \x escapes decoded too, as CellProfiler does.
        (
            "Default Output Folder sub-folder|\\x2e\\x2e/\\x2e\\x2e/x",
            "names a sub-folder that leads out of its folder",
        ),
    ],
)
def test_exports_outside_the_output_folder_are_refused(location: str, fragment: str) -> None:
    message = refusal(nuclei(export={"Output file location": location}))
    assert f"{EXPORT} setting 'Output file location' {fragment}" in message


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        (
            {"Output file location": "Default Output Folder sub-folder|../../../../tmp/x"},
            "leads out of its folder",
        ),
        ({"Output file location": "Elsewhere...|/tmp/x"}, "points outside the run's folders"),
        ({"Output file location": "Same folder as image|"}, "writes next to the input images"),
        ({"Output file location": "Default Input Folder|"}, "writes into the Default Input Folder"),
        (
            {"Output file location": "Default Output Folder sub-folder|\\g<Plate>/../../x"},
            "names a sub-folder that combines metadata tags with '..'",
        ),
        (
            {"Select method for constructing file names": "Single name", "Enter single file name": "../../x"},
            "setting 'Enter single file name' leads out of its folder with '..'",
        ),
        ({"Enter single file name": "/etc/x"}, "setting 'Enter single file name' is an absolute path"),
        ({"Text to append to the image name": "_x/../../../y"}, "setting 'Text to append to the image name'"),
        (
            {"Create subfolders in the output folder?": "Yes"},
            "setting 'Base image folder' ('Elsewhere...|') with 'Create subfolders in the output folder?'",
        ),
        (
            {"Create subfolders in the output folder?": "Yes", "Base image folder": "Default Output Folder|"},
            "choose 'Default Input Folder' as the base image folder",
        ),
    ],
)
def test_saveimages_outside_the_output_folder_is_refused(changes: dict[str, str], fragment: str) -> None:
    message = refusal(nuclei(save_images(**changes)))
    assert message.startswith("SaveImages (module 8) ")
    assert fragment in message


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"Output file location": "Default Output Folder sub-folder|images"},
        {"Output file location": "Default Output Folder sub-folder|\\g<Plate>/\\g<Well>"},
        {"Output file location": "Default Output Folder sub-folder|a/../b"},
        {"Output file location": "Default Output Folder|"},
        {
            "Select method for constructing file names": "Single name",
            "Enter single file name": "masks/\\g<Well>",
        },
        {"Create subfolders in the output folder?": "Yes", "Base image folder": "Default Input Folder|"},
        # Not used without sub-folders: CellProfiler's own example keeps a path there.
        {"Base image folder": "Elsewhere...|/Users/someone/ExampleImages"},
    ],
)
def test_saveimages_inside_the_output_folder_is_accepted(changes: dict[str, str]) -> None:
    accepted(nuclei(save_images(**changes)))


def test_saveimages_folders_are_found_by_position_not_label() -> None:
    """CellProfiler takes settings by position: relabelling the output folder
    "Base image folder" (and the base folder "Output file location") does not
    make it a folder that is not written to."""
    swapped = save_images(
        labels={9: "Base image folder", 15: "Output file location"},
        **{"Output file location": "Elsewhere...|/tmp/x", "Base image folder": "Default Output Folder|"},
    )
    assert "Base image folder:Elsewhere...|/tmp/x" in swapped
    message = refusal(nuclei(swapped))
    assert message.startswith(
        "SaveImages (module 8) setting 'Base image folder' points outside the run's folders"
    )
    # A folder-looking value earlier on does not shift which one is the output folder.
    shifted = save_images(
        **{"Enter single file name": "Default Output Folder|", "Output file location": "Elsewhere...|/tmp/x"}
    )
    assert "setting 'Output file location' points outside the run's folders" in refusal(nuclei(shifted))
    # Another module that writes files has every folder setting taken as its output folder.
    export = nuclei(export={"Overwrite existing files without warning?": "Elsewhere...|/tmp/x"})
    assert f"{EXPORT} setting 'Overwrite existing files without warning?' points outside" in refusal(export)


@pytest.mark.parametrize(
    ("location", "fragment"),
    [
        ("URL|http://169.254.169.254/latest/meta-data/", "reads from the network"),
        ("Elsewhere...|/run/secrets", "points outside the run's folders ('Elsewhere...')"),
        ("Default Input Folder sub-folder|../../..", "names a sub-folder that leads out of its folder"),
    ],
)
def test_reading_from_outside_the_run_is_refused(location: str, fragment: str) -> None:
    text = nuclei().replace("Metadata file location:Elsewhere...|", f"Metadata file location:{location}")
    message = refusal(text)
    assert f"Metadata (module 2) setting 'Metadata file location' {fragment}" in message
    assert "keep the file in the Default Input Folder or the Default Output Folder" in message


@pytest.mark.parametrize(
    "location", ["Default Input Folder|", "Default Output Folder|", "Default Input Folder sub-folder|tables"]
)
def test_reading_from_the_run_folders_is_accepted(location: str) -> None:
    accepted(nuclei().replace("Metadata file location:Elsewhere...|", f"Metadata file location:{location}"))


@pytest.mark.parametrize("name", ["../../../tmp/Nuclei", "/tmp/Nuclei"])
def test_object_names_that_are_paths_are_refused(name: str) -> None:
    """ExportToSpreadsheet names its files after the objects."""
    text = nuclei().replace(
        "Name the primary objects to be identified:Nuclei",
        f"Name the primary objects to be identified:{name}",
    )
    message = refusal(text)
    assert "IdentifyPrimaryObjects (module 5) setting 'Name the primary objects to be identified'" in message


# -- which modules -------------------------------------------------------------------------

IMAGEJ = block(
    "RunImageJMacro",
    [
        ("Executable directory", "Default Input Folder|"),
        ("Executable", "ImageJ.exe"),
        ("Macro directory", "Default Input Folder|"),
        ("Macro", "macro.py"),
        ("Add directory variable", "No"),
    ],
)


def test_run_imagej_macro_needs_an_operator() -> None:
    message = refusal(nuclei(IMAGEJ))
    assert message == (
        "RunImageJMacro (module 8) runs external programs (ImageJ/Fiji and a macro file); "
        "an operator must enable it for this pipeline"
    )
    accepted(nuclei(IMAGEJ), allow_modules=["RunImageJMacro"])
    # The same module disabled is refused all the same: disabled modules are loaded too.
    assert "RunImageJMacro (module 8) runs external programs" in refusal(
        nuclei(IMAGEJ.replace("enabled:True", "enabled:False"))
    )


def test_an_enabled_module_still_has_its_folders_checked() -> None:
    hostile = IMAGEJ.replace("Macro directory:Default Input Folder|", "Macro directory:Elsewhere...|/tmp")
    message = refusal(nuclei(hostile), allow_modules=["RunImageJMacro"])
    assert message.startswith("RunImageJMacro (module 8) setting 'Macro directory' points outside")


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("RunCellpose", "loads and runs a Cellpose model (a plugin); an operator must enable it"),
        ("RunImageJScript", "runs external programs (ImageJ scripts; a plugin); an operator must enable it"),
        ("MyLabPlugin", "is not a stock CellProfiler 4.2 module (a plugin?); an operator must enable it"),
        ("plugins.MyLabPlugin", "is not a stock CellProfiler 4.2 module (a plugin?)"),
        ("LoadImages", "is not a CellProfiler 4.2 module: CellProfiler 4 replaced it with NamesAndTypes"),
    ],
)
def test_plugins_and_programs_need_an_operator(name: str, fragment: str) -> None:
    module = block(name, [("Some setting", "x")])
    assert refusal(nuclei(module)).startswith(f"{name} (module 8) {fragment}")
    if name != "LoadImages":
        accepted(nuclei(module), allow_modules=[name])


def test_old_names_of_stock_modules_are_stock() -> None:
    accepted(nuclei(block("MeasureCorrelation", [("Select images to measure", "DNA, GFP")])))
    accepted(nuclei(block("cellprofiler.modules.measuretexture.MeasureTexture", [("x", "y")])))


def test_a_classifier_pickle_needs_an_operator() -> None:
    settings = [
        ("Select the objects to filter", "Nuclei"),
        ("Name the output objects", "Kept"),
        ("Select the filtering mode", "Classifiers"),
        ("Select the location of the rules or classifier file", "Default Input Folder|"),
        ("Rules or classifier file name", "classifier.model"),
    ]
    message = refusal(nuclei(block("FilterObjects", settings)))
    assert message.startswith("FilterObjects (module 8) loads a classifier file with joblib (a Python pickle")
    accepted(nuclei(block("FilterObjects", settings)), allow_modules=["FilterObjects"])
    rules = [(k, "Rules" if k == "Select the filtering mode" else v) for k, v in settings]
    accepted(nuclei(block("FilterObjects", rules)))


# -- what CellProfiler evaluates while it loads -----------------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("svn_version:'Unknown'", "svn_version:__import__('os').system('id')"),
        ("notes:[]", "notes:[__import__('os').getenv('AWS_SECRET_ACCESS_KEY')]"),
        ("enabled:True", "enabled:(lambda: True)()"),
        ("batch_state:array([], dtype=uint8)", "batch_state:array(open('/etc/passwd').read())"),
        ("show_window:False", "show_window:\\x5f\\x5fimport\\x5f\\x5f('os')"),
    ],
)
def test_module_attributes_that_are_code_are_refused(old: str, new: str) -> None:
    module = block("MeasureImageQuality", [("x", "y")]).replace(old, new)
    assert new in module
    assert refusal(nuclei(module)).startswith("MeasureImageQuality (module 8) has an attribute")


@pytest.mark.parametrize(
    "attributes",
    [
        "[module_num:8|svn_version:'Unknown'|svn_version:'Unknown'|variable_revision_number:1]",
        "[module_num:8|svn_version:'Unknown'|variable_revision_number:1|run:print]",
    ],
)
def test_attributes_cellprofiler_does_not_write_are_refused(attributes: str) -> None:
    module = f"MeasureImageQuality:{attributes}\n    x:y\n"
    message = refusal(nuclei(module))
    assert message.startswith("MeasureImageQuality (module 8) has")


def test_notes_cellprofiler_reads_as_text_are_accepted() -> None:
    module = block("MeasureImageQuality", [("x", "y")]).replace("notes:[]", "notes:['it's a note']")
    accepted(nuclei(module))


@pytest.mark.parametrize(
    "value",
    [
        "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close']",
        "().__class__",
        "[{'DNA': 'Well'}] + [x for x in (1,)]",
    ],
)
def test_joiners_that_are_code_are_refused(value: str) -> None:
    message = refusal(nuclei().replace("Match metadata:[]", f"Match metadata:{value}"))
    assert message.startswith(
        "NamesAndTypes (module 3) setting 'Match metadata' is not a list of metadata matches"
    )


def test_code_in_a_relabelled_joiner_is_refused() -> None:
    text = nuclei().replace("Match metadata:[]", "Image set matching:().__class__.__base__")
    message = refusal(text)
    assert message.startswith("NamesAndTypes (module 3) setting 'Image set matching' is Python code")


def test_plain_joiners_are_accepted() -> None:
    accepted(nuclei().replace("Match metadata:[]", "Match metadata:[{'DNA': 'Well', 'GFP': 'Well'}]"))


# -- reading the file as CellProfiler does ------------------------------------------------------

HIDDEN = block("MeasureImageQuality", [("x", "y")], n=9).replace(
    "svn_version:'Unknown'", "svn_version:__import__('os').system('id')"
)


def test_a_module_cellprofiler_reads_but_cellmesh_would_not_is_refused() -> None:
    """An indented module line after a blank line is a setting to a reader that
    goes by indentation, a module to CellProfiler's (which strips each line)."""
    text = nuclei().replace("\n\nGroups:[", "\n\n    " + HIDDEN.splitlines()[0] + "\n\nGroups:[", 1)
    message = refusal(text)
    assert message.startswith("CellProfiler 4.2 would read other modules from this file than cellmesh does")
    assert "it reads Images, Metadata, NamesAndTypes, MeasureImageQuality, Groups" in message


def test_a_setting_line_without_a_colon_is_refused() -> None:
    text = nuclei().replace(
        "    Do you want to group your images?:No\n",
        "    no colon here\n" + "    " + HIDDEN.splitlines()[0] + "\n",
    )
    message = refusal(text)
    assert (
        "CellProfiler 4.2 would stop reading the pipeline: module 4 has a setting line without ':'" in message
    )


def test_a_pipeline_with_its_own_file_list_is_refused() -> None:
    text = nuclei().replace("HasImagePlaneDetails:False", "HasImagePlaneDetails:True")
    assert "carries its own list of image files (HasImagePlaneDetails:True)" in refusal(text)


def test_a_pipeline_that_is_not_utf8_is_refused() -> None:
    content = nuclei().replace("Nuclei of the generated", "Noyaux générés").encode("latin-1")
    with pytest.raises(PipelineError, match="the pipeline is not UTF-8 text"):
        cppipe.check_safe(cppipe.parse(content))


def test_a_header_cellprofiler_cannot_read_is_refused() -> None:
    text = nuclei().replace("GitHash:", "GitHash:a:b")
    assert "CellProfiler 4.2 would stop reading the pipeline: the header line 'GitHash:a:b'" in refusal(text)


def test_parse_for_sites_gives_both_kinds_of_problem_at_once() -> None:
    text = nuclei(IMAGEJ, block("CreateBatchFiles", [("x", "y")], n=9))
    with pytest.raises(PipelineError) as refused:
        cppipe.parse_for_sites(text)
    message = str(refused.value)
    assert message.startswith("RunImageJMacro (module 8) runs external programs")
    assert "; CreateBatchFiles (module 9) runs across all image sets" in message
    with pytest.raises(PipelineError, match=r"^CreateBatchFiles \(module 9\)"):
        cppipe.parse_for_sites(text, allow_modules=["RunImageJMacro"])
