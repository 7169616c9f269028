#!/usr/bin/env bash
# Build (or reuse) a headless CellProfiler 4.2.8.1 environment for the worker.
#
# CellProfiler 4.2's 2022-era pins cannot share the services' environment, so it
# gets its own virtual environment, cached outside the clone and keyed by what
# it is built from (this script, the requirements and constraints files beside
# it, and the Python version).
#
#   CP_PYTHON=$(scripts/install_cellprofiler.sh | tail -1)
#
# The last (and only) line on stdout is the environment's python; progress goes
# to stderr.
#
#   cached env present        -> prints the path, a few seconds
#   cached wheelhouse only    -> builds the env from it with --no-index, ~1 min
#   nothing cached            -> builds the wheelhouse from source, ~13 min
#
# Environment: CELLMESH_CACHE (default ~/.cache/cellmesh),
#              CELLMESH_BASE_PYTHON (default python3.11).
set -euo pipefail

# Everything below writes to stderr; fd 3 keeps the real stdout for the result.
exec 3>&1 1>&2

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename -- "${BASH_SOURCE[0]}")"
requirements="$here/cellprofiler-requirements.txt"
constraints="$here/cellprofiler-constraints.txt"
base_python=${CELLMESH_BASE_PYTHON:-python3.11}
cache=${CELLMESH_CACHE:-$HOME/.cache/cellmesh}

cp_version=4.2.8.1
# Build tools for the source builds: numpy 1.23.5 is what the rebuilt
# extensions compile against; Cython 0.29 regenerates their C files.
build_tools=("numpy==1.23.5" "Cython<3" "setuptools<70" "wheel" "pkgconfig")
# Packages without usable Python 3.11 wheels, rebuilt from their sdists.
source_builds=("h5py==3.7.0" "python-javabridge==4.0.5" "centrosome==1.2.3"
               "pyzmq==22.3.0" "scikit-image==0.18.3")
apt_packages=(libhdf5-dev libzmq3-dev openjdk-17-jdk-headless pkg-config)
# What a finished environment must be able to import.
smoke_imports="import cellprofiler, cellprofiler_core.pipeline, javabridge, bioformats, h5py, zmq, skimage, centrosome"

log() { printf '[install_cellprofiler %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v "$base_python" >/dev/null || die "$base_python not found (set CELLMESH_BASE_PYTHON)"
python_id=$("$base_python" -c 'import platform, sys; print(platform.python_version(), platform.machine(), sys.implementation.cache_tag)')
key=$({ sha256sum "$self" "$requirements" "$constraints" | cut -d' ' -f1; echo "$python_id"; } \
      | sha256sum | cut -c1-16)
wheelhouse="$cache/cp-wheels-$key"
venv="$cache/cp-env-$key"
stamp_name=.cellmesh-complete

ensure_apt_packages() {
    local missing=() p sudo=()
    for p in "${apt_packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || sudo=(sudo)
    log "installing Debian packages: ${missing[*]}"
    "${sudo[@]}" apt-get update -q
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
}

detect_java_home() {
    local d
    for d in /usr/lib/jvm/java-17-openjdk-*; do
        if [[ -x $d/bin/java && -f $d/include/jni.h ]]; then
            printf '%s\n' "$d"
            return 0
        fi
    done
    die "no JDK 17 under /usr/lib/jvm/java-17-openjdk-*"
}

env_is_complete() {
    [[ -f $venv/$stamp_name && -x $venv/bin/python ]] \
        && "$venv/bin/python" -c "$smoke_imports" >/dev/null 2>&1
}

# Remove the .c/.cpp files that Cython generated when the sdist was made (they
# include CPython internals that moved in 3.11), so the build regenerates them.
delete_generated_c() {
    local pyx stem ext
    while IFS= read -r -d '' pyx; do
        stem=${pyx%.pyx}
        for ext in c cpp; do
            if [[ -f $stem.$ext ]]; then rm -f -- "$stem.$ext"; fi
        done
    done < <(find "$1" -name '*.pyx' -print0)
}

build_wheelhouse() {
    local tmp="$wheelhouse.tmp.$$" bvenv="$cache/cp-build-$key.tmp.$$"
    local src="$bvenv/src" sdist dir hdf5_pc
    tmp_dirs+=("$tmp" "$bvenv")
    mkdir -p "$tmp" "$src"

    log "build environment: $bvenv"
    "$base_python" -m venv "$bvenv"
    local pip=("$bvenv/bin/python" -m pip)
    "${pip[@]}" install -q --upgrade pip
    "${pip[@]}" install -q "${build_tools[@]}"

    log "downloading sources: ${source_builds[*]}"
    # (--no-build-isolation: pip prepares their metadata with the tools above
    # instead of building today's setuptools and numpy from source for each)
    "${pip[@]}" download -q --no-deps --no-binary :all: --no-build-isolation \
        -d "$src" "${source_builds[@]}"

    hdf5_pc=hdf5
    pkg-config --exists hdf5 || hdf5_pc=hdf5-serial
    for sdist in "$src"/*.tar.gz "$src"/*.zip; do
        [[ -f $sdist ]] || continue
        dir="$src/$(basename "$sdist" | sed -E 's/\.(tar\.gz|zip)$//')"
        mkdir -p "$dir"
        case $sdist in
            *.zip) (cd "$dir" && unzip -q "$sdist") ;;
            *) tar -xzf "$sdist" -C "$dir" ;;
        esac
        # an sdist unpacks into one top-level folder
        dir=$(find "$dir" -mindepth 1 -maxdepth 1 -type d | head -1)
        delete_generated_c "$dir"
        log "building wheel: $(basename "$dir")"
        HDF5_PKGCONFIG_NAME=$hdf5_pc NPY_NUM_BUILD_JOBS=$(nproc) \
            "${pip[@]}" wheel -q --no-build-isolation --no-deps -w "$tmp" "$dir"
    done

    log "collecting every other dependency as wheels"
    "${pip[@]}" wheel -q -w "$tmp" --find-links "$tmp" -c "$constraints" -r "$requirements"
    "${pip[@]}" download -q --no-deps -d "$tmp" "cellprofiler==$cp_version"

    mv -T "$tmp" "$wheelhouse"
    rm -rf -- "$bvenv"
    log "wheelhouse ready: $wheelhouse ($(ls "$wheelhouse" | wc -l) wheels)"
}

build_env_from_wheelhouse() {
    local tmp="$venv.tmp.$$" f
    tmp_dirs+=("$tmp")
    log "building environment from $wheelhouse (no network)"
    "$base_python" -m venv "$tmp"
    local pip=("$tmp/bin/python" -m pip)
    "${pip[@]}" install -q --no-index --find-links "$wheelhouse" -c "$constraints" -r "$requirements"
    "${pip[@]}" install -q --no-index --find-links "$wheelhouse" --no-deps "cellprofiler==$cp_version"
    "$tmp/bin/python" -c "$smoke_imports"
    # Scripts and activate files name the folder they were made in.
    for f in "$tmp"/bin/* "$tmp/pyvenv.cfg"; do
        if [[ -f $f && ! -L $f ]] && grep -Iq -- "$tmp" "$f"; then
            sed -i "s#$tmp#$venv#g" "$f"
        fi
    done
    printf 'cellprofiler %s\nkey %s\npython %s\njava_home %s\nbuilt %s\n' \
        "$cp_version" "$key" "$python_id" "$JAVA_HOME" "$(date -u +%FT%TZ)" > "$tmp/$stamp_name"
    rm -rf -- "$venv"
    mv -T "$tmp" "$venv"
    log "environment ready: $venv"
}

tmp_dirs=()
cleanup() { ((${#tmp_dirs[@]} == 0)) || rm -rf -- "${tmp_dirs[@]}"; }
trap cleanup EXIT

mkdir -p "$cache"
exec 9>"$cache/.install-cellprofiler.lock"
flock 9

ensure_apt_packages
JAVA_HOME=$(detect_java_home)
export JAVA_HOME

if env_is_complete; then
    log "cached: $venv"
else
    # Leftovers of builds that were killed (we hold the lock, so none is running).
    rm -rf -- "$cache/cp-env-$key.tmp."* "$cache/cp-wheels-$key.tmp."* "$cache/cp-build-$key.tmp."*
    started=$SECONDS
    [[ -d $wheelhouse ]] || build_wheelhouse
    build_env_from_wheelhouse
    log "built in $((SECONDS - started)) s"
fi

printf '%s\n' "$venv/bin/python" >&3
