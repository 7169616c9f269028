#!/usr/bin/env bash
# Makes this folder's fixture: CellProfiler's own CalculateStatistics over the
# BBBC013 half plate. Runs derived/ExampleSBS_cp4.cppipe of the shared data with
# the CellProfiler command line, its ExportToSpreadsheet also exporting the
# Experiment measurements (Zfactor_*, Vfactor_*, EC50_*, OneTailedZfactor_*),
# and keeps Experiment.csv and Image.csv (the per-image values the statistics
# were computed from: Image features and the per-image means of every object
# feature, ExportToSpreadsheet's Mean_<object>_<feature> columns), gzipped.
# About 10 minutes on 2 cores.
#
#   bash tests/reducer/data/bbbc013_calculatestatistics/make_fixture.sh [SHARED_DATA]
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../../../.." && pwd)"
shared="${1:-$repo/../shared/data}"
source_dir="$shared/bbbc013_translocation_plate"
cp_python="${CP_PYTHON:-$(cat "$repo/var/cp_python")}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
# The one change: a fifth export group for the Experiment measurements,
# appended to ExportToSpreadsheet (the pipeline's last module).
{
  cat "$source_dir/derived/ExampleSBS_cp4.cppipe"  # ends with its last setting's line
  printf '    Data to export:Experiment\n'
  printf '    Combine these object measurements with those of the previous object?:No\n'
  printf '    File name:Experiment.csv\n'
  printf '    Use the object name for the file name?:No\n'
} > "$work/ExampleSBS_cp4_experiment.cppipe"
tail -n 6 "$work/ExampleSBS_cp4_experiment.cppipe"
"$cp_python" -m cellprofiler -c -r -p "$work/ExampleSBS_cp4_experiment.cppipe" \
  -i "$source_dir/images" -o "$work/out" > "$work/log.txt" 2>&1 || { tail -n 40 "$work/log.txt"; exit 1; }
gzip -9 -n -c "$work/out/Experiment.csv" > "$here/Experiment.csv.gz"
gzip -9 -n -c "$work/out/Image.csv" > "$here/Image.csv.gz"
"$cp_python" -c "import cellprofiler; print('CellProfiler', cellprofiler.__version__)" > "$here/VERSION"
ls -l "$here"
