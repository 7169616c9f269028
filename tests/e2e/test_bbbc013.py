"""The real BBBC013 half plate (48 wells x 2 channels, CellProfiler team
images) through the whole mesh with a per-site pipeline: 48 wells in the
report, counts per well = the sum of the per-site Count_Nuclei, per-well
medians = pycytominer's aggregate on the same per-object table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from services.mesh.demo import run_demo
from tests.e2e.meshkit import options

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
