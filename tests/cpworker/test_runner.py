"""The CellProfiler runners against the real CellProfiler 4.2.8.1.

CellProfiler comes from CP_PYTHON, or else from scripts/install_cellprofiler.sh
(a few seconds when its environment is cached, ~13 minutes to build it). A
machine where it cannot be had fails these tests; nothing is skipped.

Real data: ExampleHuman from ../shared/data (beside the clone). Generated data:
services/common/synth.py sites with a known number of nuclei.
"""

from __future__ import annotations

import asyncio
import csv
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from services.common import synth
from services.cpworker.runner import (
    DONE_FILE_NAME,
    ChildNetwork,
    ColdRunner,
    Outcome,
    RunResult,
    WarmRunner,
    judge_outputs,
    network_prefix,
)

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("CELLMESH_SHARED_DATA", REPO / ".." / "shared" / "data")).resolve()
EXAMPLE_HUMAN = SHARED_DATA / "example_human"
NUCLEI_PIPELINE = REPO / "examples" / "pipelines" / "nuclei.cppipe"
SITE_TIMEOUT = 120.0

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def cp_python() -> Path:
    if os.environ.get("CP_PYTHON"):
        path = Path(os.environ["CP_PYTHON"])
        if not path.exists():
            pytest.fail(f"CP_PYTHON={path} does not exist")
        return path
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "install_cellprofiler.sh")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(
            "CellProfiler is needed: scripts/install_cellprofiler.sh failed "
            f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def warm(cp_python: Path) -> AsyncIterator[WarmRunner]:
    runner = WarmRunner(cp_python)
    await runner.start()
    yield runner
    await runner.close()


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cold(cp_python: Path) -> AsyncIterator[ColdRunner]:
    runner = ColdRunner(cp_python)
    yield runner
    await runner.close()


def read_table(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def count_nuclei(output_dir: Path) -> int:
    (row,) = read_table(output_dir / "Image.csv")
    return int(float(row["Count_Nuclei"]))


def assert_ok(
    result: RunResult, output_dir: Path, tables: tuple[str, ...] = ("Image.csv", "Nuclei.csv")
) -> None:
    assert result.ok, f"{result.reason}\n{result.stderr_tail}"
    assert result.outcome is Outcome.SUCCESS
    assert result.cp_version == "4.2.8.1"
    ok, why = judge_outputs(output_dir, tables)
    assert ok, why


def example_human_files() -> list[Path]:
    files = sorted((EXAMPLE_HUMAN / "images").glob("*.tif"))
    assert len(files) == 3, f"ExampleHuman images not found under {EXAMPLE_HUMAN}"
    return files


def site_files(paths: dict[str, Path]) -> list[Path]:
    return [paths[c] for c in synth.CHANNELS]


async def test_example_human_counts_289_nuclei_warm_and_cold(
    warm: WarmRunner, cold: ColdRunner, tmp_path: Path
) -> None:
    pipeline = EXAMPLE_HUMAN / "ExampleHuman.cppipe"
    for runner in (warm, cold):
        out = tmp_path / runner.mode
        result = await runner.run_site(pipeline, example_human_files(), out, SITE_TIMEOUT)
        assert_ok(result, out)
        assert result.image_sets == 1
        (row,) = read_table(out / "Image.csv")
        assert int(float(row["Count_Nuclei"])) == 289, runner.mode
        assert int(float(row["Count_PH3"])) == 22, runner.mode
        assert (out / DONE_FILE_NAME).read_text().strip() == "Complete"


async def test_warm_and_cold_give_identical_nuclei_measurements(
    warm: WarmRunner, cold: ColdRunner, tmp_path: Path
) -> None:
    files = site_files(synth.write_site(tmp_path / "in", "P1", "C07", 1, 23))
    tables = {}
    for runner in (warm, cold):
        out = tmp_path / runner.mode
        result = await runner.run_site(NUCLEI_PIPELINE, files, out, SITE_TIMEOUT)
        assert_ok(result, out)
        tables[runner.mode] = read_table(out / "Nuclei.csv")
    assert len(tables["warm"]) == 23
    assert tables["warm"][0].keys() == tables["cold"][0].keys()
    assert len(tables["warm"][0]) > 50  # intensity, size and shape features
    assert tables["warm"] == tables["cold"]


async def test_generated_sites_count_what_was_drawn(warm: WarmRunner, tmp_path: Path) -> None:
    # 12 sites across the plate: counts from the low to the high end.
    sites = [(w, s) for w in ("A01", "A12", "D06", "E09", "H01", "H12") for s in (1, 2)]
    drawn = [synth.nuclei_for(w, s) for w, s in sites]
    assert min(drawn) <= 8 and max(drawn) >= 35 and len(set(drawn)) >= 8
    for (well, site), nuclei in zip(sites, drawn, strict=True):
        files = site_files(synth.write_site(tmp_path / "in", "P1", well, site))
        out = tmp_path / f"{well}_s{site}"
        result = await warm.run_site(NUCLEI_PIPELINE, files, out, SITE_TIMEOUT)
        assert_ok(result, out)
        assert count_nuclei(out) == nuclei, f"{well} s{site}"
        assert len(read_table(out / "Nuclei.csv")) == nuclei


async def test_time_limit_kills_the_run_and_the_warm_runner_goes_on(warm: WarmRunner, tmp_path: Path) -> None:
    files = site_files(synth.write_site(tmp_path / "in", "P1", "B02", 1, 12))
    # A run that takes far longer than its limit: a 4096 x 4096 site.
    big = synth.make_site(40, size=4096, seed=1)
    slow = [tmp_path / "big" / f"P1_B02_s9_{c}.tif" for c in synth.CHANNELS]
    slow[0].parent.mkdir()
    import tifffile

    for path, channel in zip(slow, synth.CHANNELS, strict=True):
        tifffile.imwrite(path, big[channel])
    pid_before = warm.pid
    result = await warm.run_site(NUCLEI_PIPELINE, slow, tmp_path / "slow", timeout=0.5)
    assert not result.ok
    assert result.timed_out
    assert result.reason == "time limit of 0.5 s exceeded"
    assert warm.pid is None  # the child was killed
    assert pid_before is not None and not _alive(pid_before)
    assert not judge_outputs(tmp_path / "slow", ())[0]

    out = tmp_path / "next"
    result = await warm.run_site(NUCLEI_PIPELINE, files, out, SITE_TIMEOUT)
    assert_ok(result, out)
    assert count_nuclei(out) == 12


async def test_killed_child_is_reported_and_replaced(warm: WarmRunner, tmp_path: Path) -> None:
    files = site_files(synth.write_site(tmp_path / "in", "P1", "B03", 1, 15))
    await warm.start()
    pid = warm.pid
    assert pid is not None
    run = asyncio.create_task(warm.run_site(NUCLEI_PIPELINE, files, tmp_path / "killed", SITE_TIMEOUT))
    await asyncio.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    result = await run
    assert not result.ok
    assert result.reason.startswith("CellProfiler process died: exit -9 (SIGKILL)"), result.reason

    out = tmp_path / "after"
    result = await warm.run_site(NUCLEI_PIPELINE, files, out, SITE_TIMEOUT)
    assert_ok(result, out)
    assert warm.pid not in (None, pid)
    assert count_nuclei(out) == 15


async def test_cancelled_run_does_not_leak_into_the_next(warm: WarmRunner, tmp_path: Path) -> None:
    # A worker draining on SIGTERM cancels its site; the child's late answer
    # must not be taken for the next site's.
    first = site_files(synth.write_site(tmp_path / "in", "P1", "B04", 1, 30))
    second = site_files(synth.write_site(tmp_path / "in", "P1", "B05", 1, 9))
    await warm.start()
    run = asyncio.create_task(warm.run_site(NUCLEI_PIPELINE, first, tmp_path / "cancelled", SITE_TIMEOUT))
    await asyncio.sleep(0.1)
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run
    out = tmp_path / "next"
    result = await warm.run_site(NUCLEI_PIPELINE, second, out, SITE_TIMEOUT)
    assert_ok(result, out)
    assert count_nuclei(out) == 9


async def test_corrupt_tiff_fails_with_a_reason(warm: WarmRunner, cold: ColdRunner, tmp_path: Path) -> None:
    files = site_files(synth.write_site(tmp_path / "in", "P1", "D04", 1, 10))
    # Keep a valid TIFF header, then garbage: a truncated upload looks like this.
    data = files[0].read_bytes()
    files[0].write_bytes(data[:8] + os.urandom(4000))
    for runner in (warm, cold):
        out = tmp_path / runner.mode
        result = await runner.run_site(NUCLEI_PIPELINE, files, out, SITE_TIMEOUT)
        assert not result.ok, runner.mode
        assert result.reason, runner.mode
        assert result.outcome is Outcome.CP_PROBLEM
        ok, why = judge_outputs(out, ("Image.csv",))
        assert not ok and why
    # The warm process survived the bad input.
    out = tmp_path / "good"
    good = site_files(synth.write_site(tmp_path / "in2", "P1", "D04", 2, 11))
    result = await warm.run_site(NUCLEI_PIPELINE, good, out, SITE_TIMEOUT)
    assert_ok(result, out)


async def test_warm_child_is_recycled_after_n_sites(cp_python: Path, tmp_path: Path) -> None:
    files = site_files(synth.write_site(tmp_path / "in", "P1", "E05", 1, 14))
    async with WarmRunner(cp_python, recycle_after=2) as runner:
        pids = []
        for i in range(3):
            out = tmp_path / str(i)
            result = await runner.run_site(NUCLEI_PIPELINE, files, out, SITE_TIMEOUT)
            assert_ok(result, out)
            pids.append(runner.pid)
        assert runner.children_started == 2
        assert pids[0] == pids[1] != pids[2]
    assert runner.pid is None


async def test_the_warm_child_sees_no_credentials_and_has_its_own_home(
    cp_python: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's secrets stay out of the process that runs registered
    pipelines; it works in a folder of its own, which goes when the runner closes."""
    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI",
        "AMQP_URL": "amqp://cellmesh:hunter2@127.0.0.1:5672/%2F",
        "DATABASE_URL": "mysql+asyncmy://root:hunter2@127.0.0.1/cellmesh",
        "S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        "MARIADB_PASSWORD": "hunter2",
        "AMQP_URL_FILE": "/run/secrets/amqp_url",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    files = site_files(synth.write_site(tmp_path / "in", "P1", "F06", 1, 9))
    async with WarmRunner(cp_python) as runner:
        out = tmp_path / "out"
        assert_ok(await runner.run_site(NUCLEI_PIPELINE, files, out, SITE_TIMEOUT), out)
        assert runner.pid is not None
        environ, raw, cwd = child_process(runner.pid)
        home = Path(environ["HOME"])
        assert not set(secrets) & set(environ), sorted(environ)
        assert "hunter2" not in raw
        assert home.name.startswith("cellmesh-cp-home-") and cwd == await asyncio.to_thread(home.resolve)
    assert not await asyncio.to_thread(home.exists)


async def test_the_warm_child_has_no_network(cp_python: Path, tmp_path: Path) -> None:
    """CP_CHILD_NETWORK=none: the child runs a site in a network namespace of
    its own, where the broker on this machine cannot be reached (probed from
    inside that namespace), while the worker reaches it."""
    broker = ("127.0.0.1", 5672)
    probe = (
        "import socket,sys\n"
        f"try:\n socket.create_connection({broker!r}, timeout=3)\n"
        "except OSError as e:\n print('unreachable:', e); sys.exit(0)\n"
        "print('reached'); sys.exit(1)\n"
    )
    with socket.create_connection(broker, timeout=3):
        pass  # the worker's own network reaches the broker
    files = site_files(synth.write_site(tmp_path / "in", "P1", "F07", 1, 7))
    async with WarmRunner(cp_python, network=ChildNetwork.NONE) as runner:
        out = tmp_path / "out"
        result = await runner.run_site(NUCLEI_PIPELINE, files, out, SITE_TIMEOUT)
        assert_ok(result, out)
        assert count_nuclei(out) == 7
        assert runner.pid is not None
        child_ns = os.readlink(f"/proc/{runner.pid}/ns/net")
        assert child_ns != os.readlink("/proc/self/ns/net")
        inside = await asyncio.to_thread(
            subprocess.run,
            ["nsenter", f"--net=/proc/{runner.pid}/ns/net", sys.executable, "-c", probe],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert inside.returncode == 0 and "unreachable" in inside.stdout, (inside.stdout, inside.stderr)


async def test_the_cold_child_gets_the_same_network_setting(cp_python: Path, tmp_path: Path) -> None:
    assert network_prefix(ChildNetwork.HOST) == []
    assert network_prefix("none")[:2] == ["unshare", "--net"]  # root here: a namespace of its own
    with pytest.raises(ValueError):
        ChildNetwork("internet")
    isolated, shared = ColdRunner(cp_python, network="none"), ColdRunner(cp_python, network="host")
    for runner in (isolated, shared):
        await runner.start()
    args = (tmp_path / "p.cppipe", tmp_path / "list.txt", tmp_path / "out", tmp_path / "in")
    assert isolated.command(*args)[:3] == ["unshare", "--net", "--"]
    assert shared.command(*args)[0] == str(cp_python)
    for runner in (isolated, shared):
        await runner.close()


async def test_none_refuses_to_start_where_no_namespace_can_be_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")  # no unshare to be found
    with pytest.raises(RuntimeError, match="CP_CHILD_NETWORK=none.*CP_CHILD_NETWORK=auto"):
        network_prefix(ChildNetwork.NONE)
    assert network_prefix(ChildNetwork.AUTO) == []  # auto: the worker's network, with a warning


def child_process(pid: int) -> tuple[dict[str, str], str, Path]:
    """(environment, its raw text, current folder) of a running process, from /proc."""
    proc = Path("/proc") / str(pid)
    raw = proc.joinpath("environ").read_text()
    environ = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
    return environ, raw, proc.joinpath("cwd").resolve()


async def test_missing_input_is_an_input_problem(warm: WarmRunner, tmp_path: Path) -> None:
    result = await warm.run_site(NUCLEI_PIPELINE, [tmp_path / "nope_DNA.tif"], tmp_path / "out", 10)
    assert not result.ok
    assert result.outcome is Outcome.INPUT_PROBLEM
    assert "nope_DNA.tif" in result.reason


async def test_judge_outputs_needs_complete_and_tables(tmp_path: Path) -> None:
    assert judge_outputs(tmp_path, ()) == (False, f"no {DONE_FILE_NAME}: CellProfiler did not finish")
    (tmp_path / DONE_FILE_NAME).write_text("Failure\n")
    assert not judge_outputs(tmp_path, ())[0]
    (tmp_path / DONE_FILE_NAME).write_text("Complete\n")
    # No tables expected (a pipeline that only saves images): some file is.
    assert judge_outputs(tmp_path, ()) == (
        False,
        "the pipeline exports no tables and wrote no files (SaveImages saved nothing)",
    )
    assert judge_outputs(tmp_path, (), files_if_no_tables=False) == (True, "")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "DNA.tiff").write_bytes(b"II*\x00")
    assert judge_outputs(tmp_path, ()) == (True, "")
    assert judge_outputs(tmp_path, ("Image.csv",)) == (False, "expected table Image.csv is missing")
    (tmp_path / "Image.csv").write_text("")
    assert judge_outputs(tmp_path, ("Image.csv",)) == (False, "expected table Image.csv is empty")
    (tmp_path / "Image.csv").write_text("ImageNumber\n1\n")
    assert judge_outputs(tmp_path, ("Image.csv",)) == (True, "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
