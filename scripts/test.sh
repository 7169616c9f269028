#!/usr/bin/env bash
# The test command: static checks, then pytest against the real MariaDB,
# RabbitMQ, the project's S3 server and CellProfiler.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/check.sh
export CP_PYTHON=${CP_PYTHON:-$(cat var/cp_python 2>/dev/null || true)}
echo "== pytest"
.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=900 "$@"
