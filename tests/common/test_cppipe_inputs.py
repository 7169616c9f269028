"""The files a pipeline reads besides its channel images: which ones, and the
messages that refuse a pipeline whose files are not attached."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common import cppipe
from services.common.cppipe import PipelineError
from tests.common.test_cppipe import export, text

SBS = Path("bbbc013_translocation_plate/derived/ExampleSBS_cp4.cppipe")
NAT = (
    "NamesAndTypes",
    [
        ("Assign a name to", "Images matching rules"),
        ("Select the rule criteria", 'and (file does contain "DNA")'),
        ("Name to assign these images", "DNA"),
        ("Select the image type", "Grayscale image"),
        ("Select the rule criteria", 'and (file does startwith "illum") (file does endwith ".npy")'),
        ("Name to assign these images", "IllumDNA"),
        ("Select the image type", "Illumination function"),
    ],
)
IMAGES = (
    "Images",
    [
        ("Filter images?", "Custom"),
        ("Select the rule criteria", 'or (extension does istif) (file does endwith ".npy")'),
    ],
)


def metadata(
    location: str = "Default Input Folder|", name: str = "plate_map.csv", method: str = "Import from file"
) -> tuple[str, list[tuple[str, str]]]:
    return (
        "Metadata",
        [
            ("Extract metadata?", "Yes"),
            ("Metadata extraction method", method),
            ("Regular expression to extract from file name", "^(?P<Well>[A-P][0-9]{2})_"),
            ("Metadata file location", location),
            ("Match file and image metadata", "[]"),
            ("Metadata file name", name),
        ],
    )


def problems(content: str, attached: tuple[str, ...] = ()) -> list[str]:
    return cppipe.input_file_problems(cppipe.parse(content), attached)


def test_example_sbs_needs_its_csv_and_both_illumination_functions(shared_data: Path) -> None:
    pipeline = cppipe.parse((shared_data / SBS).read_bytes())
    found = cppipe.input_file_problems(pipeline, ())
    assert found[0] == (
        "`Metadata` (module 2) setting 'Metadata file name' imports 1049_Metadata.csv from the Default "
        "Input Folder, which is not attached: attach it with --attach 1049_Metadata.csv"
    )
    assert (
        "IllumDNA" in found[1]
        and '(file does endwith ".mat")' in found[1]
        and "--attach Channel1.mat" in found[1]
    )
    assert "IllumGFP" in found[2] and len(found) == 3
    attached = ("1049_Metadata.csv", "Channel1ILLUM.mat", "Channel2ILLUM.mat")
    assert cppipe.input_file_problems(pipeline, attached) == []
    assert cppipe.bound_images(pipeline, attached) == {
        "IllumDNA": ["Channel1ILLUM.mat"],
        "IllumGFP": ["Channel2ILLUM.mat"],
    }


def test_attached_illumination_function_is_not_a_channel() -> None:
    content = text(IMAGES, NAT, export())
    with pytest.raises(
        PipelineError, match=r"assigns IllumDNA to an illumination function .* e\.g\. --attach illum\.npy"
    ):
        cppipe.parse_for_sites(content)
    p = cppipe.parse_for_sites(content, input_files=["illum_1.npy"])
    assert p.image_names == ("DNA",)


def test_the_images_filter_must_pass_an_assigned_attachment() -> None:
    images = ("Images", [("Filter images?", "Images only"), ("Select the rule criteria", "")])
    found = problems(text(images, NAT, export()), ("illum_1.npy",))
    assert "filter drops the attachment illum_1.npy" in found[-1]
    assert (
        problems(text(("Images", [("Filter images?", "No filtering")]), NAT, export()), ("illum_1.npy",))
        == []
    )


def test_an_attachment_a_channel_rule_matches_is_refused() -> None:
    found = problems(text(IMAGES, NAT, export()), ("illum_1.npy", "DNA_background.npy"))
    assert len(found) == 1
    assert "assigns DNA to files matching 'and (file does contain \"DNA\")', which the input file" in found[0]
    assert "DNA_background.npy matches too" in found[0]


def test_two_attachments_for_one_image_name_are_refused() -> None:
    found = problems(text(IMAGES, NAT, export()), ("illum_a.npy", "illum_b.npy"))
    assert len(found) == 1 and "several attachments match (illum_a.npy, illum_b.npy)" in found[0]


def test_metadata_import_reads_from_the_input_folder_or_a_subfolder() -> None:
    assert problems(text(metadata(), NAT, export()), ("plate_map.csv", "illum.npy")) == []
    sub = metadata("Default Input Folder sub-folder|maps", "p.csv")
    assert problems(text(sub, NAT, export()), ("maps/p.csv", "illum.npy")) == []
    found = problems(text(sub, NAT, export()), ("p.csv", "illum.npy"))
    assert found == [
        "`Metadata` (module 1) setting 'Metadata file name' imports maps/p.csv from the Default Input "
        "Folder, which is not attached: attach it with --attach maps/p.csv"
    ]


def test_metadata_import_from_the_output_folder_or_elsewhere_is_refused() -> None:
    for location, folder in (
        ("Default Output Folder|", "Default Output Folder"),
        ("Elsewhere...|", "Elsewhere"),
    ):
        found = problems(text(metadata(location), NAT, export()), ("plate_map.csv", "illum.npy"))
        assert len(found) == 1 and f"imports plate_map.csv from the {folder}" in found[0], found
        assert "choose 'Default Input Folder'" in found[0]


def test_unused_settings_are_not_reads() -> None:
    assert (
        problems(text(metadata(method="Extract from file/folder names"), NAT, export()), ("illum.npy",)) == []
    )
    off = ("Metadata", [("Extract metadata?", "No"), *metadata()[1][1:]])
    assert problems(text(off, NAT, export()), ("illum.npy",)) == []


def test_worm_training_set_and_filter_rules() -> None:
    worms = (
        "UntangleWorms",
        [
            ("Select the input binary image", "Mask"),
            ("Train or untangle worms?", "Untangle"),
            ("Training set file location", "Default Input Folder|"),
            ("Training set file name", "DefaultWormModel.xml"),
        ],
    )
    found = problems(text(worms, export()))
    assert found == [
        "`UntangleWorms` (module 1) setting 'Training set file name' reads its worm training set "
        "DefaultWormModel.xml from the Default Input Folder, which is not attached: attach it with "
        "--attach DefaultWormModel.xml"
    ]
    assert problems(text(worms, export()), ("DefaultWormModel.xml",)) == []
    training = ("UntangleWorms", [(k, "Train" if k.startswith("Train or") else v) for k, v in worms[1]])
    assert problems(text(training, export())) == []
    rules = [
        ("Select the filtering mode", "Measurements"),
        ("Select the location of the rules or classifier file", "Default Input Folder|"),
        ("Rules file name", "rules.txt"),
    ]
    assert problems(text(("FilterObjects", rules), export())) == []
    rules[0] = ("Select the filtering mode", "Rules")
    assert "reads rules.txt" in problems(text(("FilterObjects", rules), export()))[0]


def test_input_names() -> None:
    assert cppipe.check_input_name("illum/Channel1ILLUM.mat") is None
    for bad in ("", "../x", "/abs", "a//b", ".hidden", "a\\b", "x" * 256, "a/ b"):
        assert cppipe.check_input_name(bad), bad


@pytest.mark.parametrize(
    ("rule", "name", "expected"),
    [
        ('and (file does contain "Channel1") (file does endwith ".mat")', "Channel1ILLUM.mat", True),
        ('and (file does contain "Channel1") (file does endwith ".mat")', "Channel2ILLUM.mat", False),
        ('or (extension does istif) (file does endwith ".mat")', "a.mat", True),
        ('or (extension does istif) (file does endwith ".mat")', "a.TIFF", True),
        ('and (extension does isimage) (directory doesnot containregexp "[\\\\/]\\.")', "a.npy", False),
        ('and (extension does isimage) (directory doesnot containregexp "[\\\\/]\\.")', "a.tif", None),
        (
            'and (file doesnot contain "x") (or (file does startwith "a") (file does eq "b.csv"))',
            "b.csv",
            True,
        ),
        ('and (file does containregexp "^il+um_[0-9]\\.npy$")', "illum_1.npy", True),
        ('and (metadata does Well "A01")', "x.npy", None),
        ('and (file does contain "a\\"b")', 'xa"b', True),
    ],
)
def test_rules_are_read_like_cellprofiler(rule: str, name: str, expected: bool | None) -> None:
    assert cppipe.rule_matches(cppipe.parse_rule(rule), name) is expected


def test_a_pipeline_that_only_saves_images_is_valid() -> None:
    save = (
        "SaveImages",
        [("Select the type of image to save", "Image"), ("Select the image to save", "DNA")],
    )
    p = cppipe.parse_for_sites(text(("NamesAndTypes", NAT[1][:4]), save))
    assert p.tables == [] and p.table_files == []
    with pytest.raises(PipelineError, match="the pipeline writes no files"):
        cppipe.parse_for_sites(text(("NamesAndTypes", NAT[1][:4])))


def test_all_images_with_an_input_file_that_passes_the_filter_is_refused() -> None:
    nat = ("NamesAndTypes", [("Assign a name to", "All images"), ("Name to assign these images", "DNA")])
    images = ("Images", [("Filter images?", "No filtering")])
    found = problems(text(images, nat, export()), ("plate_map.csv",))
    assert len(found) == 1 and "lets the input file plate_map.csv through" in found[0]
    only = ("Images", [("Filter images?", "Images only")])
    assert problems(text(only, nat, export()), ("plate_map.csv",)) == []
