#!/bin/sh
# Build the virtualenv of one service image (stack/Dockerfile, stages *-venv).
#
#   install-services.sh SERVICE
#
# Installs, into $CELLMESH_VENV (default /opt/cellmesh/venv), the client
# package from clients/python and the services package with the optional
# dependency group named after SERVICE ("cellmesh-services[catalog]", ...). A
# pyproject without such a group makes pip warn and install the base
# dependencies only, which is still a working image, just a larger one.
#
# Versions come from requirements.lock at the source root, used as a
# constraints file (also for build dependencies, through PIP_CONSTRAINT).
# Without it the build fails, unless REQUIRE_LOCK=0 is set for a development
# image, which then says in its freeze file that nothing was pinned.
#
# Environment: CELLMESH_SRC (default /src), CELLMESH_VENV, REQUIRE_LOCK (1),
# PIP_VERSION (pip inside the venv; default: the one venv brings).
set -eu

service=${1:?usage: install-services.sh SERVICE}
src=${CELLMESH_SRC:-/src}
venv=${CELLMESH_VENV:-/opt/cellmesh/venv}

case $service in
    catalog | scheduler | cpworker | reducer | web) ;;
    *) echo "install-services: unknown service '$service'" >&2; exit 2 ;;
esac

python3 -m venv "$venv"
pip="$venv/bin/python -m pip"
if [ -n "${PIP_VERSION:-}" ]; then
    $pip install "pip==$PIP_VERSION"
fi

if [ -f "$src/requirements.lock" ]; then
    PIP_CONSTRAINT="$src/requirements.lock"
    export PIP_CONSTRAINT
    pinned="pinned by requirements.lock"
elif [ "${REQUIRE_LOCK:-1}" = 1 ]; then
    echo "install-services: $src/requirements.lock is missing, so the image's" \
         "dependencies would not be pinned. Commit the lock, or build a" \
         "development image with --build-arg REQUIRE_LOCK=0." >&2
    exit 1
else
    echo "install-services: WARNING: no requirements.lock; dependencies are NOT pinned" >&2
    pinned="NOT pinned (built with REQUIRE_LOCK=0)"
fi

$pip install "$src/clients/python" "${src}[${service}]"
$pip check

# Fail here, not at deploy, when the service or the health probe is missing.
"$venv/bin/python" -c "import cellmesh, services.common.healthcheck, services.$service"

{
    echo "# cellmesh-services[$service]: dependencies $pinned"
    $pip freeze --all
} > "$venv/cellmesh-freeze.txt"
