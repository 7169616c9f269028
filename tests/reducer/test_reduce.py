"""reduce_plate on real JUMP per-site tables (checked against pycytominer) and
on generated tables with known values."""

from __future__ import annotations

import csv
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pycytominer import aggregate

from services.reducer import testdata
from services.reducer.reduce import (
    FileKind,
    FileRef,
    MissingSite,
    ReduceOptions,
    SiteInput,
    UnknownFeature,
    reduce_plate,
)

JUMP = "jump_target2_per_site_csv/analysis"
STRATA = ["Metadata_Plate", "Metadata_Well"]


class Store:
    """Result files in memory, fetched by key like the object store."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.fetched: list[str] = []

    def put(self, key: str, data: bytes) -> FileRef:
        self.blobs[key] = data
        return FileRef(key, hashlib.sha256(data).hexdigest(), len(data))

    async def fetch(self, key: str, sha256: str) -> bytes:
        self.fetched.append(key)
        try:
            return self.blobs[key]
        except KeyError:
            raise LookupError(f"{key}: no such object") from None


def read_wells(path: Path) -> dict[str, dict[str, float | str]]:
    """wells_<table>.csv by well, numbers parsed exactly."""
    out: dict[str, dict[str, float | str]] = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            parsed: dict[str, float | str] = {}
            for k, v in row.items():
                parsed[k] = v if k in STRATA else (float(v) if v else math.nan)
            out[row["Metadata_Well"]] = parsed
    return out


# --------------------------------------------------------------------------
# Real per-site tables: JUMP-Target-2, plate BR00121431


def jump_sites(shared_data: Path, store: Store) -> tuple[list[SiteInput], list[Path]]:
    files = sorted((shared_data / JUMP).glob("*/Image.csv"))
    sites = []
    for path in files:
        plate, well, site = path.parent.name.split("-")
        ref = store.put(f"results/{plate}/{well}/s{site}/Image.csv", path.read_bytes())
        sites.append(SiteInput(plate, well, int(site), {"Image": ref}))
    return sites, files


def cytominer_names(df: pd.DataFrame) -> pd.DataFrame:
    """The naming pycytominer expects of an Image table (as cytominer-database
    and CytoTable write it): Metadata_* kept, ImageNumber as
    Metadata_ImageNumber, every other column prefixed with Image_."""
    names = {}
    for c in df.columns:
        if c.startswith("Metadata_"):
            names[c] = c
        elif c == "ImageNumber":
            names[c] = "Metadata_ImageNumber"
        else:
            names[c] = f"Image_{c}"
    return df.rename(columns=names)


def pycytominer_wells(df: pd.DataFrame) -> pd.DataFrame:
    return aggregate(
        cytominer_names(df),
        strata=STRATA,
        features="infer",
        image_features=True,
        operation="median",
        compute_object_count=True,
        object_feature="Metadata_ImageNumber",
    )


def assert_same_wells(ours: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(ours.columns[:3]) == ["Metadata_Plate", "Metadata_Well", "Metadata_Object_Count"]
    assert set(ours.columns) == set(expected.columns)
    ours = ours.sort_values(STRATA).reset_index(drop=True)
    expected = expected.sort_values(STRATA).reset_index(drop=True)
    assert ours[STRATA].astype(str).equals(expected[STRATA].astype(str))
    features = [c for c in expected.columns if c not in STRATA]
    assert len(features) > 1800
    for column in features:
        np.testing.assert_allclose(
            ours[column].to_numpy(dtype=float),
            expected[column].to_numpy(dtype=float),
            rtol=1e-12,
            atol=0,
            equal_nan=True,
            err_msg=column,
        )


async def test_jump_sites_concatenate_with_unique_keys(tmp_path: Path, shared_data: Path) -> None:
    store = Store()
    sites, _ = jump_sites(shared_data, store)
    out = await reduce_plate(sites, store.fetch, tmp_path)

    image = pq.read_table(tmp_path / "Image.parquet").to_pandas()
    assert len(image) == 4
    assert image["Metadata_SiteKey"].tolist() == [
        "BR00121431/A01/1",
        "BR00121431/A01/2",
        "BR00121431/A02/1",
        "BR00121431/A02/2",
    ]
    assert image["Metadata_ImageKey"].is_unique
    assert image["ImageNumber"].tolist() == [1, 2, 10, 11]  # the originals, as CellProfiler numbered them
    assert image.shape[1] == 1917 + 2
    assert out.wells == ["A01", "A02"] and out.sites == 4 and out.missing == []
    assert out.summary["metadata_mismatches"] == {}
    # The CSV copy holds the same rows.
    copy = pd.read_csv(tmp_path / "Image.csv.gz")
    assert copy.shape == image.shape
    assert copy["Count_Cells"].tolist() == [89, 188, 36, 149]


async def test_jump_well_medians_equal_pycytominer(tmp_path: Path, shared_data: Path) -> None:
    store = Store()
    sites, files = jump_sites(shared_data, store)
    await reduce_plate(sites, store.fetch, tmp_path)
    ours = pd.read_csv(tmp_path / "wells_Image.csv")

    # pycytominer on the same concatenated input ...
    concatenated = pq.read_table(tmp_path / "Image.parquet").to_pandas()
    concatenated = concatenated.drop(columns=["Metadata_SiteKey", "Metadata_ImageKey"])
    assert_same_wells(ours, pycytominer_wells(concatenated))
    # ... and on the raw files concatenated by pandas, independently of our reader.
    raw = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    assert_same_wells(ours, pycytominer_wells(raw))
    assert ours.set_index("Metadata_Well")["Metadata_Object_Count"].to_dict() == {"A01": 2, "A02": 2}


async def test_jump_cells_per_well_sums_site_counts(tmp_path: Path, shared_data: Path) -> None:
    store = Store()
    sites, files = jump_sites(shared_data, store)
    out = await reduce_plate(sites, store.fetch, tmp_path)
    raw = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    expected = raw.groupby("Metadata_Well")["Count_Cells"].sum().to_dict()
    assert expected == {"A01": 89 + 188, "A02": 36 + 149}
    assert out.count_object == "Cells"
    assert out.cells_per_well == {w: float(v) for w, v in expected.items()}
    table = pd.read_csv(tmp_path / "cells_per_well.csv")
    assert table.to_dict("list") == {
        "Metadata_Plate": ["BR00121431", "BR00121431"],
        "Metadata_Well": ["A01", "A02"],
        "Metadata_Sites": [2, 2],
        "Metadata_Sites_Missing": [0, 0],
        "Count_Cells": [277.0, 185.0],
    }
    # Another object can be counted.
    out = await reduce_plate(
        sites, store.fetch, tmp_path / "nuclei", options=ReduceOptions(count_object="Nuclei")
    )
    assert out.cells_per_well == {"A01": 277.0, "A02": 185.0}  # JUMP counts one nucleus per cell


# --------------------------------------------------------------------------
# Generated tables with known values

FEATURES = ["AreaShape_Area", "Intensity_MeanIntensity_DNA", "Location_Center_X", "Parent_Cells"]
WELLS = ["A01", "A02", "B01"]


def known_values(well: int, site: int, objects: int) -> np.ndarray:
    i = np.arange(objects, dtype=float)
    return np.column_stack([100 * well + 10 * site + i, 0.5 * i + well, 3 * i, i + 1])


def generated_plate(store: Store, objects: Mapping[int, int] | None = None) -> list[SiteInput]:
    """3 wells x 2 sites; site 1 has 3 objects, site 2 has 4."""
    objects = dict(objects or {1: 3, 2: 4})
    sites = []
    for w, well in enumerate(WELLS):
        for s in (1, 2):
            k = objects[s]
            nuclei = store.put(
                f"r/{well}/{s}/Nuclei.csv", testdata.object_csv(known_values(w, s, k), FEATURES)
            )
            image = store.put(
                f"r/{well}/{s}/Image.csv",
                testdata.image_csv({"Nuclei": k, "Cells": k}, metadata={"Metadata_Well": well}),
            )
            sites.append(SiteInput("P1", well, s, {"Image": image, "Nuclei": nuclei}))
    return sites


async def test_generated_medians_and_counts_are_exact(tmp_path: Path) -> None:
    store = Store()
    out = await reduce_plate(generated_plate(store), store.fetch, tmp_path)
    wells = read_wells(tmp_path / "wells_Nuclei.csv")
    assert list(wells) == WELLS
    for w, well in enumerate(WELLS):
        rows = np.vstack([known_values(w, 1, 3), known_values(w, 2, 4)])
        expected = np.median(rows, axis=0)
        got = wells[well]
        assert got["Metadata_Object_Count"] == 7
        assert [got[f"Nuclei_{f}"] for f in FEATURES] == expected.tolist()
    assert out.features["Nuclei"] == [f"Nuclei_{f}" for f in FEATURES]  # ImageNumber, ObjectNumber left out
    assert out.cells_per_well == {"A01": 7.0, "A02": 7.0, "B01": 7.0}
    assert out.tables["Nuclei"].rows == 21 and out.tables["Nuclei"].sites == 6
    nuclei = pq.read_table(tmp_path / "Nuclei.parquet")
    keys = list(
        zip(
            nuclei.column("Metadata_ImageKey").to_pylist(),
            nuclei.column("ObjectNumber").to_pylist(),
            strict=True,
        )
    )
    assert len(set(keys)) == 21  # (ImageKey, ObjectNumber) identifies an object across the plate
    kinds = {f.name: f.kind for f in out.files}
    assert kinds == {
        "Image.parquet": FileKind.OBJECT_TABLE_PARQUET,
        "Image.csv.gz": FileKind.OBJECT_TABLE_CSV,
        "wells_Image.csv": FileKind.WELL_TABLE,
        "Nuclei.parquet": FileKind.OBJECT_TABLE_PARQUET,
        "Nuclei.csv.gz": FileKind.OBJECT_TABLE_CSV,
        "wells_Nuclei.csv": FileKind.WELL_TABLE,
        "cells_per_well.csv": FileKind.WELL_TABLE,
        "summary.json": FileKind.SUMMARY_JSON,
    }


async def test_two_row_header_table_reduces_per_object(tmp_path: Path) -> None:
    """Nuclei and Cells exported into one file (two header rows)."""
    store = Store()
    sites = []
    for w, well in enumerate(["A01", "B02"]):
        for s in (1, 2):
            header = (
                "Image,Nuclei,Nuclei,Cells,Cells\r\n"
                "ImageNumber,ObjectNumber,AreaShape_Area,ObjectNumber,AreaShape_Area\r\n"
            )
            rows = "".join(f"1,{i},{10 * w + s + i}.0,{i},{100 + 10 * w + s + i}.0\r\n" for i in (1, 2))
            ref = store.put(f"r/{well}/{s}/Nuclei.csv", (header + rows).encode())
            sites.append(SiteInput("P2", well, s, {"Nuclei": ref}))
    out = await reduce_plate(sites, store.fetch, tmp_path)
    assert out.tables["Nuclei"].header == "two-row"
    wells = read_wells(tmp_path / "wells_Nuclei.csv")
    # A01: Nuclei areas 2, 3, 3, 4 -> 3; Cells areas 102, 103, 103, 104 -> 103
    assert wells["A01"]["Nuclei_AreaShape_Area"] == 3.0
    assert wells["A01"]["Cells_AreaShape_Area"] == 103.0
    assert wells["B02"]["Nuclei_AreaShape_Area"] == 13.0
    assert wells["B02"]["Cells_AreaShape_Area"] == 113.0
    assert wells["B02"]["Metadata_Object_Count"] == 4
    plate = pq.read_table(tmp_path / "Nuclei.parquet")
    assert {"ImageNumber", "ObjectNumber", "Nuclei_AreaShape_Area", "Cells_AreaShape_Area"} <= set(
        plate.column_names
    )
    # No Image table: the count comes from the rows of the table named like the object.
    assert out.count_object == "Nuclei" and out.cells_per_well == {"A01": 4.0, "B02": 4.0}


async def test_schema_drift_between_sites(tmp_path: Path) -> None:
    store = Store()
    tables = {
        # ints here, floats in the next site; F3 is text; F2 missing in the next site
        ("A01", 1): b"ImageNumber,ObjectNumber,F1,F2,F3\r\n1,1,1,10.0,x\r\n1,2,2,20.0,y\r\n",
        ("A01", 2): b"ImageNumber,ObjectNumber,F1,F3,F5\r\n1,1,2.5,z,7\r\n",
        # no object found: header only
        ("A02", 1): b"ImageNumber,ObjectNumber,F1,F2\r\n",
        # F4 has no value anywhere
        ("A02", 2): b"ImageNumber,ObjectNumber,F1,F2,F4\r\n1,1,4.0,nan,\r\n1,2,6.0,40.0,nan\r\n",
        ("A03", 1): b"ImageNumber,ObjectNumber,F1,F2\r\n",
    }
    sites = [
        SiteInput("P3", w, s, {"Cells": store.put(f"r/{w}/{s}/Cells.csv", data)})
        for (w, s), data in tables.items()
    ]
    out = await reduce_plate(sites, store.fetch, tmp_path, options=ReduceOptions(chunk_sites=2))
    plate = pq.read_table(tmp_path / "Cells.parquet")
    types = {f.name: f.type for f in plate.schema}
    assert types["F1"] == pa.float64() and types["F2"] == pa.float64() and types["F4"] == pa.float64()
    assert types["F3"] == pa.string() and types["F5"] == pa.int64()
    assert plate.column("F1").to_pylist() == [1.0, 2.0, 2.5, 4.0, 6.0]
    assert plate.column("F2").to_pylist() == [10.0, 20.0, None, None, 40.0]
    assert plate.column("F3").to_pylist() == ["x", "y", "z", None, None]
    wells = read_wells(tmp_path / "wells_Cells.csv")
    assert out.features["Cells"] == ["Cells_F1", "Cells_F2", "Cells_F5", "Cells_F4"]  # F3 is text
    assert wells["A01"]["Metadata_Object_Count"] == 3
    assert (
        wells["A01"]["Cells_F1"] == 2.0
        and wells["A01"]["Cells_F2"] == 15.0
        and wells["A01"]["Cells_F5"] == 7.0
    )
    assert wells["A02"]["Metadata_Object_Count"] == 2
    assert wells["A02"]["Cells_F1"] == 5.0 and wells["A02"]["Cells_F2"] == 40.0
    assert math.isnan(float(wells["A02"]["Cells_F4"]))
    # A well whose sites found nothing: a row with count 0 and no medians.
    assert wells["A03"]["Metadata_Object_Count"] == 0
    assert all(math.isnan(float(wells["A03"][f])) for f in out.features["Cells"])
    # The CSV copy has the unified columns too.
    copy = pd.read_csv(tmp_path / "Cells.csv.gz")
    assert list(copy.columns) == plate.column_names and len(copy) == 5


async def test_bad_sites_are_left_out_with_reasons(tmp_path: Path) -> None:
    store = Store()
    sites = generated_plate(store)
    # A02/1: its Nuclei table is cut short (and registered so); A02/2: the
    # stored bytes changed after registration; B01/1: its Image table is gone.
    index = next(i for i, s in enumerate(sites) if (s.well, s.site) == ("A02", 1))
    cut = store.put("r/A02/1/Nuclei-cut.csv", store.blobs["r/A02/1/Nuclei.csv"][:-9])
    sites[index] = sites[index]._replace(tables={**sites[index].tables, "Nuclei": cut})
    store.blobs["r/A02/2/Nuclei.csv"] += b"1,9,1,2,3,4\r\n"
    del store.blobs["r/B01/1/Image.csv"]
    failed_before = [MissingSite("P1", "B01", 3, "FAILED", "CP_PROBLEM: IdentifyPrimaryObjects crashed")]
    out = await reduce_plate(sites, store.fetch, tmp_path, missing=failed_before)

    reasons = {(m.well, m.site): (m.state, m.reason) for m in out.missing}
    assert set(reasons) == {("A02", 1), ("A02", 2), ("B01", 1), ("B01", 3)}
    assert reasons[("A02", 1)][0] == "DONE" and "unreadable" in reasons[("A02", 1)][1]
    assert "SHA-256" in reasons[("A02", 2)][1]
    assert "no such object" in reasons[("B01", 1)][1]
    assert reasons[("B01", 3)] == ("FAILED", "CP_PROBLEM: IdentifyPrimaryObjects crashed")
    # A bad site is out of every table, not only the one that failed.
    image = pq.read_table(tmp_path / "Image.parquet")
    assert set(image.column("Metadata_SiteKey").to_pylist()) == {"P1/A01/1", "P1/A01/2", "P1/B01/2"}
    assert out.wells == ["A01", "B01"] and out.sites == 3
    assert out.missing_per_well == {"A02": 2, "B01": 2}
    cells = pd.read_csv(tmp_path / "cells_per_well.csv").set_index("Metadata_Well")
    assert cells.loc["A02", "Metadata_Sites"] == 0 and cells.loc["A02", "Metadata_Sites_Missing"] == 2
    assert math.isnan(cells.loc["A02", "Count_Cells"])
    assert cells.loc["B01", "Count_Cells"] == 4.0  # site 2 only
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(m["well"], m["site"]) for m in summary["missing_sites"]] == [
        ("A02", 1),
        ("A02", 2),
        ("B01", 1),
        ("B01", 3),
    ]


async def test_store_outage_fails_the_reduce(tmp_path: Path) -> None:
    store = Store()
    sites = generated_plate(store)

    async def down(key: str, sha256: str) -> bytes:
        raise RuntimeError("object store unreachable")

    with pytest.raises(RuntimeError, match="unreachable"):
        await reduce_plate(sites, down, tmp_path)
    assert not (tmp_path / ".spool").exists()


async def test_chunking_does_not_change_the_outputs(tmp_path: Path) -> None:
    """One site per chunk, a few sites per chunk, all in one: byte-identical files."""
    store = Store()
    rng = np.random.default_rng(3)
    sites = []
    for r in "ABC":
        for c in range(1, 5):
            well = f"{r}{c:02d}"
            for s in (1, 2, 3):
                k = int(rng.integers(0, 6))
                data = testdata.object_csv(rng.normal(size=(k, 3)), ["A", "B", "C"])
                sites.append(SiteInput("P4", well, s, {"Cells": store.put(f"r/{well}/{s}/Cells.csv", data)}))
    digests = []
    for n, options in enumerate(
        [ReduceOptions(), ReduceOptions(chunk_sites=1), ReduceOptions(chunk_bytes=200, fetch_ahead=1)]
    ):
        out = await reduce_plate(sites[::-1], store.fetch, tmp_path / str(n), options=options)
        digests.append({f.name: hashlib.sha256(f.path.read_bytes()).hexdigest() for f in out.files})
    assert digests[0] == digests[1] == digests[2]


async def test_required_feature_must_exist(tmp_path: Path) -> None:
    store = Store()
    sites = generated_plate(store)
    out = await reduce_plate(
        sites, store.fetch, tmp_path, options=ReduceOptions(require_features=("AreaShape_Area",))
    )
    assert out.find_feature("AreaShape_Area") == ("Nuclei", "Nuclei_AreaShape_Area")
    assert out.find_feature("Image_Count_Cells") == ("Image", "Image_Count_Cells")
    table, column, values = out.well_values("Intensity_MeanIntensity_DNA")
    assert (table, column) == ("Nuclei", "Nuclei_Intensity_MeanIntensity_DNA")
    assert values == {"A01": 0.5, "A02": 1.5, "B01": 2.5}  # median of 0.5 i over i = 0,1,2,0,1,2,3, + well
    with pytest.raises(UnknownFeature):
        await reduce_plate(
            sites, store.fetch, tmp_path / "again", options=ReduceOptions(require_features=("Nope",))
        )


async def test_one_plate_at_a_time(tmp_path: Path) -> None:
    store = Store()
    sites = generated_plate(store)
    other = SiteInput("P9", "A01", 1, sites[0].tables)
    with pytest.raises(ValueError, match="one plate"):
        await reduce_plate([*sites, other], store.fetch, tmp_path)
    with pytest.raises(ValueError, match="given twice"):
        await reduce_plate([*sites, sites[0]], store.fetch, tmp_path)
