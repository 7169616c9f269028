"""Plate maps and QC gates: CreatePlate(plate_map), SetPlateMap, and the
refusals that say what to fix (nothing is kept by a refused call)."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from cellmesh.catalog.v1 import catalog_pb2

from tests.catalog.conftest import Catalog
from tests.catalog.kit import pipeline, refused, register_pipeline

INVALID = grpc.StatusCode.INVALID_ARGUMENT
LAYOUT = catalog_pb2.PlateLayout(
    rows=8, columns=12, sites_per_well=1, wells=[f"A{c:02d}" for c in range(1, 13)]
)


def upload(text: str, name: str = "map.csv") -> catalog_pb2.PlateMapUpload:
    return catalog_pb2.PlateMapUpload(content=text.encode(), source_name=name)


async def test_bbbc013_plate_map_with_the_plate(catalog: Catalog, shared_data: Path) -> None:
    path = shared_data / "bbbc013_translocation_plate" / "images" / "1049_Metadata.csv"
    pipe = await register_pipeline(catalog.stub, pipeline())
    plate = (
        await catalog.stub.CreatePlate(
            catalog_pb2.CreatePlateRequest(
                name="SBS",
                channels=["DNA", "GFP"],
                pipeline_sha256=pipe.ref.sha256,
                layout=LAYOUT,
                plate_map=catalog_pb2.PlateMapUpload(content=path.read_bytes(), source_name=path.name),
                qc_gate=catalog_pb2.QcGate(
                    feature="Nuclei_Math_Ratio1", min_z_prime=0.5, max_failed_share=0.1
                ),
            )
        )
    ).plate
    m = plate.plate_map
    assert m.source_name == "1049_Metadata.csv" and m.located_by == "row Row and column Column"
    assert list(m.columns) == ["Metadata_SBS_Doses", "Metadata_SBS_Controls"]
    assert len(m.wells) == 96  # the map is the whole plate's, also the wells not imaged
    by_well = {w.well: dict(w.values) for w in m.wells}
    assert by_well["A01"] == {"Metadata_SBS_Doses": "0", "Metadata_SBS_Controls": "-1"}
    assert by_well["A12"] == {"Metadata_SBS_Doses": "10", "Metadata_SBS_Controls": "1"}
    assert [w.well for w in m.wells][:13] == [f"A{c:02d}" for c in range(1, 13)] + ["B01"]
    assert plate.qc_gate.min_z_prime == 0.5 and plate.qc_gate.feature == "Nuclei_Math_Ratio1"
    got = (await catalog.stub.GetPlate(catalog_pb2.GetPlateRequest(name="SBS"))).plate
    assert got.plate_map == m and got.qc_gate == plate.qc_gate


async def test_set_plate_map_by_image_number_and_pycytominer_layout(catalog: Catalog) -> None:
    pipe = await register_pipeline(catalog.stub, pipeline())
    await catalog.stub.CreatePlate(
        catalog_pb2.CreatePlateRequest(
            name="P1", channels=["DNA", "GFP"], pipeline_sha256=pipe.ref.sha256, layout=LAYOUT
        )
    )
    plate = (
        await catalog.stub.SetPlateMap(
            catalog_pb2.SetPlateMapRequest(
                plate="P1", plate_map=upload("ImageNumber,Dose\n1,0\n13,5\n96,9\n")
            )
        )
    ).plate
    assert {w.well: w.values["Metadata_Dose"] for w in plate.plate_map.wells} == {
        "A01": "0",
        "B01": "5",
        "H12": "9",
    }
    jump = "plate_map_name,well_position,broad_sample,pert_type\nBR1,A01,DMSO,negcon\nBR1,B02,BRD-1,trt\n"
    plate = (
        await catalog.stub.SetPlateMap(catalog_pb2.SetPlateMapRequest(plate="P1", plate_map=upload(jump)))
    ).plate
    assert list(plate.plate_map.columns) == [
        "Metadata_plate_map_name",
        "Metadata_broad_sample",
        "Metadata_pert_type",
    ]
    assert (
        plate.plate_map.wells[1].well == "B02"
        and plate.plate_map.wells[1].values["Metadata_pert_type"] == "trt"
    )
    assert not plate.HasField("qc_gate")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        (
            "Well,Dose\nA01,1\nI01,2\n",
            ("plate map map.csv: line 3: well 'I01' is not a well of the plate (8 x 12 wells)",),
        ),
        ("Well,Dose\nA01,1\nA13,2\n", ("well 'A13' is not a well of the plate",)),
        ("Well,Dose\nA01,1\na1,2\n", ("well A01 is in the plate map twice (lines 2 and 3)", "one row")),
        ("Treatment,Dose\nDMSO,1\n", ("no well column", "add a column 'Well'")),
        ("Row,Column,Dose\nA,1,0\nA,x,1\n", ("line 3: well column 'x' is not a number",)),
        ("Well,Dose\nA01,1,7\n", ("line 2 of the plate map has 3 fields, the header 2",)),
        ("Well,Dose,Dose\nA01,1,2\n", ("names 'Dose' twice",)),
        ("Well,Dose\n", ("has a header but no wells",)),
        ("", ("plate_map.content is empty: give the plate map's CSV file",)),
        ("\n\n", ("the plate map is empty",)),
        ("Well,My Dose\nA01,1\n", ("column 'My Dose' cannot be a measurement name",)),
    ],
)
async def test_bad_plate_maps_are_refused_saying_what_to_fix(
    catalog: Catalog, text: str, fragments: tuple[str, ...]
) -> None:
    pipe = await register_pipeline(catalog.stub, pipeline())
    with refused(INVALID, *fragments):
        await catalog.stub.CreatePlate(
            catalog_pb2.CreatePlateRequest(
                name="P1",
                channels=["DNA", "GFP"],
                pipeline_sha256=pipe.ref.sha256,
                layout=LAYOUT,
                plate_map=upload(text),
            )
        )
    assert (await catalog.stub.ListPlates(catalog_pb2.ListPlatesRequest())).plates == []
    await catalog.stub.CreatePlate(
        catalog_pb2.CreatePlateRequest(
            name="P1",
            channels=["DNA", "GFP"],
            pipeline_sha256=pipe.ref.sha256,
            layout=LAYOUT,
            plate_map=upload("Well,Dose\nA01,1\n"),
        )
    )
    with refused(INVALID, *fragments):
        await catalog.stub.SetPlateMap(catalog_pb2.SetPlateMapRequest(plate="P1", plate_map=upload(text)))
    kept = (await catalog.stub.GetPlate(catalog_pb2.GetPlateRequest(name="P1"))).plate.plate_map
    assert [(w.well, dict(w.values)) for w in kept.wells] == [("A01", {"Metadata_Dose": "1"})]


async def test_image_numbers_need_a_layout_and_gates_are_checked(catalog: Catalog) -> None:
    pipe = await register_pipeline(catalog.stub, pipeline())
    with refused(INVALID, "locates wells by ImageNumber only: give the plate a layout"):
        await catalog.stub.CreatePlate(
            catalog_pb2.CreatePlateRequest(
                name="P1",
                channels=["DNA"],
                pipeline_sha256=pipe.ref.sha256,
                plate_map=upload("ImageNumber,Dose\n1,0\n"),
            )
        )
    await catalog.stub.CreatePlate(
        catalog_pb2.CreatePlateRequest(name="P1", channels=["DNA", "GFP"], pipeline_sha256=pipe.ref.sha256)
    )
    with refused(INVALID, "qc_gate.min_z_prime needs qc_gate.feature", "max_failed_share 1.5 is not a share"):
        await catalog.stub.SetPlateMap(
            catalog_pb2.SetPlateMapRequest(
                plate="P1", qc_gate=catalog_pb2.QcGate(min_z_prime=0.4, max_failed_share=1.5)
            )
        )
    with refused(INVALID, "give a plate_map, a qc_gate or both"):
        await catalog.stub.SetPlateMap(catalog_pb2.SetPlateMapRequest(plate="P1"))
    with refused(grpc.StatusCode.NOT_FOUND, "plate 'P2' does not exist"):
        await catalog.stub.SetPlateMap(
            catalog_pb2.SetPlateMapRequest(plate="P2", qc_gate=catalog_pb2.QcGate(max_failed_share=0.1))
        )
    plate = (
        await catalog.stub.SetPlateMap(
            catalog_pb2.SetPlateMapRequest(plate="P1", qc_gate=catalog_pb2.QcGate(max_failed_share=0.25))
        )
    ).plate
    assert plate.qc_gate.max_failed_share == 0.25 and not plate.qc_gate.HasField("min_z_prime")
    assert not plate.HasField("plate_map")


async def test_a_report_keeps_its_qc_verdict(catalog: Catalog) -> None:
    from tests.catalog.kit import claim_all, new_plate, ready_sites, run_to_done
    from tests.catalog.test_catalog_progress import claim_runs, report

    layout = catalog_pb2.PlateLayout(rows=8, columns=12, sites_per_well=1, wells=["A01"])
    await new_plate(catalog.stub, "P1", layout=layout)
    await ready_sites(catalog.stub, "P1", 1)
    (claim,) = await claim_all(catalog.stub)
    await run_to_done(catalog.stub, claim)
    (run,) = await claim_runs(catalog)
    made = report(run, sites=1)
    made.qc.CopyFrom(
        catalog_pb2.PlateQc(
            gated=True, passed=False, failures=["Z' of Nuclei_Math_Ratio1 is 0.12, below 0.5"], z_prime=0.12
        )
    )
    stored = (
        await catalog.stub.RegisterPlateReport(catalog_pb2.RegisterPlateReportRequest(report=made))
    ).report
    got = (await catalog.stub.GetPlateReport(catalog_pb2.GetPlateReportRequest(plate="P1"))).report
    for r in (stored, got):
        assert r.qc.gated and not r.qc.passed and r.qc.z_prime == 0.12
        assert list(r.qc.failures) == ["Z' of Nuclei_Math_Ratio1 is 0.12, below 0.5"]
