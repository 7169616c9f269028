"""services.common.validate: the checks every registration goes through."""

from __future__ import annotations

import pytest

from services.common import validate
from services.common.validate import Invalid


@pytest.mark.parametrize(
    ("well", "position"),
    [
        ("A01", (0, 1)),
        ("H12", (7, 12)),
        ("P24", (15, 24)),
        ("Z48", (25, 48)),
        ("AA01", (26, 1)),
        ("AF48", (31, 48)),
    ],
)
def test_wells(well: str, position: tuple[int, int]) -> None:
    assert validate.parse_well(well) == position
    assert validate.well_name(*position) == well


@pytest.mark.parametrize("well", ["A1", "A001", "a01", "AG01", "BA01", "A00", "A49", "", "01", "A-1"])
def test_bad_wells(well: str) -> None:
    with pytest.raises(Invalid, match=rf"well '{well}' is not like A01..AF48"):
        validate.parse_well(well)


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("", "is required"),
        ("/abs/a.tif", "starts with '/'"),
        ("a/../b.tif", "contains '..'"),
        ("..", "contains '..'"),
        ("a\\b.tif", "backslash"),
        ("a\nb", "control characters"),
        ("k" * 1025, "at most 1024"),
    ],
)
def test_bad_keys(key: str, fragment: str) -> None:
    with pytest.raises(Invalid, match=fragment):
        validate.check_key(key)


def test_good_values() -> None:
    assert validate.check_key("images/P1/A01/s0/DNA/x..y.tif") == "images/P1/A01/s0/DNA/x..y.tif"
    assert validate.check_key("k" * 1024)
    assert validate.check_sha256("0" * 64)
    assert validate.check_plate_name("BR00121431.v2-a_b")
    assert validate.check_channel_name("Ch1_DNA")
    assert validate.check_file_name("r01c01f01p01-ch1sk1fk1fl1.tiff")
    assert validate.check_batch_size(10_000) == 10_000


@pytest.mark.parametrize(
    ("check", "value", "fragment"),
    [
        (validate.check_sha256, "", "checksum is required"),
        (validate.check_sha256, "F" * 64, "64 lowercase hex digits"),
        (validate.check_sha256, "0" * 63, "64 lowercase hex digits"),
        (validate.check_size, -1, "negative"),
        (validate.check_site, -2, "negative"),
        (validate.check_file_name, "a/b.tif", "has a folder in it"),
        (validate.check_file_name, "..", "not a file name"),
        (validate.check_plate_name, "plate one", "1 to 64 letters"),
        (validate.check_channel_name, "_DNA", "start with a letter"),
        (validate.check_channel_name, "D" * 33, "up to 31"),
        (validate.check_batch_size, 10_001, "at most 10000 images per call; split the batch"),
    ],
)
def test_bad_values(check: object, value: object, fragment: str) -> None:
    with pytest.raises(Invalid, match=fragment):
        check(value)  # type: ignore[operator]
