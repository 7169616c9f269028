#!/usr/bin/env bash
# Static checks: contracts (buf lint, format, breaking), generated-code
# freshness, ruff and mypy.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
buf=node_modules/.bin/buf
echo "== buf lint / format"
$buf lint
$buf format --diff --exit-code
echo "== buf breaking"
# Against main when on another branch; on main, against the previous commit.
branch=$(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo "")
if [ "$branch" != "main" ] && git rev-parse -q --verify main >/dev/null; then
  $buf breaking --against '.git#branch=main'
elif git rev-parse -q --verify HEAD~1 >/dev/null && git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then
  $buf breaking --against '.git#ref=HEAD~1'
else
  echo "no earlier revision with contracts to compare against"
fi
echo "== generated code"
scripts/gen_proto.sh --check
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy services clients/python/src/cellmesh/client.py clients/python/src/cellmesh/cli.py clients/python/src/cellmesh/ingest.py clients/python/src/cellmesh/platemap.py 2>&1 | tail -n 30
