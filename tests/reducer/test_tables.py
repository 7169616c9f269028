"""Reading one site's ExportToSpreadsheet table: header forms, delimiters,
values CellProfiler writes, and the site identity the reducer adds."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow as pa
import pytest

from services.reducer import testdata
from services.reducer.tables import (
    TableError,
    normalize_well,
    read_site_table,
    read_table,
    row_label,
    well_position,
)


def test_well_names_normalise_and_place() -> None:
    assert normalize_well("b3") == "B03"
    assert normalize_well("B03") == "B03"
    assert normalize_well(" P24 ") == "P24"
    assert well_position("A01") == (0, 0)
    assert well_position("H12") == (7, 11)
    assert well_position("AF48") == (31, 47)
    assert [row_label(r) for r in (0, 25, 26, 31)] == ["A", "Z", "AA", "AF"]
    for bad in ("", "A", "3B", "A00", "ABC1"):
        with pytest.raises(ValueError):
            normalize_well(bad)


def test_one_row_header_with_cellprofiler_values() -> None:
    data = (
        b"ImageNumber,ObjectNumber,AreaShape_Area,Intensity_Mean,Location_Center_X,Metadata_AbsTime,FileName\r\n"
        b"1,1,120.0,nan,10.5,2021-04-07T17:32:25.107-04:00,a b.tif\r\n"
        b'1,2,95.0,inf,11.5,2021-04-07T17:32:26.000-04:00,"c,d.tif"\r\n'
        b"1,3,,-Inf,12.5,,x.tif\r\n"
    )
    table, header = read_table(data)
    assert header.rows == 1 and header.delimiter == ","
    assert table.num_rows == 3
    assert table.schema.field("ImageNumber").type == pa.int64()
    assert table.schema.field("AreaShape_Area").type == pa.float64()
    assert table.column("AreaShape_Area").to_pylist() == [120.0, 95.0, None]
    mean = table.column("Intensity_Mean").to_pylist()
    assert mean[0] is None and mean[1] == math.inf and mean[2] == -math.inf
    # Time stamps stay as written (never converted to UTC), text keeps commas.
    assert table.schema.field("Metadata_AbsTime").type == pa.string()
    assert table.column("Metadata_AbsTime").to_pylist()[0] == "2021-04-07T17:32:25.107-04:00"
    assert table.column("FileName").to_pylist() == ["a b.tif", "c,d.tif", "x.tif"]


def test_two_row_header_names_columns_object_feature() -> None:
    data = (
        b"Image,Nuclei,Nuclei,Cells,Cells,Image\r\n"
        b"ImageNumber,ObjectNumber,AreaShape_Area,ObjectNumber,AreaShape_Area,Metadata_Well\r\n"
        b"1,1,100.0,1,300.0,A01\r\n"
        b"1,2,110.0,2,320.0,A01\r\n"
    )
    table, header = read_table(data)
    assert header.rows == 2
    assert table.column_names == [
        "ImageNumber",
        "ObjectNumber",
        "Nuclei_AreaShape_Area",
        "Cells_ObjectNumber",
        "Cells_AreaShape_Area",
        "Metadata_Well",
    ]
    assert header.prefixed == {"Nuclei_AreaShape_Area", "Cells_ObjectNumber", "Cells_AreaShape_Area"}
    assert table.column("Cells_AreaShape_Area").to_pylist() == [300.0, 320.0]


def test_tab_delimited_and_byte_order_mark() -> None:
    data = b"\xef\xbb\xbfImageNumber\tObjectNumber\tAreaShape_Area\n1\t1\t5.5\n1\t2\t6.5\n"
    table, header = read_table(data)
    assert header.delimiter == "\t"
    assert table.column_names == ["ImageNumber", "ObjectNumber", "AreaShape_Area"]
    assert table.column("AreaShape_Area").to_pylist() == [5.5, 6.5]


def test_header_only_table_has_no_rows() -> None:
    table, _ = read_table(b"ImageNumber,ObjectNumber,AreaShape_Area\r\n")
    assert table.num_rows == 0 and table.num_columns == 3


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n",
        b"ImageNumber,ObjectNumber,A\r\n1,1\r\n",  # a row cut short
        b"ImageNumber,ObjectNumber,A\r\n1,1,2,3\r\n",
        b"ImageNumber,A,A\r\n1,2,3\r\n",  # the same column twice
    ],
)
def test_malformed_tables_are_refused(data: bytes) -> None:
    with pytest.raises(TableError):
        read_table(data)


def test_site_identity_is_added_and_compared() -> None:
    data = testdata.image_csv(
        {"Cells": 40},
        image_number=7,
        metadata={"Metadata_Well": "b3", "Metadata_Plate": "barcode-1", "Metadata_Site": 2},
    )
    site = read_site_table(data, "P1", "B03", 2)
    t = site.table
    assert t.column_names[:5] == [
        "Metadata_Plate",
        "Metadata_Well",
        "Metadata_Site",
        "Metadata_SiteKey",
        "Metadata_ImageKey",
    ]
    row = t.to_pylist()[0]
    assert row["Metadata_Plate"] == "P1" and row["Metadata_Well"] == "B03" and row["Metadata_Site"] == 2
    assert row["Metadata_SiteKey"] == "P1/B03/2" and row["Metadata_ImageKey"] == "P1/B03/2/7"
    assert row["ImageNumber"] == 7  # the original is kept
    # "b3" is B03: agreed, replaced. The plate differs: kept as Metadata_Source_Plate and reported.
    assert "Metadata_Source_Well" not in t.column_names and "Metadata_Source_Site" not in t.column_names
    assert row["Metadata_Source_Plate"] == "barcode-1"
    assert set(site.mismatches) == {"Metadata_Plate"}
    assert "barcode-1" in site.mismatches["Metadata_Plate"]


def test_jump_image_table_reads_whole(shared_data: Path) -> None:
    path = shared_data / "jump_target2_per_site_csv/analysis/BR00121431-A01-1/Image.csv"
    site = read_site_table(path.read_bytes(), "BR00121431", "A01", 1)
    assert site.table.num_rows == 1
    assert site.table.num_columns == 1917 + 2  # + SiteKey, ImageKey; Plate/Well/Site replaced
    assert site.mismatches == {}
    row = site.table.to_pylist()[0]
    assert row["Count_Cells"] == 89 and row["ImageNumber"] == 1
    assert row["Metadata_ImageKey"] == "BR00121431/A01/1/1"
