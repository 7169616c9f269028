#!/usr/bin/env bash
# Regenerates the Python code of the contracts in proto/ into the client package
# (messages, gRPC stubs and typed .pyi stubs). With --check, regenerates into a
# scratch folder and fails if the committed code differs (stale contracts).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
out_pkg=$root/clients/python/src
mode=${1:-write}
export PATH="$(dirname "$py"):$PATH"  # protoc-gen-mypy plugins live beside the interpreter

gen() {
  local out=$1
  local protos
  protos=$(cd "$root/proto" && find cellmesh -name '*.proto' | sort)
  local wkt
  wkt=$("$py" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
  (cd "$root/proto" && "$py" -m grpc_tools.protoc -I . -I "$wkt" \
      --python_out="$out" --grpc_python_out="$out" \
      --mypy_out=quiet:"$out" --mypy_grpc_out=quiet:"$out" $protos)
  # Packages for every generated folder, so the client installs as a regular package.
  find "$out/cellmesh" -type d | while read -r d; do
    [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
  done
}

if [ "$mode" = "--check" ]; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  mkdir -p "$tmp/cellmesh"
  gen "$tmp"
  stale=0
  while read -r f; do
    rel=${f#"$tmp"/}
    if [ "$(basename "$f")" = "__init__.py" ]; then continue; fi
    if ! cmp -s "$f" "$out_pkg/$rel"; then echo "stale generated file: clients/python/src/$rel" >&2; stale=1; fi
  done < <(find "$tmp/cellmesh" -type f \( -name '*_pb2*.py' -o -name '*_pb2*.pyi' \))
  while read -r f; do
    rel=${f#"$out_pkg"/}
    [ -f "$tmp/$rel" ] || { echo "generated file without a contract: clients/python/src/$rel" >&2; stale=1; }
  done < <(find "$out_pkg/cellmesh" -type f \( -name '*_pb2*.py' -o -name '*_pb2*.pyi' \))
  if [ $stale -ne 0 ]; then echo "generated code is stale: run scripts/gen_proto.sh and commit" >&2; exit 1; fi
  echo "generated code is up to date"
else
  find "$out_pkg/cellmesh" \( -name '*_pb2*.py' -o -name '*_pb2*.pyi' \) -delete 2>/dev/null || true
  mkdir -p "$out_pkg/cellmesh"
  gen "$out_pkg"
  touch "$out_pkg/cellmesh/py.typed"
  echo "generated Python code in clients/python/src/cellmesh"
fi
