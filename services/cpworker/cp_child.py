"""A warm CellProfiler process: start once, run site after site.

Runs INSIDE the CellProfiler environment (scripts/install_cellprofiler.sh), so
it uses only the standard library and CellProfiler; it imports nothing from
the services. The services talk to it through services/cpworker/runner.py.

Protocol: JSON lines. One request per line on stdin, one response per line on
stdout, in order. CellProfiler, Bio-Formats and the JVM print to stdout at
will, so at start the real stdout is set aside for responses and fd 1 is
pointed at stderr.

    {"op": "run", "id": "s1", "pipeline": "/p/x.cppipe",
     "files": ["/site/DNA/a.tif", ...], "output_dir": "/out",
     "input_dir": "/site",                                    (optional)
     "expected": {"DNA": "/site/DNA/a.tif", ...}}             (optional; "op" optional)
    or, for a run over several sites (a plate stage), one object per image set:
     "expected_sets": [{"DNA": "/plate/DNA/00000/a.tif", ...}, ...]
    -> {"id": "s1", "ok": true, "error": "", "seconds": 0.41,
        "image_sets": 1, "cp_version": "4.2.8.1"}
    a failed run adds "problem": "input" when the site's inputs are at fault
    (no image set or more than one, an image name loaded from another file
    than ``expected`` says, a file that is not there), else "cellprofiler".
    {"op": "ping"}  -> {"id": ..., "ok": true, "op": "pong", "runs": N, ...}
    {"op": "quit"}  -> {"id": ..., "ok": true, "op": "quit"}, then exit

Each run is what `cellprofiler -c -r -p PIPELINE --file-list LIST -o OUT -d
OUT/cellmesh_done.txt` does, in process: a fresh copy of the (cached) pipeline,
a file list of exactly the given files, Default Output Folder = output_dir,
Default Input Folder = input_dir (default: the files' folder), all image
sets (with ``expected``: exactly one, made of those files; with
``expected_sets``: exactly that many, each made of one site's files, in any
order), then the
measurements are closed (which deletes their temporary HDF5 file) and the
done-file gets the run's exit status ("Complete" only if it finished).

Preferences are process-global: one run at a time per process.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import logging
import os
import sys
import time
import traceback
from typing import Any, TextIO

DONE_FILE_NAME = "cellmesh_done.txt"
PIPELINE_CACHE_SIZE = 16

log = logging.getLogger("cellmesh.cp_child")


def claim_stdout() -> TextIO:
    """Keep the real stdout for responses; send everything else written to fd 1 to stderr."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return os.fdopen(saved, "w", encoding="utf-8", buffering=1)


def ensure_java_home() -> None:
    """CellProfiler 4.2 wants a JDK 17; point JAVA_HOME at one if it is not set."""
    if os.environ.get("JAVA_HOME"):
        return
    for candidate in sorted(glob.glob("/usr/lib/jvm/java-17-openjdk-*")):
        if os.path.isfile(os.path.join(candidate, "bin", "java")):
            os.environ["JAVA_HOME"] = candidate
            return


class RunFailed(Exception):
    """A request that cannot be run as given (bad input, not a CellProfiler fault)."""


class InputProblem(Exception):
    """The site's inputs are at fault: the message says which file and why."""


NO_IMAGE_SET = "The pipeline did not identify any image sets."
MISSING_FILE_MARKERS = ("FileNotFoundError", "FileNotFoundException", "No such file", "has no match")


def match_image_sets(
    formed: list[dict[str, str]], expected_sets: list[dict[str, str]], require_all: bool = True
) -> str:
    """Why the image sets CellProfiler formed are not the expected ones, or
    "". ``formed`` holds, per image set, image name -> the real path of the
    file it loads (names it does not load left out: a problem with
    ``require_all``, else not checked). Each formed set must be one expected
    set, each expected set used once, in any order: a pipeline that groups its
    image sets (the Groups module, LoadData's grouping) may number them group
    by group rather than site by site."""
    remaining = list(range(len(expected_sets)))
    for formed_set in formed:
        for i in remaining:
            expected = expected_sets[i]
            if all(
                formed_set[name] == want if name in formed_set else not require_all
                for name, want in expected.items()
            ):
                remaining.remove(i)
                break
        else:
            if any(
                all(formed_set.get(name) == want for name, want in expected.items())
                for expected in expected_sets
            ):
                return "CellProfiler formed the same image set twice"
            closest = max(
                remaining or range(len(expected_sets)),
                key=lambda i: sum(formed_set.get(n) == w for n, w in expected_sets[i].items()),
            )
            for name, want in expected_sets[closest].items():
                if name not in formed_set:
                    if require_all:
                        return (
                            f"the pipeline's input modules load no image named {name} (a channel of the site)"
                        )
                    continue
                if formed_set[name] != want:
                    return (
                        f"CellProfiler loaded image {name} from {formed_set[name]}, but the catalog "
                        f"registered {want} as {name}"
                    )
            return "CellProfiler formed an image set of no site"
    return ""


class ImageSetCheck:
    """Installed as the pipeline's prepare_run: once the input modules have
    formed the image sets, and before any is run, there must be as many as
    expected (one per site) and in each, each expected image name must come
    from its channel's file."""

    def __init__(self, pipeline: Any, expected_sets: list[dict[str, str]]) -> None:
        self.expected_sets = [
            {name: os.path.realpath(path) for name, path in expected.items()} for expected in expected_sets
        ] or [{}]
        self.expected = self.expected_sets[0]
        self.problem = ""
        self._prepare_run = pipeline.prepare_run

    def __call__(self, workspace: Any, end_module: Any = None) -> bool:
        ok = bool(self._prepare_run(workspace, end_module))
        if ok and end_module is None:
            self.problem = self.judge(workspace.measurements)
        return ok and not self.problem

    def _file(self, m: Any, name: str, number: int) -> str | None:
        for prefix in ("", "Objects"):
            path, file = f"{prefix}PathName_{name}", f"{prefix}FileName_{name}"
            if m.has_feature("Image", path) and m.has_feature("Image", file):
                return os.path.join(str(m["Image", path, number]), str(m["Image", file, number]))
        return None

    def judge(self, m: Any) -> str:
        numbers = list(m.get_image_numbers())
        wanted = len(self.expected_sets)
        if len(numbers) != wanted:
            sets = "; ".join(
                f"image set {n}: "
                + ", ".join(
                    f"{name}={os.path.basename(self._file(m, name, n) or '?')}" for name in self.expected
                )
                for n in numbers[:5]
            )
            sites = "one site" if wanted == 1 else f"{wanted} sites"
            return f"CellProfiler formed {len(numbers)} image sets from {sites}, not {wanted} ({sets})"
        names = {name for expected in self.expected_sets for name in expected}
        formed = []
        for number in numbers:
            files = {name: self._file(m, name, number) for name in names}
            formed.append({name: os.path.realpath(f) for name, f in files.items() if f is not None})
        return match_image_sets(formed, self.expected_sets)


class CellProfilerSession:
    """The process's one CellProfiler: JVM, module registry, pipeline cache."""

    def __init__(self) -> None:
        self.cp_version = "unknown"
        self.runs = 0
        self.image_sets = 0
        self.java_started = False
        self._pipelines: dict[str, str] = {}  # sha256 of the file -> pipeline text

    def start(self) -> None:
        """Import CellProfiler headless and start the JVM (once per process)."""
        import cellprofiler_core.preferences as prefs

        # Headless must be set before any preference is read.
        prefs.set_headless()
        prefs.set_awt_headless(True)
        import numpy

        numpy.seterr(all="ignore")  # as the cellprofiler command does
        import cellprofiler
        import cellprofiler_core.modules  # noqa: F401  (importing it registers every module)
        from cellprofiler_core.utilities.java import start_java

        self.cp_version = getattr(cellprofiler, "__version__", "unknown")
        start_java()
        self.java_started = True

    def stop(self) -> None:
        if not self.java_started:
            return
        try:
            import bioformats.formatreader

            bioformats.formatreader.clear_image_reader_cache()
        except Exception:
            log.warning("could not clear the Bio-Formats reader cache", exc_info=True)
        from cellprofiler_core.utilities.java import stop_java

        stop_java()
        self.java_started = False

    def _pipeline_text(self, path: str) -> str:
        """The pipeline at ``path`` as CellProfiler's own text, loaded once per content."""
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as exc:
            raise RunFailed(f"cannot read pipeline {path}: {exc}") from exc
        key = hashlib.sha256(raw).hexdigest()
        text = self._pipelines.get(key)
        if text is None:
            from cellprofiler_core.pipeline import Pipeline

            pipeline = Pipeline()
            errors: list[str] = []
            pipeline.add_listener(_collect_load_errors(errors))
            pipeline.load(path)
            if errors:
                raise RunFailed(f"cannot load pipeline {path}: {'; '.join(errors)}")
            buf = io.StringIO()
            pipeline.dump(buf)
            text = buf.getvalue()
            if len(self._pipelines) >= PIPELINE_CACHE_SIZE:
                self._pipelines.pop(next(iter(self._pipelines)))
            self._pipelines[key] = text
        return text

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        """Run one request; never raises."""
        started = time.perf_counter()
        response: dict[str, Any] = {
            "id": request.get("id"),
            "ok": False,
            "error": "",
            "seconds": 0.0,
            "image_sets": 0,
            "cp_version": self.cp_version,
        }
        output_dir = request.get("output_dir")
        done_file = os.path.join(output_dir, DONE_FILE_NAME) if isinstance(output_dir, str) else None
        status = "Failure"
        try:
            status, image_sets, errors = self._run(request)
            response["image_sets"] = image_sets
            response["ok"] = status == "Complete"
            if not response["ok"]:
                response["error"] = "; ".join(errors) or f"CellProfiler exit status {status!r}"
        except RunFailed as exc:
            response["error"] = str(exc)
        except InputProblem as exc:
            response["error"] = str(exc)
            response["problem"] = "input"
        except Exception as exc:  # a CellProfiler bug must not kill the warm process
            log.error("run %s failed", request.get("id"), exc_info=True)
            response["error"] = f"{type(exc).__name__}: {exc}"
            response["traceback"] = traceback.format_exc(limit=20)
        finally:
            if done_file is not None and os.path.isdir(os.path.dirname(done_file)):
                with open(done_file, "w", encoding="utf-8") as fh:
                    fh.write(f"{status}\n")
            response["seconds"] = round(time.perf_counter() - started, 4)
            self.runs += 1
        return response

    def _run(self, request: dict[str, Any]) -> tuple[str, int, list[str]]:
        pipeline_path = request.get("pipeline")
        files = request.get("files")
        output_dir = request.get("output_dir")
        input_dir = request.get("input_dir")
        expected = request.get("expected") or {}
        expected_sets = request.get("expected_sets")
        if not isinstance(pipeline_path, str) or not pipeline_path:
            raise RunFailed("request has no 'pipeline'")
        if not isinstance(output_dir, str) or not output_dir:
            raise RunFailed("request has no 'output_dir'")
        if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
            raise RunFailed("request has no 'files' (a non-empty list of paths)")
        if not isinstance(expected, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in expected.items()
        ):
            raise RunFailed("'expected' is not an object of image names to paths")
        if expected_sets is None:
            expected_sets = [expected]
        if not isinstance(expected_sets, list) or not all(
            isinstance(e, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in e.items())
            for e in expected_sets
        ):
            raise RunFailed("'expected_sets' is not a list of objects of image names to paths")
        files = [os.path.abspath(f) for f in files]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise RunFailed(f"input files missing: {', '.join(missing)}")
        os.makedirs(output_dir, exist_ok=True)
        done_file = os.path.join(output_dir, DONE_FILE_NAME)
        if os.path.exists(done_file):
            os.unlink(done_file)

        import cellprofiler_core.preferences as prefs
        from cellprofiler_core.constants.measurement import EXPERIMENT
        from cellprofiler_core.constants.pipeline import EXIT_STATUS
        from cellprofiler_core.pipeline import Pipeline

        text = self._pipeline_text(os.path.abspath(pipeline_path))
        pipeline = Pipeline()
        pipeline.load(io.StringIO(text))
        errors: list[str] = []
        pipeline.add_listener(_collect_run_errors(errors))
        check = ImageSetCheck(pipeline, expected_sets)
        pipeline.prepare_run = check  # run_with_yield calls it before the first image set

        prefs.set_default_output_directory(os.path.abspath(output_dir))
        if isinstance(input_dir, str) and input_dir:
            prefs.set_default_image_directory(os.path.abspath(input_dir))
        else:
            prefs.set_default_image_directory(os.path.commonpath([os.path.dirname(f) for f in files]))
        pipeline.add_pathnames_to_file_list(files, add_undo=False)

        measurements = None
        try:
            measurements = pipeline.run(image_set_start=1)
            if measurements is not None and measurements.has_feature(EXPERIMENT, EXIT_STATUS):
                status = str(measurements.get_experiment_measurement(EXIT_STATUS))
            else:
                status = "Failure"
            image_sets = len(measurements.get_image_numbers()) if measurements is not None else 0
        finally:
            if measurements is not None:
                measurements.close()
            _clear_java_caches()
        self.image_sets += image_sets
        if check.problem:
            raise InputProblem(check.problem)
        said = " ".join(" ".join(errors).split())
        if status != "Complete" and NO_IMAGE_SET in said:
            given = ", ".join(
                f"{n} <- {os.path.basename(p)}" for e in expected_sets for n, p in e.items()
            ) or ", ".join(files)
            raise InputProblem(
                f"CellProfiler formed no image set from the site's files ({given}): the pipeline's "
                "Images filter or Metadata module leaves some of them out"
            )
        if status != "Complete" and any(marker in said for marker in MISSING_FILE_MARKERS):
            raise InputProblem("; ".join(errors))
        return status, image_sets, errors


def _collect_load_errors(errors: list[str]) -> Any:
    from cellprofiler_core.pipeline.event import LoadException

    def listener(_pipeline: Any, event: Any) -> None:
        if isinstance(event, LoadException):
            errors.append(str(getattr(event, "error", event)))

    return listener


def _collect_run_errors(errors: list[str]) -> Any:
    """A pipeline listener that records why a run stopped (and lets it stop)."""
    from cellprofiler_core.pipeline.event import (
        PostRunException,
        PrepareRunError,
        PrepareRunException,
        RunException,
    )

    def listener(_pipeline: Any, event: Any) -> None:
        module = getattr(getattr(event, "module", None), "module_name", None) or "pipeline"
        if isinstance(event, PrepareRunError):
            errors.append(f"{module}: {' '.join(str(event.message).split())}")
        elif isinstance(event, (RunException, PrepareRunException, PostRunException)):
            errors.append(f"{module}: {type(event.error).__name__}: {event.error}")

    return listener


def _clear_java_caches() -> None:
    """Forget Bio-Formats' cached readers and directory listings between runs."""
    try:
        import bioformats.formatreader
        import javabridge

        bioformats.formatreader.clear_image_reader_cache()
        javabridge.static_call("loci/common/Location", "clearDirectoryListingsCache", "()V")
    except Exception:
        log.debug("could not clear Java caches", exc_info=True)


def send(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def serve(session: CellProfilerSession, requests: TextIO, out: TextIO) -> None:
    for line in requests:
        line = line.strip()
        if not line:
            continue
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
        except ValueError as exc:
            send(out, {"id": None, "ok": False, "error": f"bad request: {exc}"})
            continue
        op = request.get("op", "run")
        if op == "ping":
            send(
                out,
                {
                    "id": request.get("id"),
                    "ok": True,
                    "op": "pong",
                    "pid": os.getpid(),
                    "runs": session.runs,
                    "image_sets": session.image_sets,
                    "cp_version": session.cp_version,
                },
            )
        elif op == "quit":
            send(out, {"id": request.get("id"), "ok": True, "op": "quit"})
            return
        elif op == "run":
            send(out, session.run(request))
        else:
            send(out, {"id": request.get("id"), "ok": False, "error": f"unknown op {op!r}"})


def main(argv: list[str] | None = None) -> int:
    out = claim_stdout()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("CELLMESH_CP_LOG_LEVEL", "WARNING"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="cp_child[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    ensure_java_home()
    session = CellProfilerSession()
    try:
        session.start()
        serve(session, sys.stdin, out)
    finally:
        session.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
