"""Plate maps and plate QC in the reduce.

* The QC statistics against CellProfiler's own CalculateStatistics: the
  BBBC013 half plate run by the CellProfiler command line with
  derived/ExampleSBS_cp4.cppipe, its Experiment measurements exported (the
  fixture in data/bbbc013_calculatestatistics, made by its make_fixture.sh):
  every Z'-factor and V-factor equals CellProfiler's to 1e-6.
* A generated plate reduced with a JUMP-style plate map: every table carries
  the map's columns (as pycytominer.annotate joins them), the QC summary's Z'
  equals the formula on the drawn values, and the gate's verdict follows."""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from cellmesh import platemap

from services.reducer import qc, testdata
from services.reducer.reduce import FileKind, FileRef, MissingSite, SiteInput, reduce_plate

FIXTURE = Path(__file__).parent / "data" / "bbbc013_calculatestatistics"
OBJECTS = ("Nuclei", "PropCells", "DistanceCells", "DistCytoplasm")


def cellprofiler_statistics() -> dict[str, dict[str, float]]:
    """statistic ("Zfactor", "Vfactor", "EC50", ...) -> {"<Object>_<feature>": value}."""
    experiment = pd.read_csv(FIXTURE / "Experiment.csv.gz", dtype=str, keep_default_na=False)
    out: dict[str, dict[str, float]] = {}
    for key, value in zip(experiment["Key"], experiment["Value"], strict=True):
        statistic, _, feature = key.partition("_")
        if statistic in ("Zfactor", "Vfactor", "EC50", "OneTailedZfactor"):
            out.setdefault(statistic, {})[feature] = float(value)
    return out


def per_image_values(features: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    """CellProfiler's own per-image values of the fixture's features: Image
    features as they are, object features as ExportToSpreadsheet's per-image
    means (Mean_<object>_<feature>)."""
    image = pd.read_csv(FIXTURE / "Image.csv.gz")
    columns = []
    for f in features:
        obj, _, name = f.partition("_")
        columns.append(name if obj == "Image" else f"Mean_{obj}_{name}")
    return image, image[columns].to_numpy(dtype=float)


def test_z_and_v_factors_equal_cellprofiler_calculatestatistics() -> None:
    cp = cellprofiler_statistics()
    image, _ = per_image_values([])
    # Numbers only: CellProfiler also reports a "Z'" of ImageSet_Zip_Dictionary
    # (bytes it takes as numbers; its table has them as text).
    available = {c for c in image.columns if pd.api.types.is_numeric_dtype(image[c])}
    features = [
        f
        for f in cp["Zfactor"]
        if (f.partition("_")[2] if f.startswith("Image_") else f"Mean_{f}") in available
    ]
    # Every per-object feature CellProfiler reports is in its Image table as a
    # mean, but the object count (ExportToSpreadsheet aggregates no Number_Object_Number).
    objects = [f for f in cp["Zfactor"] if f.startswith(OBJECTS)]
    absent = {f for f in objects if f not in features}
    assert len(objects) == 694 and {f.partition("_")[2] for f in absent} == {"Number_Object_Number"}, absent
    _, values = per_image_values(features)
    wells = [
        f"{r}{int(c):02d}"
        for r, c in zip(image["Metadata_WellRow"], image["Metadata_WellColumn"], strict=True)
    ]
    assert len(set(wells)) == 48
    controls = {w: str(int(v)) for w, v in zip(wells, image["Metadata_SBS_Controls"], strict=True)}
    doses = {w: repr(float(v)) for w, v in zip(wells, image["Metadata_SBS_Doses"], strict=True)}
    stats = qc.plate_statistics(wells, values, features, controls, doses, with_ec50=False)
    z_cp = np.array([cp["Zfactor"][f] for f in features])
    v_cp = np.array([cp["Vfactor"][f] for f in features])
    np.testing.assert_allclose(stats.z_prime, z_cp, rtol=0, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(stats.v_factor, v_cp, rtol=0, atol=1e-6, equal_nan=True)
    assert np.isfinite(z_cp).sum() > 600, np.isfinite(z_cp).sum()
    # The translocation readout separates the controls (the README's Z' of about 0.6).
    ratio = features.index("Nuclei_Math_Ratio1")
    assert 0.4 < stats.z_prime[ratio] < 0.8


def test_ec50_of_the_translocation_ratio_is_cellprofiler_s() -> None:
    cp = cellprofiler_statistics()
    features = ["Nuclei_Math_Ratio1", "DistCytoplasm_Math_Ratio2", "Image_Count_Nuclei"]
    image, values = per_image_values(features)
    fit = qc.ec50(image["Metadata_SBS_Doses"].to_numpy(dtype=float), values)
    np.testing.assert_allclose(fit[:, 2], [cp["EC50"][f] for f in features], rtol=1e-4)


def test_the_bbbc013_map_reads_as_cellprofiler_s_metadata(shared_data: Path) -> None:
    path = shared_data / "bbbc013_translocation_plate" / "images" / "1049_Metadata.csv"
    m = platemap.parse(path.read_bytes(), rows=8, columns=12)
    image = pd.read_csv(FIXTURE / "Image.csv.gz")
    for r, c, dose, control in zip(
        image["Metadata_WellRow"],
        image["Metadata_WellColumn"],
        image["Metadata_SBS_Doses"],
        image["Metadata_SBS_Controls"],
        strict=True,
    ):
        values = m.wells[f"{r}{int(c):02d}"]
        assert float(values["Metadata_SBS_Doses"]) == dose
        assert int(values["Metadata_SBS_Controls"]) == control


# --------------------------------------------------------------------------
# A generated plate with a JUMP-style map

WELLS = [f"{r}{c:02d}" for r in "AB" for c in range(1, 7)]
MAP = "well_position,pert_type,pert_dose\n" + "".join(
    f"{w},{'negcon' if w.endswith(('01', '02')) else 'poscon' if w.endswith('06') else 'trt'},"
    f"{0 if w.endswith(('01', '02')) else int(w[1:]) - 2}\n"
    for w in WELLS
)


def drawn(well: str, site: int) -> np.ndarray:
    """The objects of a site: (objects x 2) values of Intensity_A and Intensity_B;
    Intensity_A rises with the dose along a sigmoid with EC50 2."""
    i = WELLS.index(well)
    dose = 0 if well.endswith(("01", "02")) else int(well[1:]) - 2
    n = 3 + (i + site) % 3
    rng = np.random.default_rng(10 * i + site)
    a = 10.0 + 20.0 * dose**2 / (dose**2 + 4.0) + rng.normal(0, 0.5, n)
    b = rng.normal(100, 10, n)
    return np.column_stack([a, b])


async def test_a_plate_map_is_joined_into_every_table_and_gives_the_plate_s_qc(tmp_path: Path) -> None:
    blobs: dict[str, bytes] = {}

    def put(key: str, data: bytes) -> FileRef:
        blobs[key] = data
        return FileRef(key, hashlib.sha256(data).hexdigest(), len(data))

    async def fetch(key: str, sha256: str) -> bytes:
        return blobs[key]

    sites = []
    for well in WELLS:
        for site in (1, 2):
            objects = drawn(well, site)
            nuclei = put(f"{well}/{site}/N", testdata.object_csv(objects, ["Intensity_A", "Intensity_B"]))
            image = put(f"{well}/{site}/I", testdata.image_csv({"Nuclei": len(objects)}))
            sites.append(SiteInput("P1", well, site, {"Image": image, "Nuclei": nuclei}))
    sites = [s for s in sites if (s.well, s.site) != ("B05", 2)]  # one site failed
    missing = [MissingSite("P1", "B05", 2, "FAILED", "CellProfiler failed")]
    the_map = platemap.parse(MAP.encode(), rows=8, columns=12)
    gate = {"feature": "Nuclei_Intensity_A", "min_z_prime": 0.99, "max_failed_share": 0.01}
    out = await reduce_plate(sites, fetch, tmp_path, missing=missing, platemap=the_map, qc_gate=gate)

    # The map's columns in every table, numbers as numbers.
    nuclei = pq.read_table(tmp_path / "Nuclei.parquet").to_pandas()
    assert nuclei["Metadata_pert_dose"].dtype == np.int64
    expected = pd.read_csv(io.StringIO(MAP)).rename(
        columns={
            "well_position": "Metadata_Well",
            "pert_type": "Metadata_pert_type",
            "pert_dose": "Metadata_pert_dose",
        }
    )
    joined = nuclei[["Metadata_Well"]].merge(
        expected, on="Metadata_Well", how="left"
    )  # pycytominer.annotate's join
    assert (nuclei["Metadata_pert_type"].to_numpy() == joined["Metadata_pert_type"].to_numpy()).all()
    assert (nuclei["Metadata_pert_dose"].to_numpy() == joined["Metadata_pert_dose"].to_numpy()).all()
    for name in ("wells_Nuclei.csv", "wells_Image.csv", "cells_per_well.csv"):
        table = pd.read_csv(tmp_path / name)
        assert list(table.columns[:4]) == [
            "Metadata_Plate",
            "Metadata_Well",
            "Metadata_pert_type",
            "Metadata_pert_dose",
        ]
        assert table.set_index("Metadata_Well").loc["A06", "Metadata_pert_type"] == "poscon"

    # Z' from the per-well values: mean over sites of each site's object mean.
    def well_value(well: str) -> float:
        return float(np.mean([drawn(well, s)[:, 0].mean() for s in (1, 2) if (well, s) != ("B05", 2)]))

    neg = [well_value(w) for w in WELLS if w.endswith(("01", "02"))]
    pos = [well_value(w) for w in WELLS if w.endswith("06")]
    z = 1 - 3 * (np.std(pos) + np.std(neg)) / abs(np.mean(pos) - np.mean(neg))
    summary = json.loads((tmp_path / "summary.json").read_text())
    q = summary["qc"]
    assert (
        q["computed"]
        and q["control_column"] == "Metadata_pert_type"
        and q["dose_column"] == "Metadata_pert_dose"
    )
    assert q["wells_negative"] == 4 and q["wells_positive"] == 2 and q["wells_dosed"] == 12
    rows = pd.read_csv(tmp_path / "qc.csv").set_index("feature")
    assert math.isclose(rows.loc["Nuclei_Intensity_A", "z_prime"], z, rel_tol=0, abs_tol=1e-12)
    assert rows.loc["Nuclei_Intensity_A", "z_prime"] > rows.loc["Nuclei_Intensity_B", "z_prime"]
    assert 1.6 < rows.loc["Nuclei_Intensity_A", "ec50"] < 2.4  # drawn with EC50 2
    assert q["sites_failed_or_missing"] == 1 and q["sites_failed_or_missing_by_state"] == {"FAILED": 1}
    # The gate: Z' below 0.99 and 1 of 24 sites failed, above 1 %.
    assert out.qc is not None and out.qc.verdict is not None
    assert out.qc.verdict["passed"] is False
    failures = out.qc.verdict["failures"]
    assert failures[0].startswith(f"Z' of Nuclei_Intensity_A is {z:.3g}, below 0.99")
    assert failures[1] == "1 of 24 sites failed or are missing (4.2%), more than 1.0%"
    assert summary["qc"]["gate"]["passed"] is False
    assert {f.name: f.kind for f in out.files}["qc.csv"] == FileKind.QC_TABLE


async def test_without_a_map_the_summary_says_why_there_is_no_qc(tmp_path: Path) -> None:
    blobs = {"n": testdata.object_csv([[1.0], [2.0]], ["Intensity_A"])}

    async def fetch(key: str, sha256: str) -> bytes:
        return blobs[key]

    out = await reduce_plate(
        [SiteInput("P1", "A01", 1, {"Nuclei": FileRef("n")})],
        fetch,
        tmp_path,
        qc_gate={"feature": "Nuclei_Intensity_A", "min_z_prime": 0.5},
    )
    q = out.summary["qc"]
    assert q["computed"] is False and "no plate map" in q["reason"]
    assert out.qc is not None and out.qc.verdict is not None and out.qc.verdict["passed"] is False
    assert "could not be computed: the plate has no plate map" in out.qc.verdict["failures"][0]


def test_the_qc_page_of_bbbc013_shows_the_dose_response_of_the_gfp_translocation_ratio(
    tmp_path: Path, shared_data: Path
) -> None:
    from types import SimpleNamespace

    from services.reducer import qcpage, qcreport

    cp = cellprofiler_statistics()
    image, _ = per_image_values([])
    features = [f for f in cp["Zfactor"] if f.startswith(OBJECTS) and f"Mean_{f}" in image.columns]
    _, values = per_image_values(features)
    wells = [
        f"{r}{int(c):02d}"
        for r, c in zip(image["Metadata_WellRow"], image["Metadata_WellColumn"], strict=True)
    ]
    order = sorted(range(len(wells)), key=lambda i: platemap.well_position(wells[i]))
    wells, values = [wells[i] for i in order], values[order]
    the_map = platemap.parse(
        (shared_data / "bbbc013_translocation_plate" / "images" / "1049_Metadata.csv").read_bytes(),
        rows=8,
        columns=12,
    )
    result = qcreport.evaluate(wells, values, features, the_map, None, sites_reduced=48, missing=[])
    assert result.plot_features[0] == "Nuclei_Math_Ratio1"
    z = next(r["z_prime"] for r in result.rows if r["feature"] == "Nuclei_Math_Ratio1")
    assert abs(z - cp["Zfactor"]["Nuclei_Math_Ratio1"]) < 1e-6
    assert abs(result.fits["Nuclei_Math_Ratio1"][2] - cp["EC50"]["Nuclei_Math_Ratio1"]) < 1e-4 * abs(
        cp["EC50"]["Nuclei_Math_Ratio1"]
    )
    outputs = SimpleNamespace(
        out_dir=tmp_path, plate="BBBC013", wells=wells, missing_per_well={}, summary={"missing_sites": []}
    )
    files = qcpage.draw(outputs, result, (8, 12), "CellProfiler 4.2.8.1", qcpage.well_labels(the_map, result))  # type: ignore[arg-type]
    names = [f.name for f in files]
    assert names[0] == "qc_dose_response_Nuclei_Math_Ratio1.png" and names[-1] == "qc.html"
    page = (tmp_path / "qc.html").read_text()
    assert "<img src='qc_dose_response_Nuclei_Math_Ratio1.png'" in page
    assert (tmp_path / names[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
