"""The CellProfiler Analyst database and properties of a reduce, read the way
CellProfiler Analyst reads them (tests/reducer/cpa_reader.py)."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from cellmesh import cpa as cpa_names

from services.reducer import testdata
from services.reducer.cpa import CpaError, CpaInput, CpaWriter, StoredImage
from services.reducer.reduce import FileRef, MissingSite, ReduceOutputs, SiteInput, reduce_plate
from tests.reducer import cpa_reader

PLATE = "P7"
WELLS = ["A01", "A02", "B01", "B02"]
CHANNELS = ["DNA", "GFP"]
NUCLEI_FEATURES = ["AreaShape_Area", "Location_Center_X", "Location_Center_Y"]


def nuclei_count(well: str, site: int) -> int:
    return 1 + WELLS.index(well) + 2 * site  # 3..8


def cells_count(well: str, site: int) -> int:
    """One cell fewer than nuclei in A02, none at all in B01 site 1."""
    n = nuclei_count(well, site)
    if (well, site) == ("B01", 1):
        return 0
    return n - 1 if well == "A02" else n


def image_key(well: str, site: int, channel: str) -> str:
    return f"images/{PLATE}/{well}/s{site}/{channel}/{PLATE}_{well}_s{site}_{channel}.tif"


async def reduce_test_plate(tmp_path: Path, blobs: dict[str, bytes] | None = None) -> ReduceOutputs:
    blobs = {} if blobs is None else blobs
    sites = []
    for well in WELLS:
        for site in (1, 2):
            if (well, site) == ("B02", 2):
                continue  # failed: not in the report
            n, c = nuclei_count(well, site), cells_count(well, site)
            i = np.arange(n, dtype=float)
            files = {
                "Image": testdata.image_csv(
                    {"Nuclei": n, "Cells": c},
                    metadata={"Metadata_Compound": f"cmpd-{well}", "FileName_DNA": "scratch.tif"},
                ),
                "Nuclei": testdata.object_csv(
                    np.column_stack([100 + i, 10 * i, 5 * i]),
                    NUCLEI_FEATURES,
                    # A plate map's columns joined into the object table: the one the
                    # image table has too stays in Per_Image, the other one comes along.
                    extra={"Metadata_Compound": [f"cmpd-{well}"] * n, "Metadata_Dose": ["0.5"] * n},
                ),
                "Cells": testdata.object_csv(
                    np.column_stack([300 + np.arange(c, dtype=float)]),
                    ["AreaShape_Area"],
                    object_name="Cells",
                ),
            }
            refs = {}
            for table, data in files.items():
                key = f"results/{PLATE}/{well}/{site}/{table}.csv"
                blobs[key] = data
                refs[table] = FileRef(key, hashlib.sha256(data).hexdigest())
            sites.append(SiteInput(PLATE, well, site, refs))

    async def fetch(key: str, sha: str) -> bytes:
        return blobs[key]

    return await reduce_plate(
        sites, fetch, tmp_path / "out", missing=[MissingSite(PLATE, "B02", 2, "FAILED", "CP_PROBLEM")]
    )


def write_pair(outputs: ReduceOutputs, tmp_path: Path, prepend: str) -> CpaWriter:
    inp = CpaInput(
        plate=PLATE,
        out_dir=outputs.out_dir,
        image_table="Image",
        object_tables=[t for t in outputs.tables if t != "Image"],
        features=outputs.features,
        channels=CHANNELS,
        rows=2,
        columns=2,
        location_object="Nuclei",
        image_url_prepend=prepend,
    )
    writer = CpaWriter(inp, tmp_path)
    images = [StoredImage(w, s, ch, image_key(w, s, ch)) for w in WELLS for s in (1, 2) for ch in CHANNELS]
    writer.add_images(images[:5])  # in pages, as the catalog gives them
    writer.add_images(images[5:])
    summary = writer.finish()
    writer.close()
    assert summary.images == 7 and summary.wells == 4 and not summary.images_missing
    return writer


async def test_cpa_reads_every_well_object_and_image(tmp_path: Path) -> None:
    outputs = await reduce_test_plate(tmp_path)
    check_every_well_object_and_image(outputs, tmp_path)


def check_every_well_object_and_image(outputs: ReduceOutputs, tmp_path: Path) -> None:
    # The images, as `cellmesh report --images` lays them out under a folder.
    local = tmp_path / "copy"
    for w in WELLS:
        for s in (1, 2):
            for ch in CHANNELS:
                path = local / image_key(w, s, ch)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(f"{w}/{s}/{ch}".encode())
    writer = write_pair(outputs, tmp_path, "http://store.invalid/bucket/")
    assert not list(tmp_path.glob("cpa-stage*")), "the staging database is deleted"
    props_path = outputs.out_dir / cpa_names.PROPERTIES
    props_path.write_text(cpa_names.rewrite_prepend(props_path.read_text(), cpa_names.folder_url(local)))

    props = cpa_reader.load(props_path)
    assert props.unrecognized == []
    assert props.str("db_type") == "sqlite"
    assert Path(props.str("db_sqlite_file")) == writer.db_path
    assert props.get("plate_shape") == [2, 2]
    assert props.list("image_names") == CHANNELS
    db = cpa_reader.connect(props)
    image_cols = cpa_reader.columns(db, props.str("image_table"))
    object_cols = cpa_reader.columns(db, props.str("object_table"))
    for key in ("image_id", "plate_id", "well_id"):
        assert props.str(key) in image_cols, key
    for key in ("image_id", "object_id", "cell_x_loc", "cell_y_loc"):
        assert props.str(key) in object_cols, key
    for col in props.list("image_path_cols") + props.list("image_file_cols"):
        assert col in image_cols
    assert props.str("cell_x_loc") == "Nuclei_Location_Center_X"
    # Metadata of the reducer's image table comes along (plate maps, site metadata).
    assert "Image_Metadata_Compound" in image_cols and "Image_Count_Nuclei" in image_cols
    # The well group CPA's Classifier scores by runs as written.
    (group_sql,) = props.groups.values()
    assert len(db.execute(group_sql).fetchall()) == 7

    # Plate Viewer: every reduced well of the plate.
    plate_id, well_id, image_id = props.str("plate_id"), props.str("well_id"), props.str("image_id")
    wells = db.execute(f"SELECT DISTINCT {plate_id}, {well_id} FROM {props.str('image_table')}").fetchall()
    assert sorted(wells) == [(PLATE, w) for w in WELLS]
    ids = [r[0] for r in db.execute(f"SELECT {image_id} FROM {props.str('image_table')}")]
    assert len(ids) == len(set(ids)) == 7

    # Every object, with its image, and every image file.
    table, obj_table = props.str("image_table"), props.str("object_table")
    for number, well, site, compound in db.execute(
        f"SELECT {image_id}, {well_id}, Image_Metadata_Site, Image_Metadata_Compound FROM {table}"
    ).fetchall():
        assert compound == f"cmpd-{well}"
        rows = db.execute(
            f"SELECT {props.str('object_id')}, {props.str('cell_x_loc')}, Nuclei_AreaShape_Area, "
            f"Cells_AreaShape_Area FROM {obj_table} WHERE {image_id} = ? ORDER BY 1",
            (number,),
        ).fetchall()
        n, c = nuclei_count(well, site), cells_count(well, site)
        assert [r[0] for r in rows] == list(range(1, n + 1))
        assert [r[1] for r in rows] == [10.0 * i for i in range(n)]
        assert [r[2] for r in rows] == [100.0 + i for i in range(n)]
        assert [r[3] for r in rows] == [300.0 + i for i in range(c)] + [None] * (n - c)
        paths = cpa_reader.image_paths(db, props, number)
        for channel, path in zip(CHANNELS, paths, strict=True):
            opened = cpa_reader.open_image(props, path)
            assert Path(opened).read_bytes() == f"{well}/{site}/{channel}".encode()
    assert "Image_FileName_DNA" in image_cols and "scratch.tif" not in str(
        db.execute(f"SELECT Image_FileName_DNA FROM {table}").fetchall()
    )
    assert "Nuclei_Metadata_Dose" in object_cols and "Nuclei_Metadata_Compound" not in object_cols
    assert not [c for c in object_cols if c.endswith(("SiteKey", "ImageKey", "Metadata_Well"))]
    # Classifier learns from measurements, not from keys, locations or metadata.
    learn = cpa_reader.classifier_columns(db, props)
    assert "Nuclei_AreaShape_Area" in learn and "Cells_AreaShape_Area" in learn
    assert not [
        c for c in learn if "Location" in c or "Metadata" in c or c in ("ImageNumber", "ObjectNumber")
    ]
    (objects,) = db.execute(f"SELECT COUNT(*) FROM {obj_table}").fetchone()
    assert objects == sum(nuclei_count(w, s) for w in WELLS for s in (1, 2) if (w, s) != ("B02", 2))


async def test_same_results_give_the_same_database_bytes(tmp_path: Path) -> None:
    first = await reduce_test_plate(tmp_path / "a")
    second = await reduce_test_plate(tmp_path / "b")
    a = write_pair(first, tmp_path / "a", "http://s/b/").db_path.read_bytes()
    b = write_pair(second, tmp_path / "b", "http://s/b/").db_path.read_bytes()
    assert a == b


async def test_too_many_columns_for_sqlite_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    wide = testdata.fast_object_csv(3, 2100, rng)
    sites = [
        SiteInput(PLATE, "A01", 1, {"Image": FileRef("i"), "Nuclei": FileRef("n")}),
    ]
    blobs = {"i": testdata.image_csv({"Nuclei": 3}), "n": wide}

    async def fetch(key: str, sha: str) -> bytes:
        return blobs[key]

    outputs = await reduce_plate(sites, fetch, tmp_path / "out")
    inp = CpaInput(PLATE, outputs.out_dir, "Image", ["Nuclei"], outputs.features, ["DNA"])
    writer = CpaWriter(inp, tmp_path)
    with pytest.raises(CpaError, match="Per_Object would have 2102 columns"):
        writer.finish()
    writer.close()
    assert not (outputs.out_dir / cpa_names.DATABASE).exists()
    assert not (outputs.out_dir / cpa_names.PROPERTIES).exists()
    with pytest.raises(sqlite3.ProgrammingError):
        writer.add_images([])


def test_presigned_urls_go_into_the_path_and_file_columns(tmp_path: Path) -> None:
    db_path = tmp_path / cpa_names.DATABASE
    with sqlite3.connect(db_path) as db:
        db.execute(
            "CREATE TABLE Per_Image (ImageNumber INTEGER PRIMARY KEY, p0 TEXT, f0 TEXT, p1 TEXT, f1 TEXT)"
        )
        db.execute(
            "INSERT INTO Per_Image VALUES (1, 'images/P/A01/s1/DNA', 'a.tif', 'images/P/A01/s1/GFP', NULL)"
        )
    columns = [("p0", "f0"), ("p1", "f1")]
    assert cpa_names.stored_images(db_path, columns) == [(1, 0, "images/P/A01/s1/DNA/a.tif")]
    url = "http://127.0.0.1:9/bkt/images/P/A01/s1/DNA/a.tif?X-Amz-Signature=ab%2Fc&X-Amz-Expires=60"
    prepend = cpa_names.write_presigned(db_path, columns, {(1, 0): url})
    with sqlite3.connect(db_path) as db:
        path, file = db.execute("SELECT p0, f0 FROM Per_Image").fetchone()
    assert prepend + path + "/" + file == url  # what CPA opens
    with pytest.raises(ValueError, match="two hosts"):
        cpa_names.write_presigned(db_path, columns, {(1, 0): url, (1, 1): "http://other/b/k?x=1"})
    text = "# x\nimage_path_cols = p0, p1\nimage_file_cols = f0,f1\nimage_url_prepend = http://a/\n"
    assert cpa_names.image_columns(text) == columns
    assert cpa_names.rewrite_prepend(text, "file:///r/").count("image_url_prepend = file:///r/") == 1


async def test_clashing_image_column_names_are_kept_apart(tmp_path: Path) -> None:
    image = testdata.image_csv({"Nuclei": 2}, features={"Image_Count_Nuclei": 7, "PathName_DNA": 1})
    blobs = {"i": image, "n": testdata.object_csv([[1.0], [2.0]], ["AreaShape_Area"])}
    sites = [SiteInput(PLATE, "A01", 1, {"Image": FileRef("i"), "Nuclei": FileRef("n")})]

    async def fetch(key: str, sha: str) -> bytes:
        return blobs[key]

    outputs = await reduce_plate(sites, fetch, tmp_path / "out")
    writer = CpaWriter(
        CpaInput(PLATE, outputs.out_dir, "Image", ["Nuclei"], outputs.features, ["DNA"]), tmp_path
    )
    writer.add_images([StoredImage("A1", 1, "DNA", "images/P7/A01/s1/DNA/a.tif")])
    writer.finish()
    writer.close()
    db = sqlite3.connect(writer.db_path)
    row = db.execute(
        "SELECT Image_Count_Nuclei, Image_Count_Nuclei_, Image_PathName_DNA FROM Per_Image"
    ).fetchone()
    assert sorted(row[:2]) == [2, 7] and row[2] == "images/P7/A01/s1/DNA"
    db.close()
