"""The real BBBC013 half plate (48 wells x 2 channels, CellProfiler team
images) through the whole mesh with a per-site pipeline: 48 wells in the
report, counts per well = the sum of the per-site Count_Nuclei, per-well
medians = pycytominer's aggregate on the same per-object table. The plate
has its plate map (1049_Metadata.csv): its dose and control columns are in
every table, and the report's Z'-factor and V-factor of every measurement
equal what CellProfiler's own CalculateStatistics functions (run in
CellProfiler's environment) give for the sites' values, to 1e-6."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from services.mesh.demo import run_demo
from tests.e2e.meshkit import cp_python, options

CALCULATE_STATISTICS = """
import sys
import numpy as np
import cellprofiler_core.preferences as preferences
preferences.set_headless()
from cellprofiler.modules.calculatestatistics import v_factors, z_factors
data = np.load(sys.argv[1])
z = z_factors(data["controls"], data["values"])[0]
v = v_factors(data["doses"], data["values"])
np.save(sys.argv[2], np.vstack([z, v]))
"""


def cellprofiler_z_and_v(
    tmp: Path, controls: np.ndarray, doses: np.ndarray, values: np.ndarray
) -> np.ndarray:
    np.savez(tmp / "in.npz", controls=controls, doses=doses, values=values)
    done = subprocess.run(
        [cp_python(), "-c", CALCULATE_STATISTICS, str(tmp / "in.npz"), str(tmp / "out.npy")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return np.load(tmp / "out.npy")


pytestmark = pytest.mark.e2e


async def test_bbbc013_half_plate_report(tmp_path: Path, shared_data: Path) -> None:
    summary = await run_demo(
        options(tmp_path, workers=2, example="bbbc013", shared_data=shared_data, rate=200.0)
    )
    assert summary["sites_done"] == summary["sites_total"] == 48
    assert summary["wells"] == 48
    assert summary["wells_matching_ground_truth"] == 48, "per-well counts differ from the per-site sums"
    report = Path(summary["report_dir"])
    digest = json.loads((report / "summary.json").read_text())
    assert digest["wells"] == 48 and digest["sites"] == 48
    counts = pd.read_csv(report / "cells_per_well.csv").set_index("Metadata_Well")["Count_Nuclei"]
    assert sorted(counts.index) == [f"{r}{c:02d}" for r in "ABCD" for c in range(1, 13)]
    assert counts.between(50, 600).all(), counts.describe()
    png = report / "heatmap_cells_per_well.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    import pycytominer

    nuclei = pd.read_parquet(report / "Nuclei.parquet")
    features = [
        c
        for c in nuclei.columns
        if not c.startswith("Metadata_") and c not in ("ImageNumber", "ObjectNumber")
    ]
    renamed = nuclei.rename(columns={c: f"Nuclei_{c}" for c in features})
    expected = pycytominer.aggregate(
        population_df=renamed,
        strata=["Metadata_Plate", "Metadata_Well"],
        features=[f"Nuclei_{c}" for c in features],
        operation="median",
        compute_object_count=True,
        object_feature="ObjectNumber",
    ).set_index("Metadata_Well")
    ours = pd.read_csv(report / "wells_Nuclei.csv").set_index("Metadata_Well")
    # The demo registers BBBC013's plate map: doses and controls in every table, and the QC.
    assert (ours.loc[["A01", "A02", "A12"], "Metadata_SBS_Controls"] == [-1, -1, 1]).all()
    assert (ours.loc[[f"B{c:02d}" for c in range(3, 12)], "Metadata_SBS_Doses"] == list(range(1, 10))).all()
    assert set(pd.read_parquet(report / "Nuclei.parquet")["Metadata_SBS_Doses"]) == set(range(11))
    assert (
        digest["qc"]["computed"]
        and digest["qc"]["wells_negative"] == 8
        and digest["qc"]["wells_positive"] == 4
    )
    assert (report / "qc.html").exists() and (report / "qc.csv").exists()
    assert (ours["Metadata_Object_Count"] == expected["Metadata_Object_Count"]).all()
    assert (ours["Metadata_Object_Count"] == counts.reindex(ours.index)).all()
    shared = [c for c in expected.columns if c.startswith("Nuclei_")]
    assert len(shared) > 50
    np.testing.assert_allclose(
        ours.loc[expected.index, shared].to_numpy(float),
        expected[shared].to_numpy(float),
        rtol=1e-9,
        atol=1e-12,
    )

    # Plate QC: CellProfiler's CalculateStatistics on each well's values (its
    # one site's Image features and the mean of every Nuclei feature's finite
    # values), with the map's controls and doses.
    image = pd.read_parquet(report / "Image.parquet").set_index("Metadata_Well")
    means = (
        nuclei[["Metadata_Well", *features]]
        .replace([np.inf, -np.inf], np.nan)
        .groupby("Metadata_Well")
        .mean()
        .rename(columns=lambda c: f"Nuclei_{c}")
    )
    image_features = [
        c
        for c in image.columns
        if not c.startswith("Metadata_") and c != "ImageNumber" and pd.api.types.is_numeric_dtype(image[c])
    ]
    wells = sorted(image.index)
    per_well = pd.concat(
        [image.loc[wells, image_features].rename(columns=lambda c: f"Image_{c}"), means.reindex(wells)],
        axis=1,
    )
    qc = pd.read_csv(report / "qc.csv").set_index("feature")
    compared = [c for c in per_well.columns if c in qc.index]
    assert len(compared) > 60 and "Nuclei_Intensity_MeanIntensity_GFP" in compared, len(compared)
    assert not [c for c in qc.index if c not in per_well.columns]
    sbs = pd.read_csv(shared_data / "bbbc013_translocation_plate" / "images" / "1049_Metadata.csv")
    sbs.index = sbs["Row"] + sbs["Column"].map(lambda c: f"{int(c):02d}")
    theirs = cellprofiler_z_and_v(
        tmp_path,
        sbs.loc[wells, "SBS_Controls"].to_numpy(float),
        sbs.loc[wells, "SBS_Doses"].to_numpy(float),
        per_well[compared].to_numpy(float),
    )
    np.testing.assert_allclose(qc.loc[compared, "z_prime"].to_numpy(float), theirs[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(qc.loc[compared, "v_factor"].to_numpy(float), theirs[1], rtol=0, atol=1e-6)
    assert digest["qc"]["control_column"] == "Metadata_SBS_Controls"
    page = (report / "qc.html").read_text()
    assert "Dose-response" in page and (report / page.split("<img src='")[1].split("'")[0]).exists()
