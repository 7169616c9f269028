#!/usr/bin/env bash
# Every benchmark, one after the other; each prints a table with its peer
# measured in the same run. Ratios matter, not absolute times: machines are
# shared and noisy.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
export CP_PYTHON=${CP_PYTHON:-$(cat var/cp_python)}
for bench in bench_dispatch bench_catalog bench_list_sites bench_auth bench_cp_modes bench_reduce bench_scaleout bench_soak; do
  [ -f "bench/$bench.py" ] || continue
  echo "## $bench"
  $py "bench/$bench.py" "$@"
  echo
done
