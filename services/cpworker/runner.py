"""Running CellProfiler on one site, from the services' environment.

CellProfiler 4.2 lives in its own environment (scripts/install_cellprofiler.sh)
and is always driven as a child process, so a crash, a hang or a memory leak
in it never takes the worker down:

* :class:`WarmRunner` keeps one long-lived ``cp_child.py`` (JVM started once,
  pipelines cached) and sends it site after site over JSON lines.
* :class:`ColdRunner` starts ``python -m cellprofiler -c -r`` per site, the way
  Distributed-CellProfiler does.

The child runs registered pipelines, so it gets only an allow-listed
environment (:func:`child_environment`: no credentials), a working folder of
its own as HOME (and, warm, as its current folder) and, where the platform
allows it, a network namespace of its own with no interface up
(:func:`network_prefix`): it reaches neither the broker, the catalog nor the
object store, whatever a pipeline does.

Both write ``cellmesh_done.txt`` into the output folder, saying ``Complete``
only when the run finished. :func:`judge_outputs` is the success rule: the
done-file says ``Complete`` and the expected tables exist and are non-empty;
an exit code alone is never trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import enum
import glob
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.cpworker.cp_child import match_image_sets

log = logging.getLogger(__name__)

DONE_FILE_NAME = "cellmesh_done.txt"
CHILD_SCRIPT = Path(__file__).with_name("cp_child.py")
_TAIL_LINES = 40
_RESPONSE_LIMIT = 4 * 1024 * 1024  # bytes in one JSON response line


class Outcome(enum.StrEnum):
    """Outcome classes of Distributed-CellProfiler's worker."""

    SUCCESS = "SUCCESS"
    INPUT_PROBLEM = "INPUT_PROBLEM"
    DOWNLOAD_PROBLEM = "DOWNLOAD_PROBLEM"
    CP_PROBLEM = "CP_PROBLEM"
    OUTPUT_PROBLEM = "OUTPUT_PROBLEM"


@dataclass(frozen=True)
class RunResult:
    """What running CellProfiler on one site gave."""

    ok: bool
    reason: str
    seconds: float
    image_sets: int
    cp_version: str
    stderr_tail: str = ""
    timed_out: bool = False
    outcome: Outcome = Outcome.SUCCESS


def judge_outputs(
    output_dir: Path, expected_tables: Iterable[str], *, files_if_no_tables: bool = True
) -> tuple[bool, str]:
    """Did the run in ``output_dir`` succeed? (ok, reason why not).

    Success means the done-file says ``Complete`` and every expected table
    (e.g. ``Image.csv``) exists and is not empty. A pipeline that exports no
    tables (only SaveImages) must have written at least one file that is not
    empty besides the done-file (unless ``files_if_no_tables`` is False).
    """
    expected_tables = list(expected_tables)
    done = Path(output_dir) / DONE_FILE_NAME
    try:
        status = done.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return False, f"no {DONE_FILE_NAME}: CellProfiler did not finish"
    except OSError as exc:
        return False, f"cannot read {DONE_FILE_NAME}: {exc}"
    if status != "Complete":
        return False, f"{DONE_FILE_NAME} says {status or 'nothing'!r}, not 'Complete'"
    for table in expected_tables:
        path = Path(output_dir) / table
        if not path.is_file():
            return False, f"expected table {table} is missing"
        if path.stat().st_size == 0:
            return False, f"expected table {table} is empty"
    if not expected_tables and files_if_no_tables:
        written = [p for p in Path(output_dir).rglob("*") if p.is_file() and p.name != DONE_FILE_NAME]
        if not any(p.stat().st_size > 0 for p in written):
            return False, "the pipeline exports no tables and wrote no files (SaveImages saved nothing)"
    return True, ""


def find_java_home() -> str | None:
    """JAVA_HOME if set, else the machine's JDK 17 (what CellProfiler 4.2 runs on)."""
    if os.environ.get("JAVA_HOME"):
        return os.environ["JAVA_HOME"]
    for candidate in sorted(glob.glob("/usr/lib/jvm/java-17-openjdk-*")):
        if os.path.isfile(os.path.join(candidate, "bin", "java")):
            return candidate
    return None


#: What the CellProfiler child gets from the worker's environment, and nothing
#: else: it runs a registered pipeline, which must not see the worker's
#: credentials. CellProfiler 4.2, python-javabridge, Bio-Formats and cp_child.py
#: read PATH, JAVA_HOME (or CP_JAVA_HOME, javabridge's locate.py), HOME (its
#: preferences, Java's and matplotlib's caches), the locale, TMPDIR (HDF5
#: measurements), the JVM's options and the BLAS/OpenMP thread counts;
#: cp_child.py's own log level is CELLMESH_CP_LOG_LEVEL. Not passed, on purpose:
#: CLASSPATH (adds code to the JVM), CP_JDWP_PORT (opens a Java debugger port),
#: CP_DEBUG_WORKER, DISPLAY, PYTHON*, LD_PRELOAD.
CHILD_ENV_NAMES = frozenset(
    {
        "PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "JAVA_HOME", "CP_JAVA_HOME",
        "JAVA_TOOL_OPTIONS", "MPLBACKEND", "MPLCONFIGDIR", "LD_LIBRARY_PATH", "CELLMESH_CP_LOG_LEVEL",
    }
)  # fmt: skip
CHILD_ENV_PREFIXES = ("LC_", "OPENBLAS_", "OMP_", "MKL_", "NUMEXPR_")
#: Never passed, whatever the lists above or ``extra`` say: names that hold or
#: point at credentials.
_SECRET_NAME = re.compile(
    r"^(AWS_|S3_|CATALOG_)|^(AMQP_URL|DATABASE_URL)$|PASSWORD|SECRET|TOKEN|CREDENTIAL|_KEY|_FILE$"
)


def child_environment(
    extra: Mapping[str, str] | None = None,
    *,
    home: Path | str | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a CellProfiler child: only `CHILD_ENV_NAMES` and
    `CHILD_ENV_PREFIXES` from the worker's (``environ``, default os.environ),
    JAVA_HOME found if unset, HOME set to the child's own working folder if
    ``home`` is given, then ``extra``; never a name that holds credentials."""
    source = os.environ if environ is None else environ
    env = {
        name: value
        for name, value in source.items()
        if name in CHILD_ENV_NAMES or name.startswith(CHILD_ENV_PREFIXES)
    }
    java_home = source.get("JAVA_HOME") or find_java_home()
    if java_home:
        env["JAVA_HOME"] = java_home
    if home is not None:
        env["HOME"] = str(home)
    env.update(extra or {})
    return {name: value for name, value in env.items() if not _SECRET_NAME.search(name.upper())}


class ChildNetwork(enum.StrEnum):
    """What network the CellProfiler child gets (the worker's CP_CHILD_NETWORK)."""

    #: A network namespace of its own if the platform allows it, else the worker's.
    AUTO = "auto"
    #: A network namespace of its own, or the worker does not start.
    NONE = "none"
    #: The worker's network.
    HOST = "host"


# Ways to start a program in a network namespace of its own, tried in order:
# as root (or with CAP_SYS_ADMIN), then in a user namespace of its own where
# unprivileged user namespaces are enabled (the same uid inside). Neither
# forks: the child keeps the pid the runner started.
_NETNS_PREFIXES = (
    ("unshare", "--net", "--"),
    ("unshare", "--user", "--map-current-user", "--net", "--"),
)


def network_prefix(mode: ChildNetwork | str) -> list[str]:
    """The command prefix that starts a CellProfiler child with `mode`'s
    network: [] for the worker's own. AUTO takes the first prefix that works
    here; NONE raises RuntimeError, saying what to do, if none does."""
    mode = ChildNetwork(mode)
    if mode is ChildNetwork.HOST:
        return []
    tried = []
    for prefix in _NETNS_PREFIXES:
        if shutil.which(prefix[0]) is None:
            tried.append(f"{prefix[0]}: not installed")
            break
        try:
            done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{' '.join(prefix)}: {exc}")
            continue
        if done.returncode == 0:
            return list(prefix)
        tried.append(f"{' '.join(prefix)}: {done.stderr.decode(errors='replace').strip() or done.returncode}")
    why = "; ".join(tried)
    if mode is ChildNetwork.NONE:
        raise RuntimeError(
            "CP_CHILD_NETWORK=none: cannot give CellProfiler a network namespace of its own here "
            f"({why}); run the worker as root or with CAP_SYS_ADMIN, enable unprivileged user "
            "namespaces, or set CP_CHILD_NETWORK=auto (or host) to run it on the worker's network"
        )
    log.warning("CellProfiler children share the worker's network: no network namespace here (%s)", why)
    return []


def _program(path: Path | str) -> str:
    """An executable's path that still holds when the child starts in another folder."""
    text = str(path)
    return os.path.abspath(text) if os.sep in text else text


def _new_child_home() -> Path:
    """A private working folder for a runner's CellProfiler children (HOME, and
    the warm child's current folder, where an empty 'Elsewhere...' points)."""
    return Path(tempfile.mkdtemp(prefix="cellmesh-cp-home-"))


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit unknown"
    if code < 0:
        try:
            return f"exit {code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"exit {code}"
    return f"exit {code}"


@dataclass(frozen=True)
class _Site:
    pipeline: Path
    files: list[Path]
    output_dir: Path
    input_dir: Path
    expected: list[dict[str, Path]]  # per image set: image name -> the file CellProfiler must load for it
    problem: str  # why it cannot run, or ""


def _prepare_site(
    pipeline: Path,
    files: list[Path],
    output_dir: Path,
    input_dir: Path | None = None,
    expected: Mapping[str, Path] | Sequence[Mapping[str, Path]] | None = None,
) -> _Site:
    """Absolute paths, an output folder without a stale done-file, missing inputs named.
    The Default Input Folder is ``input_dir``, else the files' common folder."""
    output_dir = output_dir.resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / DONE_FILE_NAME).unlink(missing_ok=True)
    missing = [str(p) for p in [pipeline, *files] if not p.exists()]
    problem = "no input files" if not files else ""
    if missing:
        problem = f"input files missing: {', '.join(missing)}"
    files = [f.resolve() for f in files]
    if input_dir is None:
        input_dir = Path(os.path.commonpath([f.parent for f in files])) if files else output_dir
    sets: Sequence[Mapping[str, Path]] = (
        [expected or {}] if expected is None or isinstance(expected, Mapping) else expected
    )
    wanted = [{name: path.resolve() for name, path in s.items()} for s in sets] or [{}]
    return _Site(pipeline.resolve(), files, output_dir, input_dir.resolve(), wanted, problem)


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the child's whole process group (it was started in its own session)."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


class _ChildDied(Exception):
    pass


class WarmRunner:
    """One warm CellProfiler process, reused site after site.

    The child starts lazily on the first site (or on :meth:`start`). A time
    limit or a crash kills it (whole process group); the next site starts a new
    one. After ``recycle_after`` sites it is replaced, since a warm
    CellProfiler's memory creeps. One site at a time.
    """

    mode = "warm"

    def __init__(
        self,
        cp_python: Path | str,
        *,
        recycle_after: int = 200,
        startup_timeout: float = 180.0,
        log_level: str = "WARNING",
        child_script: Path = CHILD_SCRIPT,
        env: Mapping[str, str] | None = None,
        network: ChildNetwork | str = ChildNetwork.AUTO,
    ) -> None:
        self._cp_python = _program(cp_python)
        self._network = ChildNetwork(network)
        self._prefix: list[str] | None = None  # found on the first start
        self._recycle_after = recycle_after
        self._startup_timeout = startup_timeout
        self._log_level = log_level
        self._child_script = Path(child_script).absolute()
        self._env = dict(env) if env else None
        self._home: Path | None = None  # the children's own working folder, made on first start
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr_task: asyncio.Task[None] | None = None
        self._stderr_tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._sites_on_child = 0
        self._doomed = False  # killed while a request was out; replace before reuse
        self._next_id = 0
        self._lock = asyncio.Lock()
        self.cp_version = ""
        self.children_started = 0

    @property
    def pid(self) -> int | None:
        """The current child's process id, if one is running."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None and not self._doomed else None

    async def start(self) -> str:
        """Start the child now (not on the first site); returns CellProfiler's version.

        Raises RuntimeError if CellProfiler does not come up.
        """
        async with self._lock:
            try:
                await self._ensure_child()
            except _ChildDied as exc:
                raise RuntimeError(f"CellProfiler process failed to start: {exc}") from exc
        return self.cp_version

    async def run_site(
        self,
        pipeline: Path,
        files: list[Path],
        output_dir: Path,
        timeout: float,
        *,
        input_dir: Path | None = None,
        expected: Mapping[str, Path] | Sequence[Mapping[str, Path]] | None = None,
    ) -> RunResult:
        """Runs one site. With ``expected`` (image name -> file), the child
        checks that CellProfiler formed exactly one image set and loads each
        of those names from its file; anything else is an input problem."""
        async with self._lock:
            site = await asyncio.to_thread(_prepare_site, pipeline, files, output_dir, input_dir, expected)
            return await self._run_site(site, timeout)

    async def close(self) -> None:
        """Ask the child to quit (it stops the JVM), killing it if it does not;
        remove the children's working folder."""
        async with self._lock:
            await self._stop_child(graceful=True)
            home, self._home = self._home, None
            if home is not None:
                await asyncio.to_thread(shutil.rmtree, home, True)

    async def __aenter__(self) -> WarmRunner:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run_site(self, site: _Site, timeout: float) -> RunResult:
        started = time.perf_counter()
        if site.problem:
            return self._result(False, site.problem, started, outcome=Outcome.INPUT_PROBLEM)

        if self._proc is not None and self._sites_on_child >= self._recycle_after:
            log.info("recycling warm CellProfiler after %d sites", self._sites_on_child)
            await self._stop_child(graceful=True)
        try:
            await self._ensure_child()
        except (_ChildDied, OSError) as exc:
            return self._result(
                False,
                f"CellProfiler process failed to start: {exc}",
                started,
                tail="\n".join(self._stderr_tail),
                outcome=Outcome.CP_PROBLEM,
            )

        self._stderr_tail.clear()
        self._next_id += 1
        request = {
            "op": "run",
            "id": str(self._next_id),
            "pipeline": str(site.pipeline),
            "files": [str(f) for f in site.files],
            "output_dir": str(site.output_dir),
            "input_dir": str(site.input_dir),
            "expected_sets": [{name: str(path) for name, path in s.items()} for s in site.expected],
        }
        try:
            response = await asyncio.wait_for(self._request(request), timeout)
        except TimeoutError:
            log.warning("site over its time limit of %g s: killing warm CellProfiler", timeout)
            tail = await self._fail_child()
            return self._result(
                False,
                f"time limit of {timeout:g} s exceeded",
                started,
                tail=tail,
                timed_out=True,
                outcome=Outcome.CP_PROBLEM,
            )
        except _ChildDied as exc:
            tail = await self._fail_child()
            return self._result(
                False,
                f"CellProfiler process died: {exc}",
                started,
                tail=tail,
                outcome=Outcome.CP_PROBLEM,
            )
        except asyncio.CancelledError:
            # Its answer would be read as the next site's: this child is done for.
            if self._proc is not None:
                _kill_group(self._proc)
                self._doomed = True
            raise
        self._sites_on_child += 1
        ok = bool(response.get("ok"))
        reason = "" if ok else str(response.get("error") or "CellProfiler run failed")
        if ok:
            # The child's word is not enough: its done-file must say so too.
            ok, reason = await asyncio.to_thread(judge_outputs, site.output_dir, ())
        tail = ""
        if not ok:
            await asyncio.sleep(0.05)  # let the child's last stderr lines arrive
            tail = "\n".join(self._stderr_tail)
        if ok:
            outcome = Outcome.SUCCESS
        elif response.get("problem") == "input":
            outcome = Outcome.INPUT_PROBLEM
        else:
            outcome = Outcome.CP_PROBLEM
        return RunResult(
            ok=ok,
            reason=reason,
            seconds=time.perf_counter() - started,
            image_sets=int(response.get("image_sets") or 0),
            cp_version=str(response.get("cp_version") or self.cp_version),
            stderr_tail=tail,
            outcome=outcome,
        )

    def _result(
        self,
        ok: bool,
        reason: str,
        started: float,
        *,
        tail: str = "",
        timed_out: bool = False,
        outcome: Outcome,
    ) -> RunResult:
        return RunResult(
            ok=ok,
            reason=reason,
            seconds=time.perf_counter() - started,
            image_sets=0,
            cp_version=self.cp_version,
            stderr_tail=tail,
            timed_out=timed_out,
            outcome=outcome,
        )

    async def _ensure_child(self) -> None:
        if self._proc is not None and self._proc.returncode is None and not self._doomed:
            return
        if self._proc is not None:  # died or was killed since the last site
            await self._fail_child()
        started = time.perf_counter()
        if self._home is None or not self._home.is_dir():
            self._home = await asyncio.to_thread(_new_child_home)
        if self._prefix is None:
            self._prefix = await asyncio.to_thread(network_prefix, self._network)
        self._proc = await asyncio.create_subprocess_exec(
            *self._prefix,
            self._cp_python,
            str(self._child_script),
            "--log-level",
            self._log_level,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=child_environment(self._env, home=self._home),
            cwd=self._home,
            start_new_session=True,
            limit=_RESPONSE_LIMIT,
        )
        self.children_started += 1
        self._sites_on_child = 0
        self._stderr_tail.clear()
        assert self._proc.stderr is not None
        self._stderr_task = asyncio.create_task(self._pump_stderr(self._proc.stderr, self._proc.pid))
        # The child answers only once CellProfiler is imported and the JVM is up.
        try:
            pong = await asyncio.wait_for(self._request({"op": "ping", "id": "start"}), self._startup_timeout)
        except TimeoutError:
            tail = await self._fail_child()
            raise _ChildDied(f"no answer within {self._startup_timeout:g} s; {tail[-500:]}") from None
        except _ChildDied as exc:
            tail = await self._fail_child()
            raise _ChildDied(f"{exc}; {tail[-500:]}") from None
        self.cp_version = str(pong.get("cp_version") or "")
        log.info(
            "warm CellProfiler %s started in %.1f s (pid %d)",
            self.cp_version,
            time.perf_counter() - started,
            self._proc.pid,
        )

    async def _request(self, message: dict[str, Any]) -> dict[str, Any]:
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write((json.dumps(message) + "\n").encode())
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise _ChildDied(f"{_describe_exit(await self._exit_code())} ({exc})") from exc
        line = await proc.stdout.readline()
        if not line:
            raise _ChildDied(_describe_exit(await self._exit_code()))
        try:
            response = json.loads(line)
        except ValueError as exc:
            raise _ChildDied(f"protocol error, unreadable response {line[:200]!r}") from exc
        if not isinstance(response, dict) or response.get("id") != message.get("id"):
            raise _ChildDied(f"protocol error, unexpected response {line[:200]!r}")
        return response

    async def _exit_code(self) -> int | None:
        assert self._proc is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proc.wait(), 5.0)
        return self._proc.returncode

    async def _pump_stderr(self, stream: asyncio.StreamReader, pid: int) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the limit
                raw = await stream.read(_RESPONSE_LIMIT)
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip()
            self._stderr_tail.append(line)
            log.debug("cp_child[%d] %s", pid, line)

    async def _fail_child(self) -> str:
        """Kill the child (if alive), reap it and return its last stderr lines."""
        proc, self._proc = self._proc, None
        self._doomed = False
        if proc is not None:
            _kill_group(proc)
            await proc.wait()
        if self._stderr_task is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._stderr_task, 2.0)
            self._stderr_task = None
        return "\n".join(self._stderr_tail)

    async def _stop_child(self, graceful: bool) -> None:
        proc = self._proc
        if proc is None:
            return
        if graceful and proc.returncode is None:
            try:
                await asyncio.wait_for(self._request({"op": "quit", "id": "quit"}), 10.0)
                await asyncio.wait_for(proc.wait(), 20.0)
            except (TimeoutError, _ChildDied) as exc:
                log.warning("warm CellProfiler did not quit cleanly (%s): killing it", exc)
        await self._fail_child()


class ColdRunner:
    """One ``cellprofiler -c -r`` process per site, the Distributed-CellProfiler way."""

    mode = "cold"

    def __init__(
        self,
        cp_python: Path | str,
        *,
        log_level: str = "WARNING",
        env: Mapping[str, str] | None = None,
        network: ChildNetwork | str = ChildNetwork.AUTO,
    ) -> None:
        self._cp_python = _program(cp_python)
        self._log_level = log_level
        self._env = dict(env) if env else None
        self._network = ChildNetwork(network)
        self._prefix: list[str] | None = None  # found on the first start
        self._home: Path | None = None  # the children's own HOME, made on first use
        self.cp_version = ""

    def _child_env(self) -> dict[str, str]:
        if self._home is None or not self._home.is_dir():
            self._home = _new_child_home()
        return child_environment(self._env, home=self._home)

    async def start(self) -> str:
        """Check the environment answers; returns CellProfiler's version."""
        if self._prefix is None:
            self._prefix = await asyncio.to_thread(network_prefix, self._network)
        if not self.cp_version:
            proc = await asyncio.create_subprocess_exec(
                self._cp_python,
                "-c",
                "import importlib.metadata as m; print(m.version('cellprofiler'))",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=await asyncio.to_thread(self._child_env),
            )
            out, _ = await proc.communicate()
            if proc.returncode != 0:
                raise RuntimeError(f"no CellProfiler in {self._cp_python}: {out.decode(errors='replace')}")
            self.cp_version = out.decode().strip()
        return self.cp_version

    async def close(self) -> None:
        """Nothing stays running between sites; remove the children's HOME."""
        home, self._home = self._home, None
        if home is not None:
            await asyncio.to_thread(shutil.rmtree, home, True)

    def command(self, pipeline: Path, file_list: Path, output_dir: Path, input_dir: Path) -> list[str]:
        return [
            *(self._prefix or []),
            self._cp_python, "-m", "cellprofiler",
            "-c", "-r",
            "-p", str(pipeline),
            "--file-list", str(file_list),
            "-i", str(input_dir),
            "-o", str(output_dir),
            "-d", str(output_dir / DONE_FILE_NAME),
            "-L", self._log_level,
        ]  # fmt: skip

    async def run_site(
        self,
        pipeline: Path,
        files: list[Path],
        output_dir: Path,
        timeout: float,
        *,
        input_dir: Path | None = None,
        expected: Mapping[str, Path] | Sequence[Mapping[str, Path]] | None = None,
    ) -> RunResult:
        """Runs one site as ``cellprofiler -c -r``. The run counts only if its
        Image table has exactly one row and, for every ``expected`` image name
        whose FileName_/PathName_ columns it exports, names that file."""
        started = time.perf_counter()
        try:
            version = await self.start()
        except (RuntimeError, OSError) as exc:
            return RunResult(
                False, str(exc), time.perf_counter() - started, 0, "", outcome=Outcome.CP_PROBLEM
            )
        site = await asyncio.to_thread(_prepare_site, pipeline, files, output_dir, input_dir, expected)
        if site.problem:
            return RunResult(
                False, site.problem, time.perf_counter() - started, 0, version, outcome=Outcome.INPUT_PROBLEM
            )

        scratch = await asyncio.to_thread(_write_file_list, site.files)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command(site.pipeline, scratch / "file_list.txt", site.output_dir, site.input_dir),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=await asyncio.to_thread(self._child_env),
                start_new_session=True,
                cwd=scratch,
            )
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), timeout)
            except TimeoutError:
                _kill_group(proc)
                out, _ = await proc.communicate()
                return RunResult(
                    False,
                    f"time limit of {timeout:g} s exceeded",
                    time.perf_counter() - started,
                    0,
                    version,
                    _tail(out),
                    timed_out=True,
                    outcome=Outcome.CP_PROBLEM,
                )
            finally:
                _kill_group(proc)  # anything it left behind in its group
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, True)

        code = proc.returncode
        ok, reason, image_sets = await asyncio.to_thread(_judge_cold_run, site.output_dir, code)
        outcome = Outcome.SUCCESS if ok else Outcome.CP_PROBLEM
        text = out.decode(errors="replace")
        if ok:
            problem = await asyncio.to_thread(_cold_image_set_problem, site.output_dir, site.expected)
            if problem:
                ok, reason, outcome = False, problem, Outcome.INPUT_PROBLEM
                await asyncio.to_thread(
                    (site.output_dir / DONE_FILE_NAME).write_text, "Failure (image set)\n", encoding="utf-8"
                )
        elif _NO_IMAGE_SET_RE.search(" ".join(text.split())):
            counts = "; ".join(m.group(1) for m in _CHANNEL_COUNT_RE.finditer(text))
            reason = f"{reason}: {_no_image_set_message(site.expected[0])}" + (
                f" ({counts})" if counts else ""
            )
            outcome = Outcome.INPUT_PROBLEM
        else:
            error = _last_error(out)
            if error:
                reason = f"{reason}: {error}"
            if is_missing_file_error(error):
                outcome = Outcome.INPUT_PROBLEM
        return RunResult(
            ok=ok,
            reason=reason,
            seconds=time.perf_counter() - started,
            image_sets=image_sets,
            cp_version=version,
            stderr_tail="" if ok else _tail(out),
            outcome=outcome,
        )


def _write_file_list(files: list[Path]) -> Path:
    """A scratch folder holding file_list.txt, one path per line (--file-list)."""
    scratch = Path(tempfile.mkdtemp(prefix="cellmesh-cold-"))
    (scratch / "file_list.txt").write_text("".join(f"{f}\n" for f in files), encoding="utf-8")
    return scratch


def _judge_cold_run(output_dir: Path, code: int | None) -> tuple[bool, str, int]:
    """The done-file says Complete only if CellProfiler also exited 0."""
    done = output_dir / DONE_FILE_NAME
    if code != 0 and done.exists() and done.read_text(encoding="utf-8").strip() == "Complete":
        done.write_text(f"Failure ({_describe_exit(code)})\n", encoding="utf-8")
    ok, reason = judge_outputs(output_dir, (), files_if_no_tables=False)
    if code != 0:
        ok, reason = False, f"CellProfiler {_describe_exit(code)}" + (f"; {reason}" if reason else "")
    return ok, reason, _count_image_rows(output_dir)


_ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): .+")


def _last_error(output: bytes) -> str:
    """The last ``SomeError: message`` line CellProfiler printed, if any."""
    for line in reversed(output.decode(errors="replace").splitlines()):
        if _ERROR_LINE.match(line.strip()):
            return line.strip()
    return ""


def _tail(output: bytes, lines: int = _TAIL_LINES) -> str:
    return "\n".join(output.decode(errors="replace").splitlines()[-lines:])


def _count_image_rows(output_dir: Path) -> int:
    """Image sets the cold run exported: data rows of its Image table, if it has one."""
    for path in sorted(output_dir.glob("*Image.csv")):
        with path.open(newline="", encoding="utf-8", errors="replace") as fh:
            return max(0, sum(1 for _ in csv.reader(fh)) - 1)
    return 0


#: What CellProfiler 4.2 says when the input modules form no image set
#: (Pipeline.prepare_run), with its line breaks folded.
NO_IMAGE_SET = "The pipeline did not identify any image sets."
#: How else `cellprofiler -c -r` says it: NamesAndTypes' image set errors
#: (handle_errors) and ChannelFilter's counts of images per channel.
_NO_IMAGE_SET_RE = re.compile(
    re.escape(NO_IMAGE_SET)
    + r"|Image missing from channel|has no match|Channels have different numbers of images"
)
_CHANNEL_COUNT_RE = re.compile(r"ChannelFilter -\s+(Channel \S+: \d+ images?)")
_MISSING_FILE = re.compile(r"FileNotFoundError|FileNotFoundException|No such file|has no match")


def is_missing_file_error(text: str) -> bool:
    """Whether CellProfiler's error says a file it was to read is not there."""
    return bool(_MISSING_FILE.search(text))


def _no_image_set_message(expected: Mapping[str, Path]) -> str:
    given = ", ".join(f"{name} <- {path.name}" for name, path in expected.items())
    return (
        f"CellProfiler formed no image set from the site's files ({given or 'none'}): the pipeline's "
        "Images filter or Metadata module leaves some of them out"
    )


def _cold_image_set_problem(output_dir: Path, expected_sets: Sequence[Mapping[str, Path]]) -> str:
    """Why a finished cold run does not count (not exactly one image set, or an
    image name loaded from another file than its channel's), or ""."""
    tables = sorted(output_dir.glob("*Image.csv"))
    if not tables:
        return ""  # no Image table exported: the expected tables say whether that is fine
    with tables[0].open(newline="", encoding="utf-8", errors="replace") as fh:
        rows = list(csv.DictReader(fh))
    wanted = len(expected_sets)
    if len(rows) != wanted:
        sets = "; ".join(
            f"image set {i}: " + ", ".join(f"{n}={row.get('FileName_' + n, '?')}" for n in expected_sets[0])
            for i, row in enumerate(rows[:5], start=1)
        )
        sites = "one site" if wanted == 1 else f"{wanted} sites"
        return f"CellProfiler formed {len(rows)} image sets from {sites}, not {wanted} ({sets or 'none'})"
    names = {name for expected in expected_sets for name in expected}
    formed = []
    for row in rows:
        files: dict[str, str] = {}
        for name in names:
            for prefix in ("", "Objects"):
                file_name, folder = row.get(f"{prefix}FileName_{name}"), row.get(f"{prefix}PathName_{name}")
                if file_name is not None and folder is not None:
                    files[name] = str(Path(folder, file_name).resolve())
        formed.append(files)
    wanted_sets = [{name: str(Path(p).resolve()) for name, p in e.items()} for e in expected_sets]
    return match_image_sets(formed, wanted_sets, require_all=False)
