"""The command line against the real catalog (SQLite and MariaDB) and the
project's S3 server: register ExampleHuman's pipeline, create its plate,
ingest its images twice, list its sites; errors come through unchanged.

The catalog serves from this test's event loop; each command runs in a
thread of its own, as it would in its own process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cellmesh.catalog.v1 import catalog_pb2_grpc
from cellmesh.cli import main
from cellmesh.client import CellmeshClient

from services.catalog import migrate
from services.catalog.servicer import SERVICE_NAME, CatalogServicer
from services.catalog.store import CatalogStore
from services.common import synth
from services.common.s3 import ObjectStore
from services.common.server import GrpcServer, Registration
from services.common.settings import S3Settings
from tests import pki as test_pki
from tests.common.test_cppipe import grouped

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "pipelines"
HUMAN = r"_(?P<Well>[A-P]\d{2})f(?P<Site>\d{2})d(?P<Channel>\d)\.tif$"


@pytest.fixture
async def catalog_address(
    database_url: str, s3_settings: S3Settings, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    # The CLI finds the credentials in the environment: a scientist's.
    local = test_pki.local()
    monkeypatch.setenv("CELLMESH_CA", str(local.ca))
    monkeypatch.setenv("CELLMESH_CERT", str(local.cert("scientist")))
    monkeypatch.setenv("CELLMESH_KEY", str(local.key("scientist")))
    await migrate.upgrade(database_url)
    store = CatalogStore.connect(database_url, max_attempts=3)
    try:
        async with ObjectStore(s3_settings) as objects:
            await objects.ensure_bucket()
            servicer = CatalogServicer(store, objects, watch_poll_seconds=0.2)
            server = GrpcServer(
                [Registration(catalog_pb2_grpc.add_CatalogServiceServicer_to_server, servicer, SERVICE_NAME)],
                host="127.0.0.1",
                port=0,
                grace_seconds=2,
                auth=test_pki.server_auth("catalog"),
            )
            port = await server.start()
            await server.set_serving(True)
            try:
                yield f"127.0.0.1:{port}"
            finally:
                servicer.close()
                await server.stop()
    finally:
        await store.close()


async def test_cli_against_the_real_catalog(
    catalog_address: str,
    s3_settings: S3Settings,
    shared_data: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_settings.endpoint_url or "")
    monkeypatch.setenv("S3_BUCKET", s3_settings.bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_settings.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_settings.secret_key)
    human = shared_data / "example_human"

    async def cellmesh(*args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, ["--catalog", catalog_address, *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = await cellmesh("pipeline", "register", str(human / "ExampleHuman.cppipe"))
    assert code == 0, err
    assert "channels  DNA, PH3, cellbody" in out
    sha = out.split("sha256    ")[1].split()[0]

    sbs = shared_data / "bbbc013_translocation_plate"
    code, _, err = await cellmesh("pipeline", "register", str(sbs / "derived" / "ExampleSBS_cp4.cppipe"))
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: ")
    assert "imports 1049_Metadata.csv from the Default Input Folder" in err and "IllumDNA" in err
    attach = [
        a
        for n in ("1049_Metadata.csv", "Channel1ILLUM.mat", "Channel2ILLUM.mat")
        for a in ("--attach", str(sbs / "images" / n))
    ]
    code, out, err = await cellmesh(
        "pipeline", "register", str(sbs / "derived" / "ExampleSBS_cp4.cppipe"), *attach
    )
    assert code == 0, err
    assert "channels  rawGFP, rawDNA" in out and "attached  Channel2ILLUM.mat" in out

    code, out, err = await cellmesh(
        "plate", "create", "human", "--channels", "DNA,PH3,cellbody", "--pipeline", sha[:10], "--wells", "D03"
    )
    assert code == 0, err

    args = ["ingest", str(human / "images"), "--plate", "human", "--pattern", HUMAN]
    args += ["--channel-map", "0=DNA,1=PH3,2=cellbody", "--quiet"]
    code, out, err = await cellmesh(*args)
    assert code == 0, err
    assert "uploaded            3 (0.8 MB)" in out
    assert "registered          3 new, 0 replaced, 0 unchanged" in out
    assert "sites made ready    1" in out.splitlines()

    code, out, err = await cellmesh(*args)
    assert code == 0, err
    assert "uploaded            0 (0.0 MB)" in out
    assert "skipped             3 (3 already registered, 0 already stored)" in out

    async with CellmeshClient(catalog_address, credentials=test_pki.credentials("scientist")) as client:
        images = await client.list_images("human")
        # (well, site, channel) order; channel order follows the database's collation
        assert sorted((i.site.well, i.site.site, i.channel, i.object.key) for i in images) == [
            ("D03", 0, c, f"images/human/D03/s0/{c}/AS_09125_050116030001_D03f00d{n}.tif")
            for n, c in enumerate(["DNA", "PH3", "cellbody"])
        ]
        assert (await client.get_plate("human")).image_count == 3

    code, out, err = await cellmesh("sites", "human")
    assert code == 0, err
    assert out.splitlines()[1].split()[:3] == ["D03", "0", "ready"]

    code, out, err = await cellmesh("plate", "show", "nope")
    assert (code, out) == (1, "")
    assert err.startswith("error: NOT_FOUND: ")


async def test_cli_registers_and_creates_a_workflow_of_stages(
    catalog_address: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    examples = EXAMPLES

    async def cellmesh(*args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, ["--catalog", catalog_address, *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = await cellmesh("pipeline", "register", str(examples / "illum_dna.cppipe"))
    assert code == 0, err
    assert "runs      per plate (a plate stage): CorrectIlluminationCalculate (module 5)" in out
    illum = out.split("sha256    ")[1].split()[0]
    assert "groups" not in out
    per_well = tmp_path / "illum_per_well.cppipe"
    per_well.write_text(grouped((examples / "illum_dna.cppipe").read_text(), "Well"))
    code, out, err = await cellmesh("pipeline", "register", str(per_well))
    assert code == 0, err
    assert "  groups    by Metadata_Well (the Groups module)" in out
    analysis_file = str(examples / "nuclei_illum.cppipe")
    code, _, err = await cellmesh("pipeline", "register", analysis_file)
    assert code == 1 and "IllumDNA" in err
    code, out, err = await cellmesh("pipeline", "register", analysis_file, "--from-stage", "IllumDNA.npy")
    assert code == 0, err
    assert "runs      per site" in out and "from an earlier plate stage  IllumDNA.npy" in out
    analysis = out.split("sha256    ")[1].split()[0]
    code, _, err = await cellmesh("pipeline", "register", str(examples / "nuclei.cppipe"), "--scope", "plate")
    assert code == 0, err

    # The analysis cannot be a plate's first stage: its illumination function would never exist.
    code, _, err = await cellmesh(
        "plate", "create", "W0", "--channels", "DNA,GFP", "--pipeline", analysis[:12]
    )
    assert code == 1, err
    code, out, err = await cellmesh(
        "plate",
        "create",
        "W1",
        "--channels",
        "DNA,GFP",
        "--pipeline",
        illum[:12],
        "--pipeline",
        analysis[:12],
    )
    assert code == 0, err
    assert f"pipelines             {illum}, {analysis}" in out


async def test_cli_ingest_carries_the_pattern_s_other_groups_as_site_metadata(
    catalog_address: str,
    s3_settings: S3Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_settings.endpoint_url or "")
    monkeypatch.setenv("S3_BUCKET", s3_settings.bucket)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_settings.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_settings.secret_key)

    async def cellmesh(*args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, ["--catalog", catalog_address, *args])
        out, err = capsys.readouterr()
        return code, out, err

    folder = tmp_path / "microscope"
    compounds = {("A01", 0): "DMSO", ("A01", 1): "DMSO", ("A02", 0): "taxol", ("A02", 1): "taxol"}
    for (well, site), compound in compounds.items():
        for channel, path in synth.write_site(folder, "M1", well, site, 3, size=64).items():
            path.rename(folder / f"{well}_s{site}_{channel}_{compound}.tif")
    code, out, err = await cellmesh("pipeline", "register", str(EXAMPLES / "nuclei.cppipe"))
    assert code == 0, err
    sha = out.split("sha256    ")[1].split()[0]
    code, out, err = await cellmesh("plate", "create", "M1", "--channels", "DNA,GFP", "--pipeline", sha[:12])
    assert code == 0, err
    pattern = r"^(?P<Well>[A-P]\d{2})_s(?P<Site>\d)_(?P<Channel>DNA|GFP)_(?P<Compound>\w+)\.tif$"
    code, out, err = await cellmesh("ingest", str(folder), "--plate", "M1", "--pattern", pattern, "--quiet")
    assert code == 0, err
    assert "registered          8 new, 0 replaced, 0 unchanged" in out
    async with CellmeshClient(catalog_address, credentials=test_pki.credentials("scientist")) as client:
        sites = await client.list_sites("M1")
        assert {(s.site.well, s.site.site): dict(s.metadata) for s in sites} == {
            key: {"Compound": value} for key, value in compounds.items()
        }
    code, out, err = await cellmesh("sites", "M1")
    assert code == 0, err
    assert out.splitlines()[0].split()[-1] == "METADATA"
    assert [line.split()[-1] for line in out.splitlines()[1:]] == [
        "Compound=DMSO",
        "Compound=DMSO",
        "Compound=taxol",
        "Compound=taxol",
    ]

    # Two channels of one site that say other compounds are refused, naming both values.
    later = tmp_path / "later"
    for channel, path in synth.write_site(later, "M1", "A02", 2, 3, size=64).items():
        path.rename(later / f"A02_s2_{channel}_taxol.tif")
    (later / "A02_s2_GFP_taxol.tif").rename(later / "A02_s2_GFP_DMSO.tif")
    code, out, err = await cellmesh("ingest", str(later), "--plate", "M1", "--pattern", pattern, "--quiet")
    assert code == 1
    assert err.startswith("error: INVALID_ARGUMENT: ") and "metadata Compound as 'taxol' and 'DMSO'" in err, (
        err
    )


async def test_cli_registers_a_plate_map_with_the_plate_and_later(
    catalog_address: str, capsys: pytest.CaptureFixture[str], tmp_path: Path, shared_data: Path
) -> None:
    async def cellmesh(*args: str) -> tuple[int, str, str]:
        code = await asyncio.to_thread(main, ["--catalog", catalog_address, *args])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = await cellmesh("pipeline", "register", str(EXAMPLES / "nuclei.cppipe"))
    assert code == 0, err
    sha = out.split("sha256    ")[1].split()[0]
    sbs = shared_data / "bbbc013_translocation_plate" / "images" / "1049_Metadata.csv"
    code, out, err = await cellmesh(
        "plate", "create", "SBS", "--channels", "DNA,GFP", "--pipeline", sha[:12], "--rows", "8",
        "--platemap", str(sbs), "--qc-feature", "Nuclei_Math_Ratio1", "--min-z-prime", "0.5",
        "--max-failed-share", "0.1",
    )  # fmt: skip
    assert code == 0, err
    assert (
        "plate map             1049_Metadata.csv: 96 wells by row Row and column Column;"
        " columns Metadata_SBS_Doses, Metadata_SBS_Controls" in out
    )
    assert "QC gate               Z' of Nuclei_Math_Ratio1 at least 0.5; at most 10.0% of sites failed" in out

    # A bad map is refused before anything is sent, saying what to fix.
    bad = tmp_path / "bad.csv"
    bad.write_text("Well,Dose\nA01,1\nA1,2\n")
    code, _, err = await cellmesh("platemap", "register", "SBS", str(bad))
    assert code != 0 and "well A01 is in the plate map twice (lines 2 and 3)" in err, err
    # One that is a map but not of this 8 x 12 plate is refused by the catalog.
    bad.write_text("well_position,pert_type\nA01,negcon\nP24,poscon\n")
    code, _, err = await cellmesh("platemap", "register", "SBS", str(bad))
    assert code != 0 and "well 'P24' is not a well of the plate (8 x 12 wells)" in err, err
    good = tmp_path / "jump.csv"
    good.write_text("well_position,pert_type,pert_dose\nA01,negcon,0\nA02,poscon,10\n")
    code, out, err = await cellmesh("platemap", "register", "SBS", str(good))
    assert code == 0, err
    assert "plate map             jump.csv: 2 wells by well column well_position" in out
    assert "QC gate               Z' of Nuclei_Math_Ratio1" in out  # the gate stays


async def test_cli_follow_shows_a_failed_qc_gate(
    catalog_address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from cellmesh.catalog.v1 import catalog_pb2

    from tests.catalog.kit import claim_all, new_plate, ready_sites, run_to_done
    from tests.catalog.test_catalog_progress import report

    async with test_pki.channel(catalog_address, "operator") as channel:  # it plays every service
        stub = catalog_pb2_grpc.CatalogServiceStub(channel)
        layout = catalog_pb2.PlateLayout(rows=8, columns=12, sites_per_well=1, wells=["A01"])
        await new_plate(stub, "P1", layout=layout)
        await ready_sites(stub, "P1", 1)
        (claim,) = await claim_all(stub)
        await run_to_done(stub, claim)
        (run,) = (
            await stub.ClaimReducibleRuns(
                catalog_pb2.ClaimReducibleRunsRequest(scheduler_id="s1", max_runs=1, lease_seconds=60)
            )
        ).claims
        made = report(run, sites=1)
        made.qc.CopyFrom(
            catalog_pb2.PlateQc(
                gated=True, passed=False, failures=["Z' of Nuclei_Math_Ratio1 is 0.12, below 0.5"]
            )
        )
        await stub.RegisterPlateReport(catalog_pb2.RegisterPlateReportRequest(report=made))
    code = await asyncio.to_thread(main, ["--catalog", catalog_address, "follow", "P1", "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "QC gate FAILED: Z' of Nuclei_Math_Ratio1 is 0.12, below 0.5" in out
