#!/usr/bin/env bash
# Collect the CellProfiler venv built by scripts/install_cellprofiler.sh for the
# cpworker image (stack/Dockerfile, stage cellprofiler-build).
#
#   collect-cellprofiler.sh VENV_PYTHON CACHE_DIR OUT_DIR
#
# VENV_PYTHON  the venv's python, as the recipe printed it on its last line
# CACHE_DIR    the recipe's CELLMESH_CACHE; the venv must lie inside it
# OUT_DIR      receives:
#   root/<venv path>              the venv, at the path it was built for
#                                 (scripts in a venv name that path)
#   root/opt/cellprofiler-venv.path   that path, for the final image's symlink
#   runtime-debs.txt              Debian packages owning the shared libraries
#                                 the venv's compiled code links against
#
# Fails when the python does not import CellProfiler, when the venv lies
# outside CACHE_DIR, or when a library the venv needs is missing or belongs to
# no Debian package (the final image could not install it).
set -euo pipefail

py=${1:?usage: collect-cellprofiler.sh VENV_PYTHON CACHE_DIR OUT_DIR}
cache=${2:?usage: collect-cellprofiler.sh VENV_PYTHON CACHE_DIR OUT_DIR}
out=${3:?usage: collect-cellprofiler.sh VENV_PYTHON CACHE_DIR OUT_DIR}

if [[ ! -x $py ]]; then
    echo "collect-cellprofiler: '$py' (last line of the recipe's output) is not an executable python" >&2
    exit 1
fi
venv=$(dirname "$(dirname "$py")")
if [[ ! -f $venv/pyvenv.cfg ]]; then
    echo "collect-cellprofiler: $venv is not a venv (no pyvenv.cfg)" >&2
    exit 1
fi
case $venv/ in
    "${cache%/}"/*) ;;
    *)
        echo "collect-cellprofiler: venv $venv is outside CELLMESH_CACHE=$cache" >&2
        exit 1
        ;;
esac

"$py" -c 'import importlib.metadata as m, cellprofiler, cellprofiler_core.pipeline, javabridge, bioformats, h5py, zmq, skimage, centrosome; print("CellProfiler", m.version("cellprofiler"))'

mkdir -p "$out/root$(dirname "$venv")" "$out/root/opt"
cp -a "$venv" "$out/root$venv"
printf '%s\n' "$venv" > "$out/root/opt/cellprofiler-venv.path"

# Shared libraries of every compiled file in the venv, outside the venv itself
# (wheels bundle some) and outside /usr/local (the base image's Python).
libs=$(find "$venv" -type f \( -name '*.so' -o -name '*.so.*' \) -print0 \
        | xargs -0 -r ldd 2>/dev/null \
        | awk '
            $2 == "=>" && $3 == "not" { print "MISSING " $1; next }
            $2 == "=>" && $3 ~ /^\// { print $3 }' \
        | sort -u)

# ldd run on a library that a wheel bundles (numpy.libs/, scipy.libs/, ...)
# does not find its bundled siblings, which the extensions load by RPATH: a
# name present in the venv is not missing.
missing=""
while read -r _ name; do
    if [[ -z $(find "$venv" -name "$name" -print -quit) ]]; then
        missing+="$name"$'\n'
    fi
done < <(grep '^MISSING ' <<<"$libs" || true)
if [[ -n $missing ]]; then
    echo "collect-cellprofiler: libraries not found for the venv's extensions:" >&2
    printf '%s' "$missing" >&2
    exit 1
fi

: > "$out/runtime-debs.txt.tmp"
unowned=()
while IFS= read -r lib; do
    [[ -z $lib ]] && continue
    case $lib in
        MISSING\ * | "$venv"/* | /usr/local/*) continue ;;
    esac
    # dpkg records paths as packaged (/lib/... on bookworm); try the real path too.
    if owner=$(dpkg -S "$lib" 2>/dev/null) || owner=$(dpkg -S "$(readlink -f "$lib")" 2>/dev/null); then
        # Lines read "pkg:arch: /path" or "pkg1, pkg2: /path"; skip diversions.
        grep -v '^diversion ' <<<"$owner" \
            | sed -e 's/: \/.*$//' | tr ',' '\n' | sed -e 's/^ *//' -e 's/:.*$//' \
            >> "$out/runtime-debs.txt.tmp"
    else
        unowned+=("$lib")
    fi
done <<<"$libs"

if (( ${#unowned[@]} )); then
    echo "collect-cellprofiler: libraries owned by no Debian package:" >&2
    printf '  %s\n' "${unowned[@]}" >&2
    exit 1
fi

sort -u "$out/runtime-debs.txt.tmp" > "$out/runtime-debs.txt"
rm "$out/runtime-debs.txt.tmp"
echo "collect-cellprofiler: venv $venv; runtime packages:"
sed 's/^/  /' "$out/runtime-debs.txt"
