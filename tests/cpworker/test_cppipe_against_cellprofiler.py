"""The registration checks (services/common/cppipe.py) against CellProfiler
4.2's own pipeline reader: the hostile pipelines they refuse really do run
code in CellProfiler (each leaves a canary file behind), and the checks read
the modules and folder settings CellProfiler reads."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from services.common import cppipe

REPO = Path(__file__).resolve().parents[2]
NUCLEI = REPO / "examples" / "pipelines" / "nuclei.cppipe"

# Runs in CellProfiler's environment: loads each pipeline as cp_child.py does,
# reads every Joiner as NamesAndTypes and Metadata do when a run is prepared,
# and writes what it loaded (module names, folder settings) as JSON.
LOADER = r"""
import json, logging, sys
logging.disable(logging.CRITICAL)
import cellprofiler_core.preferences as prefs
prefs.set_headless()
import cellprofiler_core.modules
from cellprofiler_core.pipeline import Pipeline
from cellprofiler_core.setting import Joiner
from cellprofiler_core.setting.text import Directory
out = {}
for path in sys.argv[2:]:
    pipeline = Pipeline()
    errors = []
    pipeline.add_listener(lambda p, e: errors.append(str(getattr(e, "error", ""))) if "Exception" in type(e).__name__ else None)
    try:
        pipeline.load(path)
    except Exception as exc:
        errors.append(repr(exc))
    modules = pipeline.modules(False)
    for module in modules:
        for setting in module.settings():
            if isinstance(setting, Joiner):
                try:
                    setting.parse()
                except Exception:
                    pass
    out[path] = {
        "modules": [m.module_name for m in modules],
        "folders": [[m.module_name, s.value] for m in modules for s in m.settings() if isinstance(s, Directory)],
        "errors": errors,
    }
with open(sys.argv[1], "w") as fh:
    json.dump(out, fh)
"""


@pytest.fixture(scope="module")
def cp_python() -> Path:
    if os.environ.get("CP_PYTHON"):
        return Path(os.environ["CP_PYTHON"])
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "install_cellprofiler.sh")],
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        pytest.fail(f"CellProfiler is needed: scripts/install_cellprofiler.sh failed:\n{proc.stderr[-3000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def load_with_cellprofiler(cp_python: Path, tmp_path: Path, paths: list[Path]) -> dict[str, dict[str, list]]:
    result = tmp_path / "loaded.json"
    proc = subprocess.run(
        [str(cp_python), "-c", LOADER, str(result), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded: dict[str, dict[str, list]] = json.loads(result.read_text())
    return loaded


def hostile(tmp_path: Path) -> dict[str, tuple[Path, Path]]:
    """name -> (pipeline, the canary file its code creates)."""
    nuclei = NUCLEI.read_text(encoding="utf-8")
    made: dict[str, tuple[Path, Path]] = {}

    def write(name: str, text: str) -> None:
        canary = tmp_path / f"canary_{name}"
        path = tmp_path / f"{name}.cppipe"
        path.write_text(text.replace("CANARY", str(canary)), encoding="utf-8")
        made[name] = (path, canary)

    write("attribute", nuclei.replace("svn_version:'Unknown'", "svn_version:open('CANARY', 'w').close()", 1))
    hidden = (
        "    MeasureImageQuality:[module_num:9|svn_version:open('CANARY', 'w').close()|variable_revision_number:6|"
        "show_window:False|notes:[]|batch_state:array([], dtype=uint8)|enabled:True|wants_pause:False]\n\n"
    )
    write("indented_module", nuclei.replace("Groups:[", hidden + "Groups:[", 1))
    escape = (
        "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]"
        ".__init__.__globals__['system']('touch CANARY')"
    )
    write("joiner", nuclei.replace("Match metadata:[]", "Match metadata:" + escape, 1))
    # No code, but a folder CellProfiler decodes to '../../x' (\x escapes in a format 5 file).
    write(
        "escaped_folder",
        nuclei.replace(
            "Output file location:Default Output Folder|",
            "Output file location:Default Output Folder sub-folder|\\x2e\\x2e/\\x2e\\x2e/x",
        ),
    )
    return made


def test_hostile_pipelines_run_code_in_cellprofiler_and_are_refused(
    cp_python: Path, tmp_path: Path, shared_data: Path
) -> None:
    made = hostile(tmp_path)
    loaded = load_with_cellprofiler(cp_python, tmp_path, [path for path, _ in made.values()])
    for name, (path, canary) in made.items():
        if name != "escaped_folder":
            assert canary.exists(), (
                f"{name}: CellProfiler did not run the code; the test no longer shows the threat"
            )
        with pytest.raises(cppipe.PipelineError):
            cppipe.parse_for_sites(path.read_bytes())
    folders = loaded[str(made["escaped_folder"][0])]["folders"]
    assert ["ExportToSpreadsheet", "Default Output Folder sub-folder|../../x"] in folders


def test_the_checks_read_what_cellprofiler_reads(cp_python: Path, tmp_path: Path, shared_data: Path) -> None:
    paths = sorted((REPO / "examples" / "pipelines").glob("*.cppipe")) + sorted(shared_data.rglob("*.cppipe"))
    paths += [path for path, _ in hostile(tmp_path).values()]
    loaded = load_with_cellprofiler(cp_python, tmp_path, paths)
    for path in paths:
        cp = loaded[str(path)]
        read, _, _ = cppipe._cellprofiler_reads(cppipe.parse(path.read_bytes()).source)
        ours = [cppipe._canonical(r.name) for r in read]
        # CellProfiler drops a module it cannot upgrade (ExampleSBSIllumination's .mat
        # SaveImages) and stops at one it cannot read: what it keeps is in our order.
        rest = iter(ours)
        assert all(name in rest for name in cp["modules"]), (path, cp["modules"], ours)
        if "DateRevision:4281" not in path.read_text(encoding="utf-8", errors="replace")[:200]:
            continue  # saved by an older CellProfiler: upgrading on loading rewrites settings
        values = {value for r in read for _, value in r.settings}
        for module, value in cp["folders"]:
            assert value in values, (path, module, value)


# Runs in CellProfiler's environment: evaluates file rules with CellProfiler's
# own Filter (the Images module's filter, NamesAndTypes' and Metadata's rules)
# on a file in the Default Input Folder.
FILTER = r"""
import json, sys
from cellprofiler_core.setting import FileCollectionDisplay
from cellprofiler_core.setting.filter import DirectoryPredicate, ExtensionPredicate, FilePredicate, Filter
out = []
for rule, name in json.loads(sys.argv[1]):
    f = Filter("rule", [FilePredicate(), DirectoryPredicate(), ExtensionPredicate()], rule)
    out.append(f.evaluate((FileCollectionDisplay.NODE_FILE, ["/site/in", name], None)))
print(json.dumps(out))
"""

RULES = [
    ('and (file does contain "Channel1") (file does endwith ".mat")', "Channel1ILLUM.mat"),
    ('and (file does contain "Channel1") (file does endwith ".mat")', "Channel2ILLUM.mat"),
    ('and (file does contain "Channel1-") (extension does istif)', "Channel1ILLUM.mat"),
    ('or (extension does istif) (file does endwith ".mat")', "plate.TIFF"),
    ('or (extension does istif) (file does endwith ".mat")', "plate_map.csv"),
    ('and (file does startwith "illum") (file does endwith ".npy")', "illum.npy"),
    ('and (file doesnot contain "DNA") (or (file does eq "a.csv") (file does startwith "b"))', "a.csv"),
    ('and (file doesnot contain "DNA") (or (file does eq "a.csv") (file does startwith "b"))', "DNAb.csv"),
    ('and (file does containregexp "^il+um_[0-9]\\.npy$")', "illum_1.npy"),
    ('and (file does contain "a\\"b")', 'xa"b.txt'),
    ("and (extension does ispng)", "x.png"),
    ("and (extension doesnot isjpeg)", "x.jpeg"),
    ('and (file does contain "_DNA")', "illum_DNA.npy"),
]


def test_file_rules_are_read_as_cellprofiler_reads_them(cp_python: Path) -> None:
    """cppipe's rule reader agrees with CellProfiler's Filter on every rule that
    depends on the file's name alone."""
    proc = subprocess.run(
        [str(cp_python), "-c", FILTER, json.dumps(RULES)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = [cppipe.rule_matches(cppipe.parse_rule(rule), name) for rule, name in RULES]
    assert ours == theirs
