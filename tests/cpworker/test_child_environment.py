"""The CellProfiler child's environment: an allow-list of what CellProfiler
needs from the worker's, never its credentials (services/cpworker/runner.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from services.cpworker.runner import ColdRunner, child_environment

POLLUTED = {
    # what the child needs
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/home/cellmesh",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "LC_NUMERIC": "C",
    "TZ": "UTC",
    "TMPDIR": "/var/tmp/cellmesh",
    "JAVA_HOME": "/usr/lib/jvm/java-17-openjdk",
    "CP_JAVA_HOME": "/usr/lib/jvm/java-17-openjdk",
    "JAVA_TOOL_OPTIONS": "-Xmx2g",
    "MPLBACKEND": "Agg",
    "MPLCONFIGDIR": "/tmp/matplotlib",
    "OPENBLAS_NUM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "CELLMESH_CP_LOG_LEVEL": "INFO",
    # what it must never see
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG",
    "AWS_SESSION_TOKEN": "FwoGZXIvYXdzE",
    "AWS_ACCESS_KEY_ID_FILE": "/run/secrets/s3_access_key_id",
    "S3_ENDPOINT_URL": "http://s3:9000",
    "S3_BUCKET": "cellmesh",
    "AMQP_URL": "amqp://cellmesh:hunter2@rabbitmq:5672/%2F",
    "AMQP_URL_FILE": "/run/secrets/amqp_url",
    "DATABASE_URL": "mysql+asyncmy://root:hunter2@mariadb/cellmesh",
    "CATALOG_ADDR": "catalog:50051",
    "MARIADB_PASSWORD": "hunter2",
    "GITHUB_TOKEN": "ghp_x",
    "VAULT_TOKEN_PATH": "/run/vault",
    "API_SECRET_KEY": "x",
    "SIGNING_KEY": "x",
    "GOOGLE_APPLICATION_CREDENTIALS": "/keys/sa.json",
    "SSL_CERT_FILE": "/etc/ssl/certs/ca.pem",
    # the worker's own certificate and the users' tokens (services/common/auth.py)
    "TLS_CA": "-----BEGIN CERTIFICATE-----",
    "TLS_KEY_FILE": "/run/secrets/tls_key",
    "TLS_CERT_FILE": "/run/secrets/tls_cert",
    "AUTH_TOKENS_FILE": "/run/secrets/auth_tokens",
    "AUTH": "on",
    # what it does not need, some of it dangerous
    "PYTHONPATH": "/opt/cellmesh/src",
    "PYTHONHOME": "/opt/cellmesh/venv",
    "VIRTUAL_ENV": "/opt/cellmesh/venv",
    "CLASSPATH": "/tmp/evil.jar",
    "CP_JDWP_PORT": "5005",
    "CP_DEBUG_WORKER": "NOT_INPROC",
    "LD_PRELOAD": "/tmp/evil.so",
    "DISPLAY": ":0",
    "GRPC_PORT": "50053",
    "CP_MODE": "warm",
    "CP_PYTHON": "/opt/cellprofiler-venv/bin/python",
    "WORK_DIR": "/var/lib/cellmesh",
}
NEEDED = {
    "PATH", "HOME", "LANG", "LC_ALL", "LC_NUMERIC", "TZ", "TMPDIR", "JAVA_HOME", "CP_JAVA_HOME",
    "JAVA_TOOL_OPTIONS", "MPLBACKEND", "MPLCONFIGDIR", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
    "MKL_NUM_THREADS", "CELLMESH_CP_LOG_LEVEL",
}  # fmt: skip


def test_only_what_cellprofiler_needs_is_passed() -> None:
    env = child_environment(environ=POLLUTED)
    assert set(env) == NEEDED
    assert {k: env[k] for k in NEEDED} == {k: POLLUTED[k] for k in NEEDED}


def test_home_is_the_childs_own_folder_when_given(tmp_path: Path) -> None:
    env = child_environment(environ=POLLUTED, home=tmp_path)
    assert env["HOME"] == str(tmp_path)
    assert set(env) == NEEDED


def test_extra_is_added_but_never_credentials() -> None:
    env = child_environment(
        {
            "CELLMESH_CP_LOG_LEVEL": "DEBUG",
            "OMP_NUM_THREADS": "4",
            "AWS_SECRET_ACCESS_KEY": "x",
            "DB_PASSWORD": "x",
        },
        environ=POLLUTED,
    )
    assert env["CELLMESH_CP_LOG_LEVEL"] == "DEBUG" and env["OMP_NUM_THREADS"] == "4"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "DB_PASSWORD" not in env


def test_java_home_is_found_when_unset() -> None:
    env = child_environment(environ={"PATH": "/usr/bin"})
    assert set(env) <= {"PATH", "JAVA_HOME"}
    if "JAVA_HOME" in env:
        assert Path(env["JAVA_HOME"], "bin", "java").is_file()


def test_without_home_the_workers_home_is_kept() -> None:
    assert child_environment(environ=POLLUTED)["HOME"] == "/home/cellmesh"


def test_the_cold_runner_gives_its_children_a_home_of_their_own() -> None:
    runner = ColdRunner("/nonexistent/python")
    env = runner._child_env()
    home = Path(env["HOME"])
    assert home.is_dir() and home.name.startswith("cellmesh-cp-home-")
    assert runner._child_env()["HOME"] == str(home)  # the same folder for every site
    asyncio.run(runner.close())
    assert not home.exists()
