"""reduce_plate's memory stays bounded as plates grow: a 384-well plate peaks
about where a 96-well plate does, though it holds four times the data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def measure(wells: int, out: Path) -> dict[str, int]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.reducer.memory_child", str(wells), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, int] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_peak_memory_does_not_grow_with_the_plate(tmp_path: Path) -> None:
    small = measure(96, tmp_path / "96")
    large = measure(384, tmp_path / "384")
    assert large["rows"] == 4 * small["rows"] == 4 * 96 * 2 * 300
    assert large["input_bytes"] > 3.9 * small["input_bytes"]
    peak_small = small["python_peak"] + small["arrow_peak"]
    peak_large = large["python_peak"] + large["arrow_peak"]
    # Four times the rows, about the same peak (a concat of all sites would
    # need four times the memory). What grows is the bookkeeping per site
    # (~1.5 kB: its keys and row counts), never the rows.
    assert peak_large < 1.5 * peak_small, (small, large)
    assert peak_large - peak_small < 0.05 * (large["input_bytes"] - small["input_bytes"]), (small, large)
    # The peak is a small fraction of what the plate holds.
    assert peak_large < large["input_bytes"] / 5, (small, large)
