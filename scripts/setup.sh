#!/usr/bin/env bash
# Installs everything cellmesh needs on this machine, idempotently:
#   .venv/            the services' environment (Python 3.11, editable installs)
#   node_modules/     buf, pinned (contracts lint/format/breaking)
#   chromium          Debian's browser and driver, for the web page's tests
#   CellProfiler      its own environment, cached outside the clone under
#                     ${CELLMESH_CACHE:-~/.cache/cellmesh} (see install_cellprofiler.sh)
# A second run only checks stamps and takes seconds.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
say() { printf '[setup] %s\n' "$*" >&2; }

python=${PYTHON311:-$(command -v python3.11 || command -v python3)}
"$python" - <<'PY' || { echo "cellmesh needs Python 3.11 or newer" >&2; exit 1; }
import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

# The services' environment, rebuilt when its requirements change.
stamp_key=$(cat pyproject.toml clients/python/pyproject.toml requirements.lock | sha256sum | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.cellmesh-stamp 2>/dev/null)" != "$stamp_key" ]; then
  say "installing the services' environment in .venv"
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q -c requirements.lock -e clients/python -e '.[dev]' >&2
  echo "$stamp_key" > .venv/.cellmesh-stamp
else
  say "services' environment is up to date"
fi

# buf, pinned in package.json.
if [ ! -x node_modules/.bin/buf ]; then
  say "installing buf (npm)"
  npm ci --no-audit --no-fund --loglevel=error >&2
fi

# A real browser for the web page's tests: Debian's chromium and its driver
# (Playwright drives /usr/bin/chromium; nothing downloads a browser).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  say "installing chromium and chromium-driver (apt-get)"
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q chromium chromium-driver >&2
fi

# CellProfiler 4.2.8.1 in its own environment (cached; ~13 min the first time on 2 cores).
mkdir -p var
if [ "${CELLMESH_SKIP_CELLPROFILER:-0}" != "1" ]; then
  cp_python=$(bash scripts/install_cellprofiler.sh | tail -n 1)
  echo "$cp_python" > var/cp_python
  say "CellProfiler: $cp_python"
fi
say "ready"
