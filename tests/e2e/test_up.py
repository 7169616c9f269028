"""`cellmesh up`, the README's commands with nothing set, `cellmesh down`:
real processes (the project's S3 server, the SQLite catalog or MariaDB,
RabbitMQ, a warm CellProfiler worker), and no process left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from services.common.amqp import Topology
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
#: Variables that would point the client or the launcher somewhere else.
STRIPPED = re.compile(r"^(CELLMESH_|S3_|AWS_|XDG_|CP_PYTHON$|DATABASE_URL$|AMQP_URL$|CATALOG_ADDR$)")


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The user's environment with no mesh variable, HOME in a temporary
    folder (so ~/.config and ~/.local/share are the test's own), and this
    venv's `cellmesh` first on PATH."""
    env = {k: v for k, v in os.environ.items() if not STRIPPED.match(k)}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", **extra)
    return env


def readme_commands(shared_data: Path) -> list[str]:
    """The commands of the README's "Your own plates" block, with
    ../shared/data where this machine has it."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Your own plates", 1)[1].split("\n## ", 1)[0]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return [c.replace("../shared/data", str(shared_data)) for c in commands]


def sh(
    command: str, env: dict[str, str], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", command], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def start_time(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def descendants(root: int) -> dict[int, int | None]:
    """`root` and every process under it, with start times."""
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        tree[pid] = start_time(pid)
        todo += [p for p, pp in parent.items() if pp == pid and p not in tree]
    return tree


def mentioning(text: str) -> list[str]:
    """Live processes whose command line, environment or working folder holds `text`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            environ = (entry / "environ").read_bytes().decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if start_time(int(entry.name)) is not None and (text in cmdline or text in environ or text in cwd):
            found.append(f"{entry.name}: {cmdline.replace(chr(0), ' ')[:200]}")
    return found


def assert_nothing_left(tree: dict[int, int | None], state_dir: Path) -> None:
    left = [pid for pid, started in tree.items() if started is not None and start_time(pid) == started]
    assert not left, f"processes of the mesh still alive after down: {left}"
    assert not mentioning(str(state_dir)), mentioning(str(state_dir))


def queue_exists(amqp_url: str, name: str) -> bool:
    import pika
    from pika.exceptions import ChannelClosedByBroker

    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        conn.channel().queue_declare(name, passive=True)
        return True
    except ChannelClosedByBroker as exc:
        assert exc.reply_code == 404, exc
        return False
    finally:
        conn.close()


def running(state_dir: Path) -> dict[str, object]:
    data = json.loads((state_dir / "running.json").read_text())
    assert isinstance(data, dict)
    return data


def emergency_down(env: dict[str, str], cwd: Path, state_dir: Path) -> None:
    if (state_dir / "running.json").exists():
        sh(f"cellmesh down --state-dir {state_dir}", env, cwd, timeout=180)


def test_up_readme_commands_down(tmp_path: Path, shared_data: Path, amqp_url: str) -> None:
    """The README block, each command as a user types it, then nothing of the mesh remains."""
    home = tmp_path / "home"
    env = clean_env(home)
    work = tmp_path / "work"
    work.mkdir(parents=True)
    state_dir = home / ".local" / "share" / "cellmesh"
    config = home / ".config" / "cellmesh" / "mesh.json"
    commands = readme_commands(shared_data)
    assert commands[0] == "cellmesh up" and commands[-1] == "cellmesh down", commands
    timings: dict[str, float] = {}
    tree: dict[int, int | None] = {}
    try:
        for command in commands[:-1]:
            started = time.perf_counter()
            result = sh(command, env, work)
            timings[command.split()[1]] = time.perf_counter() - started
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
            if command == "cellmesh up":
                assert "cellmesh is up" in result.stdout, result.stdout
                assert f"finds it through {config}" in result.stdout
                assert (config.stat().st_mode & 0o777) == 0o600
                client_file = json.loads(config.read_text())
                assert client_file["state_dir"] == str(state_dir)
                tree = descendants(int(client_file["pid"]))
                # s3, catalog, scheduler, a worker (and its CellProfiler child), reducer, web.
                assert len(tree) >= 7, tree
                again = sh("cellmesh up", env, work)
                assert again.returncode == 0 and "already up" in again.stdout, again
                status = sh("cellmesh status", env, work)
                assert status.returncode == 0, status
                assert len(re.findall(r"\brunning\b", status.stdout)) == 6, status.stdout
        # The report, as CellProfiler's own command line counts that site (data README).
        cells = (work / "AS_09125-report" / "cells_per_well.csv").read_text().splitlines()
        assert cells[0].split(",")[:2] == ["Metadata_Plate", "Metadata_Well"]
        assert cells[1].startswith("AS_09125,D03,1,0,") and float(cells[1].split(",")[-1]) == 289
        # Processes started while it ran (a new CellProfiler child) count too.
        tree |= descendants(int(running(state_dir)["supervisor"]["pid"]))  # type: ignore[index]
        result = sh(commands[-1], env, work, timeout=180)
        assert result.returncode == 0, result
        assert_nothing_left(tree, state_dir)
        assert not config.exists() and not (state_dir / "running.json").exists()
        status = sh("cellmesh status", env, work)
        assert status.returncode == 1 and "no cellmesh runs" in status.stdout
        kept = json.loads((state_dir / "objects.json").read_text())
        assert sum(k.startswith("images/") for k in kept) == 3, sorted(kept)
        # The plate survives a restart: the catalog is SQLite in the state dir,
        # the built-in store's files come back from it.
        result = sh("cellmesh up", env, work)
        assert result.returncode == 0, result
        listed = sh("cellmesh plate list", env, work)
        assert listed.returncode == 0 and "AS_09125" in listed.stdout, listed
        again = sh("cellmesh report AS_09125 --out again", env, work)
        assert again.returncode == 0, again
        assert (work / "again" / "cells_per_well.csv").read_text() == "\n".join(cells) + "\n"
        # Its images too: the site runs again from them, and a new report follows.
        assert sh("cellmesh requeue AS_09125 --site D03/0", env, work).returncode == 0
        followed = sh("cellmesh follow AS_09125 --quiet", env, work)
        assert followed.returncode == 0 and "report v2 of plate AS_09125" in followed.stdout, followed
        tree |= descendants(int(running(state_dir)["supervisor"]["pid"]))  # type: ignore[index]
        assert sh("cellmesh down", env, work, timeout=180).returncode == 0
        assert_nothing_left(tree, state_dir)
    finally:
        emergency_down(env, work, state_dir)
    print("seconds per command:", {k: round(v, 1) for k, v in timings.items()})


def test_down_after_the_supervisor_was_killed(
    tmp_path: Path, mariadb_url: str, s3_endpoint: str, amqp_url: str
) -> None:
    """MariaDB and an external object store; the supervisor killed with -9:
    `status` says so and `down` still stops every process it had started."""
    home = tmp_path / "home"
    state_dir = tmp_path / "state"
    bucket = f"up-{os.getpid()}-{int(time.time())}"
    env = clean_env(home, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    up = (
        f"cellmesh up --state-dir {state_dir} --database-url '{mariadb_url}'"
        f" --s3-endpoint {s3_endpoint} --s3-bucket {bucket}"
    )
    try:
        result = sh(up, env, tmp_path)
        assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
        assert f"object store  {s3_endpoint}, bucket {bucket}\n" in result.stdout
        assert "in memory" not in result.stdout
        assert "root:***@" in result.stdout and mariadb_url not in json.dumps(running(state_dir))
        names = [p["name"] for p in running(state_dir)["processes"]]  # type: ignore[attr-defined]
        assert names == ["catalog", "scheduler", "cpworker-0", "reducer", "web"]
        web = str(running(state_dir)["web"])  # type: ignore[index]
        assert f"web page      {web}\n" in result.stdout
        with urllib.request.urlopen(f"{web}api/plates", timeout=10) as reply:
            assert json.loads(reply.read()) == {"plates": []}
        client = clean_env(home)
        pipeline = REPO / "examples" / "pipelines" / "nuclei.cppipe"
        result = sh(f"cellmesh pipeline register {pipeline} --name nuclei", client, tmp_path)
        assert result.returncode == 0, result
        supervisor = int(running(state_dir)["supervisor"]["pid"])  # type: ignore[index]
        topology = Topology(prefix=str(running(state_dir)["queue_prefix"]))
        assert queue_exists(amqp_url, topology.queue("sites"))
        tree = descendants(supervisor)
        os.kill(supervisor, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while start_time(supervisor) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        status = sh(f"cellmesh status --state-dir {state_dir}", env, tmp_path)
        assert status.returncode == 1 and "is not running" in status.stdout, status
        # Its services still run and answer; down finds them from the state file.
        assert sh("cellmesh pipeline list", client, tmp_path).stdout.count("nuclei") == 1
        result = sh(f"cellmesh down --state-dir {state_dir}", env, tmp_path, timeout=180)
        assert result.returncode == 0, result
        assert "still run; stopping them" in result.stderr
        assert_nothing_left(tree, state_dir)
        assert not (home / ".config" / "cellmesh" / "mesh.json").exists()
        # The queues the supervisor would have deleted are gone too.
        assert not queue_exists(amqp_url, topology.queue("sites"))
    finally:
        emergency_down(env, tmp_path, state_dir)


def test_foreground_until_ctrl_c(tmp_path: Path, amqp_url: str) -> None:
    """`cellmesh up --foreground` as a terminal runs it: Ctrl-C (SIGINT to the
    whole foreground group) stops the mesh in order, and nothing is left."""
    home = tmp_path / "home"
    state_dir = tmp_path / "state"
    env = clean_env(home)
    proc = subprocess.Popen(
        ["cellmesh", "up", "--foreground", "--state-dir", str(state_dir)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[0]
            if (state_dir / "running.json").exists() and running(state_dir).get("status") == "running":
                break
            time.sleep(0.3)
        else:
            raise AssertionError("the mesh did not come up in 300 s")
        tree = descendants(proc.pid)
        assert len(tree) >= 7, tree  # the cellmesh command, the supervisor, five services (and CellProfiler)
        listed = sh("cellmesh plate list", clean_env(home), tmp_path)
        assert listed.returncode == 0 and listed.stdout.startswith("NAME"), listed
        # A worker that dies is started again, and status shows the new one.
        (worker,) = [p for p in running(state_dir)["processes"] if p["name"] == "cpworker-0"]  # type: ignore[attr-defined]
        os.kill(worker["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            (again,) = [p for p in running(state_dir)["processes"] if p["name"] == "cpworker-0"]  # type: ignore[attr-defined]
            if again["pid"] != worker["pid"]:
                break
            time.sleep(0.2)
        assert again["pid"] != worker["pid"] and start_time(again["pid"]) == again["start_time"]
        status = sh(f"cellmesh status --state-dir {state_dir}", env, tmp_path)
        assert status.returncode == 0 and f"cpworker-0  {again['pid']}  running" in status.stdout, status
        tree |= descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out
        assert "cellmesh is up" in out and "every process of the mesh stopped" in out
        assert_nothing_left(tree, state_dir)
        assert not (home / ".config" / "cellmesh" / "mesh.json").exists()
        assert not (state_dir / "running.json").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(180)
        emergency_down(env, tmp_path, state_dir)


def test_up_without_rabbitmq_says_how_to_start_it(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    port = free_port()
    result = sh(
        f"cellmesh up --state-dir {tmp_path / 'state'} --amqp-url amqp://guest:guest@127.0.0.1:{port}/%2F",
        env,
        tmp_path,
    )
    assert result.returncode == 1
    assert result.stderr == (
        f"error: RabbitMQ is not reachable on 127.0.0.1:{port}: start it with `rabbitmq-server -detached`"
        " or give another broker with --amqp-url\n"
    )
    assert not (tmp_path / "state" / "running.json").exists()
    assert not (tmp_path / "home" / ".config" / "cellmesh" / "mesh.json").exists()
    assert not mentioning(str(tmp_path / "state"))


def test_a_second_mesh_does_not_take_the_client_file_of_a_running_one(tmp_path: Path, amqp_url: str) -> None:
    """A mesh from another state dir runs (its supervisor stands in as a
    sleeping process of ours) and holds the client's file: `up` refuses and
    says how to go on."""
    home = tmp_path / "home"
    other = tmp_path / "other"
    other.mkdir()
    config = home / ".config" / "cellmesh" / "mesh.json"
    config.parent.mkdir(parents=True)
    sleeper = subprocess.Popen(["sleep", "120"])
    try:
        supervisor = {"pid": sleeper.pid, "start_time": start_time(sleeper.pid)}
        (other / "running.json").write_text(json.dumps({"status": "running", "supervisor": supervisor}))
        config.write_text(json.dumps({"catalog": "127.0.0.1:1", "state_dir": str(other), "pid": sleeper.pid}))
        result = sh(f"cellmesh up --state-dir {tmp_path / 'mine'}", clean_env(home), tmp_path)
        assert result.returncode == 1, result
        assert result.stderr == (
            f"error: another mesh (state dir {other}, supervisor pid {sleeper.pid}) is the one the cellmesh"
            f" command finds through {config}: stop it first (`cellmesh down --state-dir {other}`), or give"
            " this one its own client file with --config PATH\n"
        )
        assert not (tmp_path / "mine" / "running.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_one_supervisor_per_state_dir(tmp_path: Path, amqp_url: str) -> None:
    import fcntl

    state_dir = tmp_path / "state"
    state_dir.mkdir()
    with (state_dir / "supervisor.lock").open("a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = sh(
            f"cellmesh up --foreground --state-dir {state_dir}", clean_env(tmp_path / "home"), tmp_path
        )
    assert result.returncode == 1, result
    assert f"another cellmesh supervisor runs from {state_dir}" in result.stderr + result.stdout
    assert not (state_dir / "running.json").exists()


def test_external_store_needs_its_keys(tmp_path: Path) -> None:
    result = sh(
        f"cellmesh up --state-dir {tmp_path / 'state'} --s3-endpoint http://127.0.0.1:1",
        clean_env(tmp_path / "home"),
        tmp_path,
    )
    assert result.returncode == 2
    assert "needs its keys in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in result.stderr


def test_up_autoscale_starts_a_worker_for_a_plate_and_stops_it_after(
    tmp_path: Path, shared_data: Path, amqp_url: str
) -> None:
    """`cellmesh up --autoscale 0:1`: no worker while nothing waits, one for the
    README's site, none again once the cool-down has passed; the worker
    finished its site before it was stopped."""
    home = tmp_path / "home"
    env = clean_env(
        home, AUTOSCALE_INTERVAL_S="1", AUTOSCALE_UP_COOLDOWN_S="0", AUTOSCALE_DOWN_COOLDOWN_S="3"
    )
    work = tmp_path / "work"
    work.mkdir(parents=True)
    state_dir = tmp_path / "state"
    commands = readme_commands(shared_data)
    try:
        result = sh(f"cellmesh up --autoscale 0:1 --state-dir {state_dir}", env, work)
        assert result.returncode == 0, result
        assert "workers       0 to 1, autoscaled" in result.stdout, result.stdout
        assert not [p for p in running(state_dir)["processes"] if p["name"].startswith("cpworker")]  # type: ignore[attr-defined]
        tree = descendants(int(running(state_dir)["supervisor"]["pid"]))  # type: ignore[index]
        for command in commands[1:5]:  # pipeline register, plate create, ingest, follow
            result = sh(command, env, work)
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        deadline = time.monotonic() + 60
        while [p for p in running(state_dir)["processes"] if p["name"].startswith("cpworker")]:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline, "the worker was not stopped after the cool-down"
            time.sleep(0.5)
        log = (state_dir / "mesh.log").read_text()
        assert "autoscaling workers between 0 and 1" in log
        assert "autoscale: 0 -> 1 worker(s)" in log and "autoscale: 1 -> 0 worker(s)" in log, log
        deadline = time.monotonic() + 30
        while "autoscale: cpworker-0 stopped (exit code 0)" not in (state_dir / "mesh.log").read_text():
            assert time.monotonic() < deadline, (state_dir / "mesh.log").read_text()
            time.sleep(0.5)
        worker_log = (state_dir / "logs" / "cpworker-0.log").read_text()
        assert "done AS_09125/D03/s0 attempt 1" in worker_log and "handing a site back" not in worker_log
        status = sh(f"cellmesh status --state-dir {state_dir}", env, work)
        assert status.returncode == 0 and "cpworker" not in status.stdout, status.stdout
        tree |= descendants(int(running(state_dir)["supervisor"]["pid"]))  # type: ignore[index]
        assert sh(f"cellmesh down --state-dir {state_dir}", env, work, timeout=180).returncode == 0
        assert_nothing_left(tree, state_dir)
    finally:
        emergency_down(env, work, state_dir)
