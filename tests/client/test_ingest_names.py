"""File names to sites and channels, keys, the folder scan and the
"still being written" rule: plain functions, no server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cellmesh.ingest import (
    FileNameParser,
    ImageFile,
    ParsedName,
    StabilityTracker,
    image_key,
    normalize_well,
    parse_channel_map,
    read_if_unchanged,
    scan_folder,
    well_name,
)

BBBC013 = r"Channel(?P<Channel>\d)-(?P<ImageNumber>\d+)-(?P<WellRow>[A-P])-(?P<WellColumn>\d+)\.tif"
HUMAN_README = (
    r"^(?P<Prefix>AS_\d+)_(?P<Plate>\d+)_(?P<Well>[A-P]\d{2})f(?P<Site>\d{2})d(?P<Channel>\d)\.tif$"
)


def test_wells_are_row_letters_and_two_digit_columns() -> None:
    assert well_name("a", "1") == "A01"
    assert well_name("P", 24) == "P24"
    assert well_name("AF", "48") == "AF48"
    assert normalize_well("D3") == "D03"
    assert normalize_well("d003") == "D03"
    for bad in ("3D", "A", "A0", "ABC1", "AG01", "ZZ01", "A49"):
        with pytest.raises(ValueError):
            normalize_well(bad)


def test_channel_map() -> None:
    assert parse_channel_map("1=GFP, 2=DNA") == {"1": "GFP", "2": "DNA"}
    assert parse_channel_map("") == {}
    assert parse_channel_map(None) == {}
    for bad in ("1", "1=", "=GFP", "1=GFP,1=DNA"):
        with pytest.raises(ValueError):
            parse_channel_map(bad)


def test_key_layout() -> None:
    assert (
        image_key("P1", "A01", 0, "GFP", "Channel1-01-A-01.tif")
        == "images/P1/A01/s0/GFP/Channel1-01-A-01.tif"
    )
    image = ImageFile(Path("/x/Channel2-13-B-01.tif"), "P1", "B01", 3, "DNA", 10, 1)
    assert image.key == "images/P1/B01/s3/DNA/Channel2-13-B-01.tif"
    assert image.slot == ("P1", "B01", 3, "DNA")


def test_bbbc013_names_with_well_row_and_column() -> None:
    parser = FileNameParser(BBBC013, plate="P1", channel_map={"1": "GFP", "2": "DNA"})
    # ImageNumber is neither site nor channel: it is the site's metadata.
    assert parser.parse("Channel1-01-A-01.tif") == ParsedName("P1", "A01", 0, "GFP", {"ImageNumber": "01"})
    assert parser.parse("Channel2-48-D-12.tif") == ParsedName("P1", "D12", 0, "DNA", {"ImageNumber": "48"})
    assert parser.parse("Channel1ILLUM.mat") == "does not match the pattern"
    assert "not in the channel map" in str(parser.parse("Channel3-01-A-01.tif"))


def test_default_site_and_raw_channel_without_a_map() -> None:
    parser = FileNameParser(BBBC013, plate="P1", site=2)
    assert parser.parse("Channel1-01-A-01.tif") == ParsedName("P1", "A01", 2, "1", {"ImageNumber": "01"})


def test_plate_and_site_groups() -> None:
    parser = FileNameParser(HUMAN_README, channel_map={"0": "DNA", "1": "PH3", "2": "cellbody"})
    assert parser.parse("AS_09125_050116030001_D03f00d2.tif") == ParsedName(
        "050116030001", "D03", 0, "cellbody", {"Prefix": "AS_09125"}
    )
    assert parser.parse("AS_09125_050116030001_D03f07d0.tif") == ParsedName(
        "050116030001", "D03", 7, "DNA", {"Prefix": "AS_09125"}
    )


def test_other_groups_are_the_site_s_metadata() -> None:
    parser = FileNameParser(
        r"^(?P<Well>[A-P]\d{2})_s(?P<Site>\d)_(?P<Channel>[A-Z]+)_(?P<Timepoint>T\d+)(_(?P<Compound>\w+))?\.tif$",
        plate="P1",
    )
    assert parser.parse("B02_s1_DNA_T03_taxol.tif") == ParsedName(
        "P1", "B02", 1, "DNA", {"Timepoint": "T03", "Compound": "taxol"}
    )
    # An optional group that did not match is not metadata (not an empty value).
    assert parser.parse("B02_s1_GFP_T03.tif") == ParsedName("P1", "B02", 1, "GFP", {"Timepoint": "T03"})
    # asked for another plate: reported, not put into the file name's plate
    other = FileNameParser(HUMAN_README, plate="P9", channel_map={"0": "DNA"})
    assert "not the plate asked for" in str(other.parse("AS_09125_050116030001_D03f00d0.tif"))


@pytest.mark.parametrize(
    ("pattern", "plate", "message"),
    [
        (r"(?P<Well>\w+)", "P1", "Channel"),
        (r"(?P<Channel>\d)-(?P<WellRow>[A-P])", "P1", "Well"),
        (r"(?P<Channel>\d)-(?P<Well>\w+)", None, "Plate"),
        (r"(?P<Channel>\d", "P1", "not a regular expression"),
    ],
)
def test_patterns_that_cannot_work_are_refused(pattern: str, plate: str | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FileNameParser(pattern, plate=plate)


def test_scan_reports_unmatched_files_and_duplicates(tmp_path: Path) -> None:
    for name in (
        "Channel1-01-A-01.tif",
        "Channel2-01-A-01.tif",
        "Channel1-99-A-01.tif",
        "notes.txt",
        "x.mat",
    ):
        (tmp_path / name).write_bytes(b"img")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "Channel1-02-A-02.tif").write_bytes(b"img")
    parser = FileNameParser(BBBC013, plate="P1", channel_map={"1": "GFP", "2": "DNA"})

    scan = scan_folder(tmp_path, parser)
    assert [i.file_name for i in scan.images] == ["Channel1-01-A-01.tif", "Channel2-01-A-01.tif"]
    reasons = {u.path.name: u.reason for u in scan.unmatched}
    assert reasons["notes.txt"] == reasons["x.mat"] == "does not match the pattern"
    assert reasons["Channel1-99-A-01.tif"] == "same plate, well, site and channel as Channel1-01-A-01.tif"

    deep = scan_folder(tmp_path, parser, recursive=True)
    assert "Channel1-02-A-02.tif" in [i.file_name for i in deep.images]


def test_scan_of_shared_bbbc013(shared_data: Path) -> None:
    parser = FileNameParser(BBBC013, plate="P1", channel_map={"1": "GFP", "2": "DNA"})
    scan = scan_folder(shared_data / "bbbc013_translocation_plate" / "images", parser)
    assert len(scan.images) == 96
    assert len({i.well for i in scan.images}) == 48
    assert sorted(u.path.name for u in scan.unmatched) == [
        "1049_Metadata.csv",
        "Channel1ILLUM.mat",
        "Channel2ILLUM.mat",
    ]


def _image(path: Path) -> ImageFile:
    st = path.stat()
    return ImageFile(path, "P1", "A01", 0, "GFP", st.st_size, st.st_mtime_ns)


def test_a_growing_file_is_not_stable_until_two_scans_agree(tmp_path: Path) -> None:
    done, growing, empty = tmp_path / "done.tif", tmp_path / "growing.tif", tmp_path / "empty.tif"
    done.write_bytes(b"a" * 100)
    growing.write_bytes(b"b" * 10)
    empty.write_bytes(b"")
    tracker = StabilityTracker()

    stable, changing = tracker.split([_image(done), _image(growing), _image(empty)])
    assert stable == [] and len(changing) == 3  # first sight: nothing is known yet

    with growing.open("ab") as fh:
        fh.write(b"b" * 10)
    stable, changing = tracker.split([_image(done), _image(growing), _image(empty)])
    assert [i.path for i in stable] == [done]
    assert {i.path for i in changing} == {growing, empty}  # grew; empty files are never taken

    stable, changing = tracker.split([_image(done), _image(growing), _image(empty)])
    assert {i.path for i in stable} == {done, growing}


def test_a_file_that_changes_after_the_scan_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "a.tif"
    path.write_bytes(b"x" * 10)
    image = _image(path)
    assert read_if_unchanged(image) == b"x" * 10
    with path.open("ab") as fh:
        fh.write(b"more")
    assert read_if_unchanged(image) is None
    path.write_bytes(b"y" * 10)  # same size, newer time
    os.utime(path, ns=(image.mtime_ns + 10**9, image.mtime_ns + 10**9))
    assert read_if_unchanged(image) is None
    path.unlink()
    assert read_if_unchanged(image) is None
