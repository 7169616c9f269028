"""The .cppipe reader on the real pipelines in the shared data (CellProfiler's
own examples, formats 3 and 5), the project's examples, and variants that
exercise ExportToSpreadsheet's naming rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common import cppipe
from services.common.cppipe import PipelineError

REPO = Path(__file__).resolve().parents[2]
HEAD = "CellProfiler Pipeline: http://www.cellprofiler.org\nVersion:5\nDateRevision:421\nGitHash:\nModuleCount:{n}\nHasImagePlaneDetails:False\n\n"
ATTRS = "[module_num:{n}|svn_version:'Unknown'|variable_revision_number:1|show_window:False|notes:[]|batch_state:array([], dtype=uint8)|enabled:{enabled}|wants_pause:False]"


def text(*modules: tuple[str, list[tuple[str, str]]] | tuple[str, list[tuple[str, str]], bool]) -> str:
    blocks = []
    for n, spec in enumerate(modules, start=1):
        name, settings = spec[0], spec[1]
        enabled = spec[2] if len(spec) > 2 else True
        lines = [f"{name}:" + ATTRS.format(n=n, enabled=enabled)] + [f"    {k}:{v}" for k, v in settings]
        blocks.append("\n".join(lines))
    return HEAD.format(n=len(modules)) + "\n\n".join(blocks) + "\n"


NAT = (
    "NamesAndTypes",
    [
        ("Assign a name to", "Images matching rules"),
        ("Select the image type", "Grayscale image"),
        ("Name to assign these images", "DNA"),
        ("Assignments count", "3"),
        ("Single images count", "0"),
        ("Select the rule criteria", 'and (file does contain "w1")'),
        ("Name to assign these images", "OrigDNA"),
        ("Name to assign these objects", "Cell"),
        ("Select the image type", "Grayscale image"),
        ("Select the rule criteria", 'and (file does contain "labels")'),
        ("Name to assign these images", "Unused"),
        ("Name to assign these objects", "Seeds"),
        ("Select the image type", "Objects"),
        ("Select the rule criteria", 'and (file does contain "illum")'),
        ("Name to assign these images", "IllumDNA"),
        ("Name to assign these objects", "Nucleus"),
        ("Select the image type", "Illumination function"),
    ],
)
PRIMARY = (
    "IdentifyPrimaryObjects",
    [("Select the input image", "OrigDNA"), ("Name the primary objects to be identified", "Nuclei")],
)
SECONDARY = (
    "IdentifySecondaryObjects",
    [
        ("Select the input objects", "Nuclei"),
        ("Name the objects to be identified", "Cells"),
        ("Discard secondary objects touching the border of the image?", "Yes"),
        ("Discard the associated primary objects?", "Yes"),
        ("Name the new primary objects", "FilteredNuclei"),
        ("Retain outlines of the identified secondary objects?", "No"),
        ("Name the outline image", "SecondaryOutlines"),
    ],
)


def export(*settings: tuple[str, str]) -> tuple[str, list[tuple[str, str]]]:
    defaults = {
        "Select the column delimiter": 'Comma (",")',
        "Output file location": "Default Output Folder|",
        "Export all measurement types?": "Yes",
        "Add a prefix to file names?": "No",
        "Filename prefix": "MyExpt_",
    }
    own = dict(settings)
    head = [(k, own.pop(k, v)) for k, v in defaults.items()]
    groups = [(k, v) for k, v in settings if k not in defaults]
    return ("ExportToSpreadsheet", head + groups)


def group(
    name: str, combine: bool = False, file_name: str = "DATA.csv", automatic: bool = True
) -> list[tuple[str, str]]:
    return [
        ("Data to export", name),
        ("Combine these object measurements with those of the previous object?", "Yes" if combine else "No"),
        ("File name", file_name),
        ("Use the object name for the file name?", "Yes" if automatic else "No"),
    ]


# -- the real pipelines ---------------------------------------------------------------


def test_example_human(shared_data: Path) -> None:
    p = cppipe.parse_for_sites((shared_data / "example_human" / "ExampleHuman.cppipe").read_bytes())
    assert p.version == 5 and len(p.modules) == 14
    assert p.image_names == ("DNA", "PH3", "cellbody")
    assert p.object_names == ("Nuclei", "PH3", "Cells", "Cytoplasm")
    assert p.tables == ["Image", "Nuclei", "PH3", "Cells", "Cytoplasm"]
    assert p.table_files == ["Image.csv", "Nuclei.csv", "PH3.csv", "Cells.csv", "Cytoplasm.csv"]
    assert [f.path for f in p.exports][0] == "Experiment.csv"


def test_example_percent_positive(shared_data: Path) -> None:
    p = cppipe.parse_for_sites((shared_data / "example_human" / "ExamplePercentPositive.cppipe").read_bytes())
    assert p.image_names == ("OrigBlue", "OrigGreen")
    # FilterObjects makes objects too; RelateObjects does not save a new set here.
    assert p.tables == ["Image", "Nuclei", "PH3", "PH3PosNuclei"]


@pytest.mark.parametrize("path", ["ExampleSBS.cppipe", "derived/ExampleSBS_cp4.cppipe"])
def test_example_sbs_runs_per_plate(shared_data: Path, path: str) -> None:
    content = (shared_data / "bbbc013_translocation_plate" / path).read_bytes()
    p = cppipe.parse(content)
    # Format 3 escapes are read: the v3 file and its CellProfiler 4 copy agree.
    assert p.image_names == ("rawGFP", "rawDNA", "IllumDNA", "IllumGFP")
    assert p.tables == ["Image", "Nuclei", "PropCells", "DistanceCells", "DistCytoplasm"]
    assert p.object_names == ("Nuclei", "PropCells", "DistanceCells", "DistCytoplasm", "PropCytoplasm")
    cppipe.check_runs_per_site(p)
    assert cppipe.decide_scope(p) == (
        cppipe.SCOPE_PLATE,
        ["CalculateStatistics (module 18) computes statistics over all image sets"],
    )
    with pytest.raises(
        PipelineError, match=r"cannot run one site at a time: CalculateStatistics \(module 18\)"
    ):
        cppipe.decide_scope(p, cppipe.SCOPE_SITE)


def test_example_sbs_illumination_runs_per_plate(shared_data: Path) -> None:
    content = (shared_data / "bbbc013_translocation_plate" / "ExampleSBSIllumination.cppipe").read_bytes()
    scope, why = cppipe.decide_scope(cppipe.parse(content))
    assert scope == cppipe.SCOPE_PLATE
    assert why == [
        "CorrectIlluminationCalculate (module 5) calculates its illumination function from all images "
        "('All: Across cycles')",
        "CorrectIlluminationCalculate (module 6) calculates its illumination function from all images "
        "('All: Across cycles')",
    ]


def test_a_site_pipeline_runs_per_plate_when_asked() -> None:
    p = cppipe.parse((REPO / "examples" / "pipelines" / "nuclei.cppipe").read_bytes())
    assert cppipe.decide_scope(p) == (cppipe.SCOPE_SITE, [])
    assert cppipe.decide_scope(p, cppipe.SCOPE_PLATE) == (cppipe.SCOPE_PLATE, ["asked for at registration"])


#: The files each example reads besides its channels (attachments, and the
#: files of the plate stage before it).
EXAMPLE_INPUTS = {
    "nuclei_illum.cppipe": ["IllumDNA.npy"],
    "bbbc013/analysis.cppipe": ["1049_Metadata.csv", "Channel1ILLUM.npy", "Channel2ILLUM.npy"],
}


def test_every_project_example_is_runnable() -> None:
    folder = REPO / "examples" / "pipelines"
    for path in sorted(folder.rglob("*.cppipe")):
        name = path.relative_to(folder).as_posix()
        p = cppipe.parse_for_sites(path.read_bytes(), input_files=EXAMPLE_INPUTS.get(name, ()))
        assert p.image_names, path
        scope, _why = cppipe.decide_scope(p)
        # A plate stage may only save files (its artifacts); a site's analysis exports its tables.
        assert scope == cppipe.SCOPE_PLATE or "Image" in p.tables, path


# -- reading ------------------------------------------------------------------------------


def test_names_and_types_rules_images_objects_and_illumination_functions() -> None:
    p = cppipe.parse(text(NAT, PRIMARY, SECONDARY, export()))
    assert p.image_names == ("OrigDNA", "Seeds", "IllumDNA")
    assert p.object_names == ("Seeds", "Nuclei", "Cells", "FilteredNuclei")
    assert p.tables == ["Image", "Seeds", "Nuclei", "Cells", "FilteredNuclei"]
    assert p.problems == ()


def test_all_images_assigns_one_name() -> None:
    nat = (
        "NamesAndTypes",
        [
            ("Assign a name to", "All images"),
            ("Select the image type", "Grayscale image"),
            ("Name to assign these images", "DNA"),
        ],
    )
    assert cppipe.parse(text(nat, export())).image_names == ("DNA",)


def test_new_primary_objects_only_when_kept() -> None:
    settings = [(k, "No" if k == "Discard the associated primary objects?" else v) for k, v in SECONDARY[1]]
    p = cppipe.parse(text(NAT, PRIMARY, ("IdentifySecondaryObjects", settings), export()))
    assert "FilteredNuclei" not in p.object_names


def test_prefix_delimiter_and_subfolder() -> None:
    p = cppipe.parse(
        text(
            NAT,
            PRIMARY,
            export(
                ("Add a prefix to file names?", "Yes"),
                ("Filename prefix", "Run7_"),
                ("Select the column delimiter", "Tab"),
                ("Output file location", "Default Output Folder sub-folder|tables"),
            ),
        )
    )
    assert p.table_files == ["tables/Run7_Image.txt", "tables/Run7_Seeds.txt", "tables/Run7_Nuclei.txt"]
    assert p.tables == ["Image", "Seeds", "Nuclei"]
    assert p.problems == ()


def test_chosen_tables_combined_objects_and_own_file_names() -> None:
    p = cppipe.parse(
        text(
            NAT,
            PRIMARY,
            SECONDARY,
            export(
                ("Export all measurement types?", "No"),
                ("Add a prefix to file names?", "Yes"),
                *group("Image", file_name="per_image.csv", automatic=False),
                *group("Nuclei"),
                *group("Cells", combine=True),
                *group("Experiment"),
                *group("Seeds", file_name="seeds.csv", automatic=False),
                *group("Do not use"),
            ),
        )
    )
    assert [(f.path, f.objects) for f in p.exports] == [
        ("MyExpt_per_image.csv", ("Image",)),
        ("MyExpt_Nuclei.csv", ("Nuclei", "Cells")),
        ("MyExpt_Experiment.csv", ("Experiment",)),
        ("MyExpt_seeds.csv", ("Seeds",)),
    ]
    assert p.tables == ["Image", "Nuclei", "Seeds"]
    assert p.table_files == ["MyExpt_per_image.csv", "MyExpt_Nuclei.csv", "MyExpt_seeds.csv"]


def test_disabled_modules_do_not_count() -> None:
    p = cppipe.parse(
        text(
            NAT,
            PRIMARY,
            ("CalculateStatistics", [], False),
            (
                "IdentifyPrimaryObjects",
                PRIMARY[1][:1] + [("Name the primary objects to be identified", "Off")],
                False,
            ),
            export(),
        )
    )
    assert p.problems == ()
    assert "Off" not in p.object_names
    assert p.module_names == [
        "NamesAndTypes",
        "IdentifyPrimaryObjects",
        "CalculateStatistics",
        "IdentifyPrimaryObjects",
        "ExportToSpreadsheet",
    ]


def test_format_3_escapes() -> None:
    v3 = text(
        NAT, PRIMARY, export(("Filename prefix\\x3A", "A\\x7CB_"), ("Add a prefix to file names?", "Yes"))
    ).replace("Version:5", "Version:3")
    v3 = v3.replace("Filename prefix:MyExpt_\n", "")
    p = cppipe.parse(v3)
    assert p.table_files[0] == "A|B_Image.csv"


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "hint"),
    [
        ("CreateBatchFiles", "own batch"),
        ("ExportToDatabase", "ExportToSpreadsheet"),
    ],
)
def test_modules_that_run_across_image_sets(module: str, hint: str) -> None:
    with pytest.raises(PipelineError) as refused:
        cppipe.parse_for_sites(text(NAT, PRIMARY, (module, [("x", "y")]), export()))
    assert f"{module} (module 3) runs across all image sets; cellmesh runs one site at a time" in str(
        refused.value
    )
    assert hint in str(refused.value)


@pytest.mark.parametrize(
    ("module", "why"),
    [
        ("CalculateStatistics", "computes statistics over all image sets"),
        ("MakeProjection", "projects the images of all image sets"),
        ("TrackObjects", "tracks objects across image sets"),
    ],
)
def test_modules_that_work_across_image_sets_make_a_plate_stage(module: str, why: str) -> None:
    p = cppipe.parse_for_sites(
        text(NAT, PRIMARY, (module, [("x", "y")]), export()), input_files=["illum.npy"]
    )
    assert cppipe.decide_scope(p) == (cppipe.SCOPE_PLATE, [f"{module} (module 3) {why}"])


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ([("Output file location", "Default Input Folder|")], "writes its tables to 'Default Input Folder'"),
        ([("Output file location", "Elsewhere...|/data/out")], "choose it as the output file location"),
        (
            [("Output file location", "Default Output Folder sub-folder|\\g<Plate>")],
            "folder named with metadata tags",
        ),
        (
            [
                ("Export all measurement types?", "No"),
                *group("Image", file_name="\\g<Well>.csv", automatic=False),
            ],
            "names a file with metadata tags",
        ),
    ],
)
def test_exports_cellmesh_cannot_collect(settings: list[tuple[str, str]], fragment: str) -> None:
    with pytest.raises(PipelineError, match="ExportToSpreadsheet") as refused:
        cppipe.parse_for_sites(text(NAT, PRIMARY, export(*settings)))
    assert fragment in str(refused.value)


def test_a_pipeline_without_export_or_images() -> None:
    with pytest.raises(PipelineError, match="no enabled ExportToSpreadsheet"):
        cppipe.parse_for_sites(text(NAT, PRIMARY))
    with pytest.raises(PipelineError, match="assigns no image names"):
        cppipe.parse_for_sites(text(PRIMARY, export()))


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "the content is empty; first line must be 'CellProfiler Pipeline: "),
        (b"garbage\n", "not a CellProfiler pipeline: first line must be 'CellProfiler Pipeline: "),
        (b'{"version": 6}', "JSON pipeline"),
        (b"\x89HDF\r\n\x1a\n\x00\x00", "project file (.cpproj)"),
        (b"\x00\x01\x02", "not a CellProfiler pipeline"),
        (
            b"CellProfiler Pipeline: http://www.cellprofiler.org\nVersion:1\n",
            "Version:1 is not supported (3 to 6 are)",
        ),
        (b"CellProfiler Pipeline: http://www.cellprofiler.org\nDateRevision:1\n", "no 'Version:' line"),
        (
            b"CellProfiler Pipeline: http://www.cellprofiler.org\nVersion:5\n\nNot a module line\n",
            "line 4 is neither a module",
        ),
        (b"CellProfiler Pipeline: http://www.cellprofiler.org\nVersion:5\nModuleCount:0\n", "has no modules"),
        (b"x" * (4 * 1024 * 1024 + 1), "at most 4194304 (4 MiB)"),
    ],
)
def test_what_is_not_a_pipeline(content: bytes, fragment: str) -> None:
    with pytest.raises(PipelineError) as refused:
        cppipe.parse(content)
    assert fragment in str(refused.value)


def test_module_count_must_match() -> None:
    content = text(NAT, PRIMARY, export()).replace("ModuleCount:3", "ModuleCount:4")
    with pytest.raises(PipelineError, match="ModuleCount:4 but 3 modules follow"):
        cppipe.parse(content)


# -- LoadData and channel binding ---------------------------------------------------


def loaddata(*settings: tuple[str, str]) -> tuple[str, list[tuple[str, str]]]:
    values = dict(
        [
            ("Input data file location", "Default Input Folder|"),
            ("Name of the file", "load_data.csv"),
            ("Load images based on this data?", "Yes"),
            ("Base image location", "None|"),
            ("Process just a range of rows?", "No"),
            ("Rows to process", "1,100000"),
        ]
    )
    values.update(settings)
    return ("LoadData", list(values.items()))


def test_a_loaddata_pipeline_is_accepted_and_says_where_it_reads_its_csv() -> None:
    p = cppipe.parse_for_sites(text(loaddata(), PRIMARY, export()))
    assert p.loaddata == ("load_data.csv",)
    assert p.image_names == ()  # the plate's channels give them
    p = cppipe.parse_for_sites(
        text(
            loaddata(("Input data file location", "Default Input Folder sub-folder|csv/x")), PRIMARY, export()
        )
    )
    assert p.loaddata == ("csv/x/load_data.csv",)


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        (
            ("Input data file location", "Default Output Folder|"),
            "'Input data file location' is 'Default Output Folder'",
        ),
        (
            ("Input data file location", "Elsewhere...|/home/ubuntu/csvs"),
            "'Input data file location' is 'Elsewhere...'",
        ),
        (("Input data file location", "Elsewhere...|"), "'Input data file location' is 'Elsewhere...'"),
        (("Input data file location", "URL|http://x/load.csv"), "'Input data file location' is 'URL'"),
        (("Input data file location", "Default Input Folder sub-folder|../up"), "leads out of its folder"),
        (("Name of the file", "../load_data.csv"), "'Name of the file' leads out of its folder"),
        (("Name of the file", "/tmp/load_data.csv"), "'Name of the file' is an absolute path"),
        (("Name of the file", ""), "'Name of the file' is empty"),
        (("Process just a range of rows?", "Yes"), None),
    ],
)
def test_loaddata_csv_locations_outside_the_input_folder_are_refused(
    setting: tuple[str, str], fragment: str | None
) -> None:
    content = text(loaddata(setting), PRIMARY, export())
    if fragment is None:  # a range from row 1 is fine
        cppipe.parse_for_sites(content)
        return
    with pytest.raises(PipelineError) as refused:
        cppipe.parse_for_sites(content)
    assert "LoadData (module 1)" in str(refused.value)
    assert fragment in str(refused.value)


def test_loaddata_rows_after_the_first_and_two_input_modules_are_refused() -> None:
    rows = text(
        loaddata(("Process just a range of rows?", "Yes"), ("Rows to process", "3,10")), PRIMARY, export()
    )
    with pytest.raises(PipelineError, match="processes only rows from 3 on"):
        cppipe.parse_for_sites(rows)
    with pytest.raises(PipelineError, match="keep one NamesAndTypes or one LoadData"):
        cppipe.parse_for_sites(text(NAT, loaddata(), PRIMARY, export()))


def test_bind_channels_replaces_only_the_rules_and_the_matching_method(shared_data: Path) -> None:
    source = (shared_data / "example_human" / "ExampleHuman.cppipe").read_text()
    source = source.replace("Image set matching method:Order", "Image set matching method:Metadata")
    p = cppipe.parse(source)
    bound = cppipe.bind_channels(p)
    changed = [(a, b) for a, b in zip(source.splitlines(), bound.splitlines(), strict=True) if a != b]
    assert changed == [
        ("    Image set matching method:Metadata", "    Image set matching method:Order"),
        (
            '    Select the rule criteria:and (file does contain "d0.tif")',
            '    Select the rule criteria:and (directory does endwith "/DNA")',
        ),
        (
            '    Select the rule criteria:and (file does contain "d1.tif")',
            '    Select the rule criteria:and (directory does endwith "/PH3")',
        ),
        (
            '    Select the rule criteria:and (file does contain "d2.tif")',
            '    Select the rule criteria:and (directory does endwith "/cellbody")',
        ),
    ]
    assert cppipe.parse(bound).image_names == p.image_names


def test_namesandtypes_single_images_are_refused(shared_data: Path) -> None:
    source = (shared_data / "example_human" / "ExampleHuman.cppipe").read_text()
    source = source.replace("Single images count:0", "Single images count:1")
    with pytest.raises(PipelineError, match="assigns 1 single image"):
        cppipe.parse_for_sites(source)


def grouped(text: str, *categories: str, enabled: bool = True) -> str:
    """`text` with its Groups module set to group by `categories`."""
    head = "Groups:[module_num:4"
    start = text.index(head)
    end = text.index("\n\n", start)
    block = text[start:end]
    first = block.splitlines()[0]
    if not enabled:
        first = first.replace("enabled:True", "enabled:False")
    lines = [
        first,
        "    Do you want to group your images?:Yes",
        f"    grouping metadata count:{len(categories)}",
    ]
    lines += [f"    Metadata category:{c}" for c in categories]
    return text[:start] + "\n".join(lines) + text[end:]


def test_grouping_keys_come_from_the_groups_module_when_it_groups() -> None:
    illum = (REPO / "examples" / "pipelines" / "illum_dna.cppipe").read_text()
    assert cppipe.grouping_keys(cppipe.parse(illum)) == []
    assert cppipe.grouping_keys(cppipe.parse(grouped(illum, "Well"))) == ["Well"]
    assert cppipe.grouping_keys(cppipe.parse(grouped(illum, "Plate", "Compound"))) == ["Plate", "Compound"]
    # A disabled Groups module does not group; "None" is no key.
    assert cppipe.grouping_keys(cppipe.parse(grouped(illum, "Well", enabled=False))) == []
    assert cppipe.grouping_keys(cppipe.parse(grouped(illum, "None"))) == []
    # Saying Yes but keeping the categories of a "No" leaves it ungrouped too.
    no = illum.replace("Do you want to group your images?:No", "Do you want to group your images?:Yes")
    assert cppipe.grouping_keys(cppipe.parse(no)) == []


def test_grouping_keys_of_a_loaddata_pipeline() -> None:
    def loaddata(group: str, tags: str) -> str:
        return (
            "CellProfiler Pipeline: http://www.cellprofiler.org\nVersion:5\nDateRevision:421\nGitHash:\n"
            "ModuleCount:1\nHasImagePlaneDetails:False\n\n"
            "LoadData:[module_num:1|svn_version:'Unknown'|variable_revision_number:6|show_window:False|"
            "notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]\n"
            "    Input data file location:Default Input Folder|\n"
            "    Name of the file:load_data.csv\n"
            "    Load images based on this data?:Yes\n"
            "    Base image location:None|\n"
            "    Process just a range of rows?:No\n"
            "    Rows to process:1,100000\n"
            f"    Group images by metadata?:{group}\n"
            f"    Select metadata tags for grouping:{tags}\n"
            "    Rescale intensities?:Yes\n"
        )

    assert cppipe.grouping_keys(cppipe.parse(loaddata("Yes", "Plate,Well"))) == ["Plate", "Well"]
    assert cppipe.grouping_keys(cppipe.parse(loaddata("No", "Plate,Well"))) == []
