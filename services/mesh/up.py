"""`python -m services.mesh up|down|status` (also `cellmesh up|down|status`):
the local mesh for a user's own plates, kept running until `down`.

`up` starts a supervisor process in its own session (`--foreground` runs it
in this one), which starts the S3 server (unless an external store is
given), the catalog (SQLite in the state dir unless --database-url), the
scheduler, the workers and the reducer exactly as `make demo` does, waits
until each one's health is SERVING, then writes

- `STATE_DIR/running.json`: the supervisor's and every service's pid (with
  its start time, so a reused pid is never taken for ours), addresses, logs;
- the client's file (`cellmesh.meshconfig`, default
  `~/.config/cellmesh/mesh.json`): catalog and reducer addresses and the
  object store, which `cellmesh` reads when no flag or variable is set.

`down` sends SIGTERM to the supervisor, which stops the services in reverse
order (SIGTERM, 20 s, SIGKILL) and removes both files; whatever of the mesh's
process tree is still alive after that (a supervisor killed with -9, a
CellProfiler child) gets SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cellmesh.catalog.v1 import catalog_pb2_grpc
from cellmesh.meshconfig import MeshConfig, config_path

from services.common.amqp import Topology
from services.common.s3 import ObjectMissing, ObjectStore, ObjectStoreError
from services.common.settings import S3Settings
from services.mesh import keep
from services.mesh.autoscale import Autoscaler, AutoscaleSettings, CatalogBacklog, LocalBackend
from services.mesh.demo import DemoOptions, Mesh, delete_topology, start_mesh, stop_mesh
from services.mesh.procs import port_open

log = logging.getLogger(__name__)

RUNNING_FILE = "running.json"
LOCK_FILE = "supervisor.lock"
SUPERVISOR_LOG = "mesh.log"
#: The supervisor gets the URLs that may hold passwords through these, not
#: its command line (which every user of the machine can read).
DATABASE_URL_ENV = "CELLMESH_MESH_DATABASE_URL"
AMQP_URL_ENV = "CELLMESH_MESH_AMQP_URL"


def default_state_dir(env: dict[str, str] | None = None) -> Path:
    """`CELLMESH_STATE_DIR`, else `$XDG_DATA_HOME/cellmesh`, else `~/.local/share/cellmesh`."""
    env = dict(os.environ) if env is None else env
    if env.get("CELLMESH_STATE_DIR"):
        return Path(env["CELLMESH_STATE_DIR"]).expanduser()
    if env.get("XDG_DATA_HOME"):
        return Path(env["XDG_DATA_HOME"]).expanduser() / "cellmesh"
    return Path(env.get("HOME") or str(Path.home())) / ".local" / "share" / "cellmesh"


@dataclass(frozen=True)
class UpOptions:
    state_dir: Path
    config: Path
    cp_python: str
    workers: int = 1
    mode: str = "warm"
    database_url: str = ""
    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    # None: the project's S3 server (moto, in memory) on a free loopback port.
    s3: S3Settings | None = None
    startup_timeout: float = 600.0
    extra_env: dict[str, str] = field(default_factory=dict)
    # (min, max): the supervisor scales the workers (services/mesh/autoscale.py).
    autoscale: tuple[int, int] | None = None
    # The web page's HTTP port (0: a free one).
    web_port: int = 0
    # TLS and roles with a throw-away CA in STATE_DIR/pki; False: AUTH=off.
    auth: bool = True


def work_dir(state_dir: Path) -> Path:
    """The workers' folder: STATE_DIR/work, unless a folder of the state dir's
    path is hidden (~/.local/share/cellmesh): CellProfiler's default Images
    filter leaves out every file under such a folder, so the workers then work
    in a folder of their own under the temporary directory."""
    if not any(part.startswith(".") for part in state_dir.absolute().parts):
        return state_dir / "work"
    digest = hashlib.sha256(str(state_dir).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"cellmesh-{os.getuid()}-{digest}" / "work"


# Processes, identified by pid and start time (a pid alone may be reused).


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, None if it is gone
    (or a zombie: it runs nothing any more)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_alive(pid: int, started: int | None) -> bool:
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return parents


def process_tree(roots: list[int]) -> list[int]:
    """The roots and every process descended from them, alive now."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    seen: list[int] = []
    todo = [pid for pid in roots if pid in parents]
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.append(pid)
        todo.extend(children.get(pid, []))
    return seen


def terminate(pids: dict[int, int | None], grace: float) -> list[int]:
    """SIGTERM to each live process of `pids` (pid: start time), SIGKILL to
    those still alive after `grace` seconds; returns the pids it had to kill."""
    for pid, started in pids.items():
        if is_alive(pid, started):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_alive(p, s) for p, s in pids.items()):
        time.sleep(0.1)
    killed = []
    for pid, started in pids.items():
        if is_alive(pid, started):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(is_alive(p, s) for p, s in pids.items()):
        time.sleep(0.05)
    return killed


# The state file.


def read_running(state_dir: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((state_dir / RUNNING_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def supervisor_alive(running: dict[str, Any]) -> bool:
    sup = running.get("supervisor") or {}
    return bool(sup.get("pid")) and is_alive(int(sup["pid"]), sup.get("start_time"))


def recorded_processes(running: dict[str, Any]) -> dict[int, int | None]:
    """Supervisor and services as recorded (pid: start time)."""
    entries = [running.get("supervisor") or {}, *(running.get("processes") or [])]
    return {int(e["pid"]): e.get("start_time") for e in entries if e.get("pid")}


def _remove_config_if_ours(config: Path, state_dir: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(config.read_text())
        if Path(str(data.get("state_dir", ""))) == state_dir:
            config.unlink()


def _redact(url: str) -> str:
    """A database or broker URL without its password."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not sep or not at or ":" not in creds:
        return url
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


# The supervisor.


async def supervise(options: UpOptions) -> int:
    """Starts the mesh, records it, and keeps it until SIGTERM or SIGINT."""
    state_dir = options.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    # One supervisor per state dir, held for its whole life (released by the kernel when it exits).
    lock = (state_dir / LOCK_FILE).open("a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.error("another cellmesh supervisor runs from %s", state_dir)
        lock.close()
        return 1
    me = {"pid": os.getpid(), "start_time": start_time(os.getpid())}
    running: dict[str, Any] = {
        "status": "starting",
        "supervisor": me,
        "state_dir": str(state_dir),
        "config": str(options.config),
        "log": str(state_dir / SUPERVISOR_LOG),
        "processes": [],
    }
    _write_json(state_dir / RUNNING_FILE, running)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    scaling = _autoscale_settings(options)
    demo = DemoOptions(
        run_dir=state_dir,
        cp_python=options.cp_python,
        workers=options.workers if scaling is None else scaling.policy.min_replicas,
        mode=options.mode,
        database_url=options.database_url,
        amqp_url=options.amqp_url,
        external_s3=options.s3,
        extra_env=options.extra_env,
        work_dir=work_dir(state_dir),
        prepare_store=(lambda store: _restore(store, state_dir)) if options.s3 is None else None,
        web_port=options.web_port,
        auth=options.auth,
    )
    starting = asyncio.create_task(start_mesh(demo))
    stopping = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait(
        {starting, stopping}, timeout=options.startup_timeout, return_when=asyncio.FIRST_COMPLETED
    )
    if starting not in done:
        # Asked to stop while starting, or too slow: start_mesh stops what it started.
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, RuntimeError):
            await starting
        stopping.cancel()
        (state_dir / RUNNING_FILE).unlink(missing_ok=True)
        if stop.is_set():
            log.info("stopped while starting")
            return 0
        log.error("the mesh did not start within %.0f s", options.startup_timeout)
        return 1
    try:
        mesh = starting.result()
    except RuntimeError as exc:
        stopping.cancel()
        log.error("the mesh did not start: %s", exc)
        (state_dir / RUNNING_FILE).unlink(missing_ok=True)
        return 1
    try:
        running.update(_describe(mesh, options))
        running["status"] = "running"
        MeshConfig(
            path=options.config,
            catalog=mesh.catalog_addr,
            reducer=mesh.reducer_addr,
            s3=_client_s3(mesh.s3),
            state_dir=str(state_dir),
            pid=os.getpid(),
            **_client_tls(mesh),
        ).write()
        _write_json(state_dir / RUNNING_FILE, running)
        log.info("mesh up: catalog %s, reducer %s", mesh.catalog_addr, mesh.reducer_addr)
        print(banner(running), flush=True)
        restarts: dict[str, list[float]] = {}
        given_up: set[str] = set()
        if scaling is not None:
            backend = LocalBackend(mesh, demo)

            def record() -> None:
                running["processes"] = _processes(mesh)
                _write_json(state_dir / RUNNING_FILE, running)

            async with mesh.channel(role="autoscaler") as channel:
                scaler = Autoscaler(
                    scaling, backend, CatalogBacklog(catalog_pb2_grpc.CatalogServiceStub(channel))
                )
                scaling_task = asyncio.create_task(scaler.run(stop, on_change=record))
                try:
                    await _keep_running(mesh, stop, running, state_dir, restarts, given_up)
                finally:
                    # A worker it is starting now is stopped with the others.
                    scaling_task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await scaling_task
                    await backend.close()
        else:
            await _keep_running(mesh, stop, running, state_dir, restarts, given_up)
    finally:
        log.info("stopping the mesh")
        if options.s3 is None:
            # Nothing writes once the services are down: keep the store's files.
            await mesh.procs.stop(keep=("s3",))
            try:
                async with ObjectStore(mesh.s3) as store:
                    total, copied = await keep.save(store, state_dir)
                log.info(
                    "object store kept in %s: %d objects (%d new)", state_dir / keep.OBJECTS, total, copied
                )
            except (ObjectStoreError, ObjectMissing, OSError) as exc:
                log.error("the object store's files could not be kept: %s", exc)
        await stop_mesh(mesh)
        _remove_config_if_ours(options.config, state_dir)
        (state_dir / RUNNING_FILE).unlink(missing_ok=True)
        stopping.cancel()
        log.info("every process of the mesh stopped")
    return 0


async def _keep_running(
    mesh: Mesh,
    stop: asyncio.Event,
    running: dict[str, Any],
    state_dir: Path,
    restarts: dict[str, list[float]],
    given_up: set[str],
) -> None:
    """Until `stop`: starts again each service that exited (`_restart_exited`)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
        if stop.is_set():
            break
        if _restart_exited(mesh, restarts, given_up):
            running["processes"] = _processes(mesh)
            _write_json(state_dir / RUNNING_FILE, running)


def _autoscale_settings(options: UpOptions) -> AutoscaleSettings | None:
    """The autoscaler's settings: MIN:MAX from `--autoscale`, the rest
    (AUTOSCALE_*_COOLDOWN_S, AUTOSCALE_INTERVAL_S, CP_SLOTS) from the environment."""
    if options.autoscale is None:
        return None
    low, high = options.autoscale
    env = {**os.environ, **options.extra_env, "AUTOSCALE_MIN": str(low), "AUTOSCALE_MAX": str(high)}
    return AutoscaleSettings.from_env(env)


async def _restore(store: ObjectStore, state_dir: Path) -> None:
    restored = await keep.restore(store, state_dir)
    if restored:
        log.info("object store: %d objects put back from %s", restored, state_dir / keep.OBJECTS)


def _client_s3(s3: S3Settings) -> dict[str, str]:
    return {
        "endpoint_url": s3.endpoint_url or "",
        "bucket": s3.bucket,
        "region": s3.region,
        "access_key_id": s3.access_key,
        "secret_access_key": s3.secret_key,
    }


def _client_tls(mesh: Mesh) -> dict[str, str]:
    """The user's (the operator's) certificate, as the client's file gives it."""
    if mesh.pki is None:
        return {}
    return {
        "ca": str(mesh.pki.ca),
        "cert": str(mesh.pki.cert("operator")),
        "key": str(mesh.pki.key("operator")),
    }


def _describe(mesh: Mesh, options: UpOptions) -> dict[str, Any]:
    database = options.database_url or f"sqlite+aiosqlite:///{options.state_dir / 'catalog.db'}"
    return {
        "catalog": mesh.catalog_addr,
        "reducer": mesh.reducer_addr,
        "web": mesh.web_url,
        "s3": {**_client_s3(mesh.s3), "builtin": options.s3 is None},
        "database": _redact(database),
        "amqp": _redact(options.amqp_url),
        # For `down` to delete the queues when the supervisor could not (this
        # file is readable by its owner only).
        "amqp_url": options.amqp_url,
        "queue_prefix": mesh.topology.prefix,
        "workers": options.workers
        if options.autoscale is None
        else f"{options.autoscale[0]} to {options.autoscale[1]}, autoscaled",
        "processes": _processes(mesh),
        "tls": {**_client_tls(mesh), "folder": str(mesh.pki.folder)} if mesh.pki is not None else {},
    }


def _processes(mesh: Mesh) -> list[dict[str, Any]]:
    return [
        {
            "name": p.name,
            "pid": p.popen.pid if p.popen else 0,
            "start_time": start_time(p.popen.pid) if p.popen else None,
            "address": p.grpc_addr,
            "log": str(p.log_path),
        }
        for p in mesh.procs.procs
    ]


#: A service that exits is started again, at most this many times in RESTART_WINDOW_S.
MAX_RESTARTS = 3
RESTART_WINDOW_S = 300.0


def _restart_exited(mesh: Mesh, restarts: dict[str, list[float]], given_up: set[str]) -> bool:
    """Starts again each service that exited (same command, port and
    environment), except the built-in S3 server, whose objects lived in its
    memory; returns whether a process changed."""
    changed = False
    now = time.monotonic()
    for proc in mesh.procs.procs:
        if proc.alive or proc.name in given_up:
            continue
        code = proc.popen.returncode if proc.popen else None
        recent = [t for t in restarts.get(proc.name, []) if now - t < RESTART_WINDOW_S]
        if proc.name == "s3" or len(recent) >= MAX_RESTARTS:
            given_up.add(proc.name)
            why = (
                "the built-in object store lost what it held"
                if proc.name == "s3"
                else f"it exited {len(recent) + 1} times in {RESTART_WINDOW_S:.0f} s"
            )
            log.error(
                "%s exited (code %s) and is not started again (%s): see %s, then `cellmesh down` and `up`",
                proc.name, code, why, proc.log_path,
            )  # fmt: skip
            continue
        log.warning("%s exited (code %s); starting it again (its log: %s)", proc.name, code, proc.log_path)
        proc.start()
        restarts[proc.name] = [*recent, now]
        changed = True
    return changed


def banner(running: dict[str, Any]) -> str:
    s3 = running.get("s3") or {}
    builtin = bool(s3.get("builtin"))
    lines = [
        f"cellmesh is up (supervisor pid {running['supervisor']['pid']}); state in {running['state_dir']}",
        f"  catalog       {running['catalog']}",
        f"  reducer       {running['reducer']}",
        f"  web page      {running.get('web') or '(none)'}",
        f"  workers       {running.get('workers')}",
        f"  database      {running.get('database')}",
        f"  object store  {s3.get('endpoint_url') or 'AWS S3'}, bucket {s3.get('bucket')}"
        + (
            f" (built in; its files are kept in {Path(running['state_dir']) / keep.OBJECTS} at down)"
            if builtin
            else ""
        ),
        f"  logs          {Path(running['state_dir']) / 'logs'}",
        (
            f"the cellmesh command finds it through {running['config']}; elsewhere, set:"
            if Path(running["config"]) == config_path()
            else f"the cellmesh command finds it with CELLMESH_CONFIG={running['config']}; or set:"
        ),
        f"  export CELLMESH_CATALOG={running['catalog']} CELLMESH_REDUCER={running['reducer']}",
        f"  export S3_ENDPOINT_URL={s3.get('endpoint_url', '')} S3_BUCKET={s3.get('bucket')}"
        f" S3_REGION={s3.get('region')}",
        f"  export AWS_ACCESS_KEY_ID={s3.get('access_key_id')} AWS_SECRET_ACCESS_KEY="
        + (str(s3.get("secret_access_key")) if builtin else "<the store's secret key>"),
        *(
            [
                f"  export CELLMESH_CA={tls['ca']} CELLMESH_CERT={tls['cert']} CELLMESH_KEY={tls['key']}",
                f"  (certificates and tokens of every role: {tls['folder']})",
            ]
            if (tls := running.get("tls"))
            else []
        ),
        "stop it with: cellmesh down" + _state_flag(running),
    ]
    return "\n".join(lines)


def _state_flag(running: dict[str, Any]) -> str:
    given = Path(running["state_dir"])
    return "" if given == default_state_dir() else f" --state-dir {given}"


# The commands.


def up(options: UpOptions, foreground: bool) -> int:
    state_dir = options.state_dir
    running = read_running(state_dir)
    if running is not None and supervisor_alive(running):
        if running.get("status") == "running":
            print(f"cellmesh is already up from {state_dir}:\n{banner(running)}")
            return 0
        print(
            f"cellmesh is starting from {state_dir} (supervisor pid {running['supervisor']['pid']});"
            f" `cellmesh status{_state_flag(running)}` says when it is up",
        )
        return 0
    if running is not None:
        print(f"the mesh from {state_dir} did not stop cleanly; cleaning up first", file=sys.stderr)
        if down(state_dir, options.config, grace=10) != 0:
            return 1
    other = _other_mesh(options.config, state_dir)
    if other:
        print(f"error: {other}", file=sys.stderr)
        return 1
    host, port = _amqp_host_port(options.amqp_url)
    if not port_open(host, port):
        print(
            f"error: RabbitMQ is not reachable on {host}:{port}: start it with `rabbitmq-server -detached`"
            " or give another broker with --amqp-url",
            file=sys.stderr,
        )
        return 1
    if foreground:
        from services.common import logs

        logs.configure("INFO", "mesh")
        return asyncio.run(supervise(options))
    return _start_detached(options)


def _amqp_host_port(url: str) -> tuple[str, int]:
    import pika

    params = pika.URLParameters(url)
    return str(params.host), int(params.port)


def _other_mesh(config: Path, state_dir: Path) -> str:
    """Why another running mesh holds the client's file, or ""."""
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return ""
    other = Path(str(data.get("state_dir", "")))
    if other == state_dir:
        return ""
    theirs = read_running(other)
    if theirs is None or not supervisor_alive(theirs):
        return ""
    return (
        f"another mesh (state dir {other}, supervisor pid {theirs['supervisor']['pid']}) is the one"
        f" the cellmesh command finds through {config}: stop it first (`cellmesh down --state-dir"
        f" {other}`), or give this one its own client file with --config PATH"
    )


def _start_detached(options: UpOptions) -> int:
    state_dir = options.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / SUPERVISOR_LOG
    argv = [
        sys.executable, "-m", "services.mesh", "up", "--foreground",
        "--state-dir", str(state_dir), "--config", str(options.config),
        "--workers", str(options.workers), "--mode", options.mode,
        "--startup-timeout", str(options.startup_timeout),
    ]  # fmt: skip
    if options.autoscale is not None:
        argv += ["--autoscale", f"{options.autoscale[0]}:{options.autoscale[1]}"]
    if options.web_port:
        argv += ["--web-port", str(options.web_port)]
    if not options.auth:
        argv.append("--no-auth")
    if options.s3 is not None:
        argv += ["--s3-endpoint", options.s3.endpoint_url or "", "--s3-bucket", options.s3.bucket]
        argv += ["--s3-region", options.s3.region]
    env = {**os.environ, **options.extra_env, AMQP_URL_ENV: options.amqp_url}
    if options.database_url:
        env[DATABASE_URL_ENV] = options.database_url
    if options.s3 is not None:
        env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"] = options.s3.access_key, options.s3.secret_key
    print(f"starting cellmesh in {state_dir} (log: {log_path}) ...", file=sys.stderr, flush=True)
    offset = log_path.stat().st_size if log_path.exists() else 0
    with log_path.open("ab") as out:
        child = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=state_dir,
            start_new_session=True,  # survives the shell that ran `up`
        )
    deadline = time.monotonic() + options.startup_timeout + 60
    try:
        while time.monotonic() < deadline:
            code = child.poll()
            running = read_running(state_dir)
            if running is not None and running.get("status") == "running":
                if (running.get("supervisor") or {}).get("pid") == child.pid:
                    print(banner(running))
                    return 0
            if code is not None:
                print(f"error: the mesh did not start (exit code {code}); from {log_path}:", file=sys.stderr)
                print(_log_since(log_path, offset), file=sys.stderr)
                return 1
            time.sleep(0.3)
    except KeyboardInterrupt:
        print("interrupted: stopping the mesh", file=sys.stderr)
        down(state_dir, options.config, grace=60)
        return 130
    print(f"error: the mesh did not start in time; stopping it (log: {log_path})", file=sys.stderr)
    down(state_dir, options.config, grace=30)
    return 1


def _log_since(path: Path, offset: int, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])
    return ""


def _tree_with_times(roots: list[int]) -> dict[int, int | None]:
    return {pid: start_time(pid) for pid in process_tree(roots)}


def down(state_dir: Path, config: Path, grace: float = 60.0) -> int:
    running = read_running(state_dir)
    if running is None:
        _remove_config_if_ours(config, state_dir)
        print(f"no cellmesh runs from {state_dir}")
        return 0
    recorded = recorded_processes(running)
    # Everything of the mesh, CellProfiler children included, before anyone stops.
    tree = _tree_with_times([p for p, s in recorded.items() if is_alive(p, s)])
    sup = running.get("supervisor") or {}
    sup_pid, sup_started = int(sup.get("pid") or 0), sup.get("start_time")
    if sup_pid and is_alive(sup_pid, sup_started):
        print(f"stopping cellmesh (supervisor pid {sup_pid}) ...", file=sys.stderr, flush=True)
        os.kill(sup_pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and is_alive(sup_pid, sup_started):
            time.sleep(0.2)
    left = {p: s for p, s in tree.items() if is_alive(p, s)}
    if left:
        print(f"{len(left)} process(es) of the mesh still run; stopping them", file=sys.stderr)
        killed = terminate(left, grace=10)
        if killed:
            print(f"killed {len(killed)} that ignored SIGTERM: {killed}", file=sys.stderr)
    still = [p for p, s in tree.items() if is_alive(p, s)]
    if still:
        print(f"error: these processes of the mesh could not be stopped: {still}", file=sys.stderr)
        return 1
    if left and running.get("queue_prefix") and running.get("amqp_url"):
        # The supervisor did not get to it: the mesh's queues go now.
        topology = Topology(prefix=str(running["queue_prefix"]))
        asyncio.run(delete_topology(str(running["amqp_url"]), topology))
    (state_dir / RUNNING_FILE).unlink(missing_ok=True)
    _remove_config_if_ours(Path(str(running.get("config") or config)), state_dir)
    print(f"cellmesh is down ({len(tree)} process(es) stopped)")
    return 0


def status(state_dir: Path) -> int:
    """0 when the mesh runs with every service alive, 1 otherwise."""
    running = read_running(state_dir)
    if running is None:
        print(f"no cellmesh runs from {state_dir}")
        return 1
    sup = running.get("supervisor") or {}
    if not supervisor_alive(running):
        print(
            f"cellmesh in {state_dir} is not running (its supervisor, pid {sup.get('pid')}, is gone):"
            f" `cellmesh down{_state_flag(running)}` cleans up"
        )
        return 1
    if running.get("status") != "running":
        print(f"cellmesh in {state_dir} is starting (supervisor pid {sup.get('pid')}); log: {running['log']}")
        return 1
    print(banner(running))
    print()
    rows = [("PROCESS", "PID", "STATE", "ADDRESS", "LOG")]
    dead = 0
    for p in running.get("processes") or []:
        alive = is_alive(int(p["pid"]), p.get("start_time"))
        dead += not alive
        rows.append(
            (p["name"], str(p["pid"]), "running" if alive else "exited", p["address"] or "-", p["log"])
        )
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 1 if dead else 0
