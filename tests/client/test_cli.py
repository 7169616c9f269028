"""The `cellmesh` command line against the fake catalog and reducer on a real
gRPC server and the project's S3 server."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cellmesh.catalog.v1 import catalog_pb2
from cellmesh.cli import main
from cellmesh.client import ObjectStore, ObjectStoreConfig
from cellmesh.common.v1 import types_pb2

from tests.client.fake_catalog import ServerThread

BBBC013 = r"Channel(?P<Channel>\d)-(?P<ImageNumber>\d+)-(?P<WellRow>[A-P])-(?P<WellColumn>\d+)\.tif"


def run(mesh: ServerThread, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--catalog", mesh.address, "--reducer", mesh.address, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_not_found_is_one_line_on_stderr(mesh: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(mesh, capsys, "plate", "show", "nope")
    assert (code, out, err) == (1, "", "error: NOT_FOUND: plate nope does not exist\n")


def test_ingest_into_a_missing_plate(
    mesh: ServerThread, s3_env: ObjectStoreConfig, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = shared_data / "bbbc013_translocation_plate" / "images"
    code, out, err = run(mesh, capsys, "ingest", str(folder), "--plate", "nope", "--pattern", BBBC013)
    assert (code, err) == (1, "error: NOT_FOUND: plate nope does not exist\n")


def test_python_m_and_no_traceback(mesh: ServerThread) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cellmesh.cli", "--catalog", mesh.address, "sites", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CELLMESH_CATALOG": "127.0.0.1:1"},
    )
    assert (proc.returncode, proc.stdout, proc.stderr) == (
        1,
        "",
        "error: NOT_FOUND: plate nope does not exist\n",
    )


def test_catalog_from_the_environment(
    mesh: ServerThread, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CELLMESH_CATALOG", mesh.address)
    mesh.catalog.add_plate("P1", ["DNA"])
    assert main(["plate", "list"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:2] == ["NAME", "CHANNELS"]
    assert out.splitlines()[1].startswith("P1")


def test_bad_arguments_are_invalid_argument(
    mesh: ServerThread, s3_env: ObjectStoreConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(mesh, capsys, "ingest", str(tmp_path), "--plate", "P1", "--pattern", "(?P<Channel>")
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: the pattern is not a regular expression")
    code, _, err = run(mesh, capsys, "ingest", str(tmp_path / "no"), "--plate", "P1", "--pattern", BBBC013)
    assert (code, err) == (1, f"error: NOT_FOUND: {tmp_path / 'no'} is not a folder\n")
    code, _, err = run(mesh, capsys, "requeue", "P1", "--site", "A01")
    assert (code, err) == (1, "error: INVALID_ARGUMENT: site 'A01' is not WELL/SITE (e.g. A01/0)\n")
    code, _, err = run(mesh, capsys, "sites", "P1", "--state", "broken")
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: unknown site state 'broken'")


def test_pipeline_and_plate_commands(
    mesh: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "nuclei.cppipe"
    path.write_bytes(b"CellProfiler Pipeline: http://www.cellprofiler.org\nVersion:5\n")
    code, out, _ = run(mesh, capsys, "pipeline", "register", str(path), "--name", "nuclei-v2")
    assert code == 0 and out.startswith("registered: pipeline nuclei-v2")
    sha = next(iter(mesh.catalog.pipelines))
    assert f"sha256    {sha}" in out
    code, out, _ = run(mesh, capsys, "pipeline", "list")
    assert code == 0 and sha in out and "nuclei-v2" in out

    code, out, _ = run(
        mesh, capsys, "plate", "create", "P1", "--channels", "DNA,GFP", "--pipeline", sha[:8],
        "--rows", "16", "--columns", "24", "--sites", "4", "--wells", "a1,B02", "--strict",
    )  # fmt: skip
    assert code == 0, out
    plate = mesh.catalog.plates["P1"]
    assert list(plate.channels) == ["DNA", "GFP"] and list(plate.pipeline_sha256) == [sha]
    assert (
        plate.layout.rows,
        plate.layout.columns,
        plate.layout.sites_per_well,
        plate.layout.first_site,
    ) == (16, 24, 4, 0)
    assert list(plate.layout.wells) == ["A01", "B02"]
    assert not plate.reduce_with_failures

    code, out, _ = run(mesh, capsys, "plate", "create", "P2", "--channels", "DNA", "--pipeline", sha)
    assert code == 0 and not mesh.catalog.plates["P2"].HasField("layout")
    assert "cellmesh plate finish P2" in out
    assert mesh.catalog.plates["P2"].reduce_with_failures

    code, _, err = run(mesh, capsys, "plate", "create", "P3", "--channels", "DNA", "--pipeline", "ffff")
    assert (code, err) == (1, "error: NOT_FOUND: no registered pipeline's SHA-256 starts with 'ffff'\n")

    code, out, _ = run(mesh, capsys, "plate", "show", "P1")
    assert code == 0 and "channels              DNA, GFP" in out and "PIPELINE" in out
    code, out, _ = run(mesh, capsys, "plate", "finish", "P2")
    assert code == 0 and mesh.catalog.plates["P2"].acquisition_finished


def test_ingest_command_twice(
    mesh: ServerThread, s3_env: ObjectStoreConfig, shared_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mesh.catalog.add_plate("sbs", ["GFP", "DNA"])
    folder = shared_data / "bbbc013_translocation_plate" / "images"
    args = ["ingest", str(folder), "--plate", "sbs", "--pattern", BBBC013, "--channel-map", "1=GFP,2=DNA"]

    code, out, err = run(mesh, capsys, *args)
    assert code == 0, err
    lines = out.splitlines()
    assert "uploaded            96 (" in out
    assert "sites made ready    48" in lines
    assert "unmatched           3" in lines
    assert "  1049_Metadata.csv: does not match the pattern" in lines
    assert len(mesh.catalog.images) == 96

    code, out, err = run(mesh, capsys, *args, "--quiet")
    assert code == 0, err
    assert "uploaded            0 (0.0 MB)" in out
    assert "skipped             96 (96 already registered, 0 already stored)" in out


def test_sites_and_requeue(mesh: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    mesh.catalog.add_plate("P1", ["DNA"])
    mesh.catalog.sites["P1"] = [
        catalog_pb2.SiteJob(
            site=types_pb2.SiteRef(plate="P1", well="A01"), state=types_pb2.SITE_STATE_DONE, attempt=1
        ),
        catalog_pb2.SiteJob(
            site=types_pb2.SiteRef(plate="P1", well="A02", site=1),
            state=types_pb2.SITE_STATE_FAILED,
            attempt=3,
            failure_class=types_pb2.FAILURE_CLASS_CP_PROBLEM,
            failure_reason="IdentifyPrimaryObjects:\n  out of memory",
        ),
    ]
    code, out, _ = run(mesh, capsys, "sites", "P1", "--state", "failed")
    assert code == 0
    assert out.splitlines()[0].split() == [
        "WELL",
        "SITE",
        "STATE",
        "ATTEMPT",
        "FAILURE",
        "MESSAGE",
        "METADATA",
    ]
    assert out.splitlines()[1].split(None, 5) == [
        "A02",
        "1",
        "failed",
        "3",
        "CP_PROBLEM",
        "IdentifyPrimaryObjects: out of memory",
    ]
    assert len(out.splitlines()) == 2

    code, out, _ = run(mesh, capsys, "requeue", "P1")
    assert (code, out) == (0, "requeued 1 failed site(s) of plate P1\n")
    code, out, _ = run(mesh, capsys, "requeue", "P1", "--site", "A01/0", "--site", "a2/1")
    assert code == 0 and out.startswith("requeued 2 given")
    assert [(s.well, s.site) for s in mesh.catalog.requeue_calls[-1].sites] == [("A01", 0), ("A02", 1)]


def upload_report(config: ObjectStoreConfig, plate: str, corrupt: bool = False) -> catalog_pb2.PlateReport:
    async def go() -> catalog_pb2.PlateReport:
        async with ObjectStore(config) as store:
            png = await store.upload_bytes(f"reports/{plate}/g3/cells_per_well.png", b"\x89PNG", "image/png")
            table = await store.upload_bytes(
                f"reports/{plate}/g3/Nuclei.csv", b"ImageNumber\n1\n", "text/csv"
            )
        if corrupt:
            table.sha256 = "0" * 64
        return catalog_pb2.PlateReport(
            plate=plate,
            pipeline_sha256="ab" * 32,
            version=2,
            wells=48,
            sites=47,
            files=[
                catalog_pb2.ReportFile(
                    name="cells_per_well.png", kind=catalog_pb2.REPORT_FILE_KIND_HEATMAP_PNG, object=png
                ),
                catalog_pb2.ReportFile(
                    name="Nuclei.csv", kind=catalog_pb2.REPORT_FILE_KIND_OBJECT_TABLE_CSV, object=table
                ),
            ],
            missing_sites=[
                catalog_pb2.MissingSite(
                    site=types_pb2.SiteRef(plate=plate, well="B07"),
                    state=types_pb2.SITE_STATE_FAILED,
                    reason="not a TIFF",
                )
            ],
        )

    return asyncio.run(go())


def test_follow_until_the_report(
    mesh: ServerThread, s3_env: ObjectStoreConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    mesh.catalog.add_plate("P1", ["DNA"], sites_known=True)
    mesh.catalog.reports[("P1", 2)] = upload_report(s3_env, "P1")
    mesh.catalog.progress_stream = [
        catalog_pb2.PlateProgress(plate="P1", total=48, waiting=48),
        catalog_pb2.PlateProgress(plate="P1", total=48, queued=20, running=4, done=24),
        catalog_pb2.PlateProgress(plate="P1", total=48, done=47, failed=1, report_version=2, complete=True),
    ]
    code, out, err = run(mesh, capsys, "follow", "P1")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "waiting 48, ready 0, queued 0, running 0, done 0, failed 0 of 48"
    assert lines[2] == "waiting 0, ready 0, queued 0, running 0, done 47, failed 1 of 48"
    assert lines[3].startswith("report v2 of plate P1: 48 wells, 47 sites")
    assert f"  s3://{s3_env.bucket}/reports/P1/g3/cells_per_well.png  (4 bytes)" in lines
    assert "    B07/0 failed: not a TIFF" in lines
    assert lines[-1] == "fetch it with: cellmesh report P1 --version 2 --out DIR"


def test_follow_a_stream_that_ends_without_a_report(
    mesh: ServerThread, capsys: pytest.CaptureFixture[str]
) -> None:
    mesh.catalog.add_plate("P1", ["DNA"])
    mesh.catalog.progress_stream = [catalog_pb2.PlateProgress(plate="P1", total=2, waiting=2)]
    code, _, err = run(mesh, capsys, "follow", "P1", "--quiet")
    assert code == 1
    assert "has no layout and acquisition is not finished" in err
    assert err.endswith("error: UNAVAILABLE: the progress stream ended before a report was registered\n")


def test_report_fetches_verified_files(
    mesh: ServerThread, s3_env: ObjectStoreConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mesh.catalog.add_plate("P1", ["DNA"])
    mesh.catalog.reports[("P1", 2)] = upload_report(s3_env, "P1")
    code, out, err = run(mesh, capsys, "report", "P1", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert (tmp_path / "r" / "cells_per_well.png").read_bytes() == b"\x89PNG"
    assert (tmp_path / "r" / "Nuclei.csv").read_bytes() == b"ImageNumber\n1\n"
    assert "2 file(s) written, checksums verified:" in out

    code, _, err = run(mesh, capsys, "report", "P1", "--version", "1", "--out", str(tmp_path / "r1"))
    assert (code, err) == (1, "error: NOT_FOUND: plate P1 has no report v1\n")

    mesh.catalog.reports[("P1", 3)] = upload_report(s3_env, "P1", corrupt=True)
    code, _, err = run(mesh, capsys, "report", "P1", "--out", str(tmp_path / "bad"))
    assert code == 1 and err.startswith("error: DATA_LOSS: reports/P1/g3/Nuclei.csv: SHA-256 is ")
    assert not (tmp_path / "bad" / "Nuclei.csv").exists()


def test_report_cpa_options_are_checked(
    mesh: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = str(tmp_path / "r")
    code, _, err = run(mesh, capsys, "report", "P1", "--out", out_dir, "--images", "--presign", "60")
    assert (code, err) == (
        1,
        "error: INVALID_ARGUMENT: give --images (a local copy) or --presign (URLs), not both\n",
    )
    code, _, err = run(mesh, capsys, "report", "P1", "--out", out_dir, "--presign", "700000")
    assert code == 1 and "give 1 to 604800 seconds" in err
    assert not (tmp_path / "r").exists()


def test_reduce(mesh: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    mesh.catalog.add_plate("P1", ["DNA"])
    code, out, _ = run(mesh, capsys, "reduce", "P1", "--feature", "Intensity_MeanIntensity_GFP")
    assert code == 0 and out.startswith("report v1 of plate P1")
    assert list(mesh.reducer.calls[0].heatmap_features) == ["Intensity_MeanIntensity_GFP"]


def test_ingest_watch_stops_on_interrupt_with_a_summary(
    mesh: ServerThread, s3_env: ObjectStoreConfig, shared_data: Path, tmp_path: Path
) -> None:
    mesh.catalog.add_plate("sbs", ["GFP", "DNA"])
    folder = tmp_path / "microscope"
    folder.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cellmesh.cli",
            "--catalog",
            mesh.address,
            "ingest",
            str(folder),
            "--plate",
            "sbs",
        ]
        + ["--pattern", BBBC013, "--channel-map", "1=GFP,2=DNA", "--watch", "0.1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        source = shared_data / "bbbc013_translocation_plate" / "images"
        for name in ("Channel1-01-A-01.tif", "Channel2-01-A-01.tif"):
            (folder / name).write_bytes((source / name).read_bytes())
        deadline = time.monotonic() + 30
        while len(mesh.catalog.images) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(mesh.catalog.images) == 2
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert re.search(
        r"^\d uploaded, \d registered, \d sites ready, 0 unmatched, \d not ready yet$", out, re.M
    )
    assert "uploaded            2 (" in out
    assert "sites made ready    1" in out.splitlines()
