"""scripts/check_stack.py passes the real stack and rejects broken copies of it.

Each broken case copies stack/ and docs/operations.md into a temporary tree,
breaks one thing, and expects the check to fail naming that thing: a check
that cannot fail proves nothing.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "scripts" / "check_stack.py"
HAVE_DOCKER = shutil.which("docker") is not None
needs_docker = pytest.mark.skipif(not HAVE_DOCKER, reason="docker client not on PATH")


def run_check(stack: Path, *args: str, docker: bool = HAVE_DOCKER) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, str(CHECK), "--stack", str(stack), *args]
    if not docker:
        cmd.append("--no-docker")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A copy of stack/ and docs/operations.md; returns the copied stack file."""
    shutil.copytree(REPO / "stack", tmp_path / "stack")
    (tmp_path / "docs").mkdir()
    shutil.copy(REPO / "docs" / "operations.md", tmp_path / "docs" / "operations.md")
    return tmp_path / "stack" / "cellmesh.yml"


def edit_stack(stack: Path, change: Callable[[dict[str, Any]], None]) -> None:
    data = yaml.safe_load(stack.read_text())
    change(data)
    stack.write_text(yaml.safe_dump(data, sort_keys=False))


def edit_text(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


# --------------------------------------------------------------------------


@needs_docker
def test_real_stack_passes_with_docker() -> None:
    proc = run_check(REPO / "stack" / "cellmesh.yml", docker=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout


def test_real_stack_passes_without_docker() -> None:
    proc = run_check(REPO / "stack" / "cellmesh.yml", docker=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_unmodified_copy_passes(tree: Path) -> None:
    """The copy itself is sound, so each failure below comes from its one change."""
    edit_stack(tree, lambda d: None)  # a YAML round trip, as the cases below do
    proc = run_check(tree)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def svc(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda d: d["services"][name]


BROKEN_STACKS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    (
        "undefined secret",
        lambda d: svc("scheduler")(d)["secrets"].append("no_such_secret"),
        "secret 'no_such_secret' is not defined",
    ),
    (
        "undefined config",
        lambda d: svc("rabbitmq")(d)["configs"].append({"source": "nope", "target": "/etc/x"}),
        "config 'nope' is not defined",
    ),
    (
        "undefined network",
        lambda d: svc("reducer")(d)["networks"].append("backend"),
        "network 'backend' is not defined",
    ),
    (
        "undefined volume",
        lambda d: svc("rabbitmq")(d)["volumes"].append("scratch:/scratch"),
        "volume 'scratch' is not defined",
    ),
    (
        "literal password in environment",
        lambda d: svc("mariadb")(d)["environment"].update(MARIADB_PASSWORD="hunter2hunter2"),
        "MARIADB_PASSWORD is set to a literal value",
    ),
    (
        "URL with a password in environment",
        lambda d: svc("scheduler")(d)["environment"].update(
            AMQP_URL="amqp://cellmesh:s3cret@rabbitmq:5672/%2F"
        ),
        "AMQP_URL holds a URL with a password",
    ),
    (
        "password in a command",
        lambda d: svc("catalog-migrate")(d).update(command=["mariadb", "--password=s3cret"]),
        "command carries a password",
    ),
    (
        "_FILE naming a secret the service does not mount",
        lambda d: svc("reducer")(d)["secrets"].remove("amqp_url"),
        "AMQP_URL_FILE=/run/secrets/amqp_url but the service mounts no secret there",
    ),
    (
        "image of ours without a Dockerfile target",
        lambda d: svc("reducer")(d).update(image="${REGISTRY}/cellmesh-plotter:${TAG}"),
        "has no stage 'plotter'",
    ),
    (
        "image of ours tagged latest",
        lambda d: svc("reducer")(d).update(image="${REGISTRY}/cellmesh-reducer:latest"),
        "not latest",
    ),
    (
        "third-party image on a moving tag",
        lambda d: svc("mariadb")(d).update(image="mariadb:10.11"),
        "mariadb:10.11 is not pinned",
    ),
    (
        "third-party image without a tag",
        lambda d: svc("localstack")(d).update(image="localstack/localstack"),
        "is not pinned",
    ),
    (
        "worker stop grace shorter than a site",
        lambda d: svc("cpworker")(d).update(stop_grace_period="5m"),
        "stop_grace_period 5m",
    ),
    (
        "site timeout raised past the broker's consumer_timeout",
        lambda d: svc("cpworker")(d)["environment"].update(SITE_TIMEOUT_S="7200"),
        "consumer_timeout 3600000 ms is below cpworker's SITE_TIMEOUT_S",
    ),
    (
        "two database replicas",
        lambda d: svc("mariadb")(d)["deploy"].update(replicas=2),
        "must be replicated with replicas: 1",
    ),
    (
        "database started before the old one stops",
        lambda d: svc("mariadb")(d)["deploy"]["update_config"].update(order="start-first"),
        "update_config.order must be stop-first",
    ),
    (
        "database not pinned to a node",
        lambda d: svc("mariadb")(d)["deploy"].pop("placement"),
        "pin it to one node",
    ),
    (
        "service without a healthcheck",
        lambda d: svc("scheduler")(d).pop("healthcheck"),
        "service scheduler: has no healthcheck",
    ),
    (
        "restart only on failure",
        lambda d: svc("cpworker")(d)["deploy"]["restart_policy"].update(condition="on-failure"),
        "restart_policy.condition must be 'any'",
    ),
    (
        "no resource limits",
        lambda d: svc("reducer")(d)["deploy"].pop("resources"),
        "needs deploy.resources.limits",
    ),
    (
        "address of a service that does not exist",
        lambda d: svc("scheduler")(d)["environment"].update(CATALOG_ADDR="catalogue:50051"),
        "'catalogue' is no service of this stack",
    ),
    (
        "address on the wrong port",
        lambda d: svc("reducer")(d)["environment"].update(CATALOG_ADDR="catalog:50052"),
        "service catalog serves [50051], not 50052",
    ),
    (
        "health probe on the wrong port",
        lambda d: svc("cpworker")(d)["healthcheck"].update(
            test=["CMD", "python", "-m", "services.common.healthcheck", "127.0.0.1:50051"]
        ),
        "healthcheck probes port 50051 but GRPC_PORT is 50053",
    ),
    (
        "two services on one published port",
        lambda d: svc("localstack")(d)["ports"][0].update(published=50051),
        "publishes port 50051",
    ),
    (
        "config file that does not exist",
        lambda d: d["configs"]["rabbitmq_conf"].update(file="./rabbitmq/missing.conf"),
        "missing.conf does not exist",
    ),
    (
        "external secret the operator is never told about",
        lambda d: d["secrets"]["amqp_url"].update(name="cellmesh_amqp_url_v2"),
        "'cellmesh_amqp_url_v2' is not in operations.md",
    ),
    (
        "unknown deploy mode",
        lambda d: svc("catalog-migrate")(d)["deploy"].update(mode="once"),
        "deploy.mode 'once'",
    ),
]


@pytest.mark.parametrize(
    ("change", "expected"),
    [pytest.param(change, expected, id=name) for name, change, expected in BROKEN_STACKS],
)
def test_broken_stack_is_rejected(
    tree: Path, change: Callable[[dict[str, Any]], None], expected: str
) -> None:
    edit_stack(tree, change)
    proc = run_check(tree)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert expected in proc.stdout, proc.stdout + proc.stderr


@needs_docker
def test_schema_error_is_rejected(tree: Path) -> None:
    """What only `docker stack config` sees: a key Swarm's schema does not know."""
    edit_stack(tree, lambda d: svc("catalog")(d)["deploy"].update(replica=3))
    proc = run_check(tree, docker=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "docker stack config" in proc.stdout
    assert "replica" in proc.stdout


@needs_docker
def test_missing_required_variable_is_rejected(tree: Path) -> None:
    edit_text(tree, "${CPWORKER_REPLICAS:-2}", "${CPWORKER_REPLICAS:?set CPWORKER_REPLICAS}")
    proc = run_check(tree, docker=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "CPWORKER_REPLICAS" in proc.stdout


def test_consumer_timeout_below_site_is_rejected(tree: Path) -> None:
    edit_text(
        tree.parent / "rabbitmq" / "cellmesh.conf", "consumer_timeout = 3600000", "consumer_timeout = 600000"
    )
    proc = run_check(tree)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "consumer_timeout 600000 ms" in proc.stdout


def test_broker_memory_above_its_limit_is_rejected(tree: Path) -> None:
    edit_text(
        tree.parent / "rabbitmq" / "cellmesh.conf",
        "total_memory_available_override_value = 1073741824",
        "total_memory_available_override_value = 4294967296",
    )
    proc = run_check(tree)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "exceeds the memory limit" in proc.stdout


def test_unpinned_dockerfile_base_is_rejected(tree: Path) -> None:
    edit_text(
        tree.parent / "Dockerfile",
        "ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm",
        "ARG PYTHON_IMAGE=python:3.11-slim",
    )
    proc = run_check(tree)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FROM python:3.11-slim is not pinned" in proc.stdout


def test_root_image_is_rejected(tree: Path) -> None:
    dockerfile = tree.parent / "Dockerfile"
    text = dockerfile.read_text()
    start = text.index("FROM base AS reducer")
    dockerfile.write_text(text[:start] + text[start:].replace("USER 10001:10001", "USER root", 1))
    proc = run_check(tree)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "stage 'reducer' of" in proc.stdout and "runs as root" in proc.stdout


def test_secret_missing_from_create_script_is_rejected(tree: Path) -> None:
    edit_text(tree.parent / "create-secrets.sh", "cellmesh_amqp_url", "cellmesh_broker_url")
    proc = run_check(tree)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "secret cellmesh_amqp_url: create-secrets.sh does not create it" in proc.stdout


def test_docs_missing_is_rejected(tree: Path) -> None:
    (tree.parent.parent / "docs" / "operations.md").unlink()
    proc = run_check(tree)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "operations.md: missing" in proc.stdout


# --------------------------------------------------------------------------
# The parsers the checks rest on.


def load_module() -> Any:
    if "check_stack" in sys.modules:
        return sys.modules["check_stack"]
    spec = importlib.util.spec_from_file_location("check_stack", CHECK)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_stack"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("16m", 960),
        ("16m0s", 960),
        ("1h0m0s", 3600),
        ("1m30s", 90),
        ("90s", 90),
        ("500ms", 0.5),
        ("soon", None),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    assert load_module().parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("image", "pinned"),
    [
        ("mariadb:10.11.15", True),
        ("rabbitmq:3.13.7-management", True),
        ("mariadb:10.11", False),
        ("mariadb:latest", False),
        ("mariadb", False),
        ("registry:5000/mariadb", False),
        ("mariadb@sha256:" + "0" * 64, True),
    ],
)
def test_image_pinned(image: str, pinned: bool) -> None:
    assert load_module().image_pinned(image) is pinned


def test_interpolation_without_docker() -> None:
    module = load_module()
    report = module.Report()
    env = {"SET": "x", "EMPTY": ""}
    out = module.interpolate(
        ["${SET}", "${UNSET:-d}", "${EMPTY:-d}", "${EMPTY-d}", "$$HOME", "${UNSET:?needed}"], env, "t", report
    )
    assert out == ["x", "d", "d", "", "$HOME", ""]
    assert report.errors == ["t[5]: required variable UNSET is missing a value: needed"]
