#!/usr/bin/env bash
# Rewrites requirements.lock (the pinned versions of every dependency of the
# services, the client and the dev tools) from the current .venv. Run after
# changing dependencies in a pyproject.toml, then commit the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python -m pip freeze --exclude-editable | grep -v '^-e ' > requirements.lock
echo "wrote requirements.lock ($(wc -l < requirements.lock) pins)"
