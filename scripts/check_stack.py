#!/usr/bin/env python3
"""Check the Swarm stack file before anyone deploys it.

    python scripts/check_stack.py [--stack stack/cellmesh.yml] [--no-docker]

First `docker stack config` validates the file as Swarm reads it (schema,
types, sizes, `${VAR:?}`), with REGISTRY and TAG set to placeholders when the
environment has none. Then, on the interpolated result, the checks that
`docker stack config` does not make (see stack/README.md, "What the check
catches"):

- every network, secret, config and volume a service uses is defined;
- every image of ours (``<registry>/cellmesh-<target>:<tag>``) has a stage
  ``<target>`` in stack/Dockerfile that runs as a non-root user with a health
  check; every other image, and every FROM, is pinned to a full version or a
  digest;
- every secret or config file exists, and every external secret is one the
  operator is told to create (docs/operations.md, stack/create-secrets.sh);
- no environment value, command or health check carries a password, key or
  URL with credentials, and every ``*_FILE`` variable names a secret the
  service mounts;
- services have health checks, restart policies, resource limits and update
  settings; a service with a data volume runs once, pinned to a node, and is
  never started twice; workers get a stop grace period and a broker
  consumer_timeout longer than their longest site;
- service addresses (``*_ADDR``, ``*_ENDPOINT_URL``) name services of the stack
  on the ports those services serve.

Exits 1 with one line per problem when anything is wrong, 2 when the check
itself cannot run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import yaml
except ImportError:  # pragma: no cover - reported to the user
    sys.exit("check_stack: PyYAML is needed (pip install pyyaml)")

REPO = Path(__file__).resolve().parent.parent

PLACEHOLDER_ENV = {
    "REGISTRY": "registry.check.invalid/cellmesh",
    "TAG": "check",
}

# <anything>/cellmesh-<target>:<tag> is built from stack/Dockerfile --target <target>.
OUR_IMAGE = re.compile(r"^(?:.*/)?cellmesh-(?P<target>[a-z0-9][a-z0-9_.-]*)(?::(?P<tag>[^@]+))?(?:@.*)?$")
FULL_VERSION = re.compile(r"\d+\.\d+\.\d+")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")

JOB_MODES = {"replicated-job", "global-job"}
DEPLOY_MODES = {"replicated", "global"} | JOB_MODES

SENSITIVE_KEY = re.compile(
    r"PASS(WORD|WD)?|SECRET|TOKEN|CREDENTIAL|PRIVATE_KEY|ACCESS_KEY|API_KEY|AUTH_KEY|COOKIE",
)
# Variables that hold a URL with credentials in them by convention.
SENSITIVE_URL_KEYS = {"DATABASE_URL", "AMQP_URL", "BROKER_URL", "REDIS_URL", "DSN"}
SWITCH_KEY = re.compile(r"RANDOM|ALLOW|SKIP|GENERATE")
SWITCH_VALUES = {"", "0", "1", "true", "false", "yes", "no"}
URL_WITH_PASSWORD = re.compile(r"\b[a-z][a-z0-9+.-]*://[^/@\s:]+:[^/@\s]+@", re.IGNORECASE)
PASSWORD_FLAG = re.compile(r"(--password[= ]\S+|\bpassword=\S+|(?<![\w-])-p[^\s-]\S*)", re.IGNORECASE)

MIN_GRACE_MARGIN_S = 60  # past SITE_TIMEOUT_S, for the upload and the ack
MIN_CONSUMER_TIMEOUT_MARGIN_S = 300  # past SITE_TIMEOUT_S, for queueing behind prefetch
RABBITMQ_DEFAULT_CONSUMER_TIMEOUT_MS = 30 * 60 * 1000


@dataclasses.dataclass
class Report:
    errors: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}")

    def warn(self, where: str, message: str) -> None:
        self.warnings.append(f"{where}: {message}")


@dataclasses.dataclass
class Paths:
    stack: Path
    dockerfile: Path
    docs: Path
    create_secrets: Path


# --------------------------------------------------------------------------
# Loading


def docker_stack_config(docker: str, stack: Path, report: Report) -> dict[str, Any] | None:
    env = dict(os.environ)
    for name, value in PLACEHOLDER_ENV.items():
        if not env.get(name):
            env[name] = value
            report.notes.append(f"{name} unset: checked with {name}={value}")
    proc = subprocess.run(
        [docker, "stack", "config", "-c", str(stack)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
        report.error("docker stack config", message)
        return None
    cfg: dict[str, Any] = yaml.safe_load(proc.stdout)
    return cfg


_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def interpolate(value: Any, env: dict[str, str], where: str, report: Report) -> Any:
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR:?message}, $$ (without docker)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, f"{where}.{k}", report) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, f"{where}[{i}]", report) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("named")
        op, arg = match.group("op"), match.group("arg") or ""
        present = name in env
        current = env.get(name, "")
        unset = not present or (op is not None and op.startswith(":") and current == "")
        if op in ("-", ":-"):
            return arg if unset else current
        if op in ("?", ":?"):
            if unset:
                report.error(where, f"required variable {name} is missing a value: {arg}")
            return current
        return current

    return _VAR.sub(substitute, value)


def load_without_docker(stack: Path, report: Report) -> dict[str, Any]:
    raw = yaml.safe_load(stack.read_text())
    env = dict(os.environ)
    for name, value in PLACEHOLDER_ENV.items():
        if not env.get(name):
            env[name] = value
            report.notes.append(f"{name} unset: checked with {name}={value}")
    cfg: dict[str, Any] = interpolate(raw, env, "stack", report)
    # docker stack config makes config and secret files absolute.
    for section in ("configs", "secrets"):
        for obj in (cfg.get(section) or {}).values():
            if isinstance(obj, dict) and obj.get("file"):
                obj["file"] = str((stack.parent / obj["file"]).resolve())
    return cfg


# --------------------------------------------------------------------------
# Small parsers


def parse_duration(text: Any) -> float | None:
    """Seconds in a Go/compose duration: 90s, 16m, 1m30s, 16m0s, 1h0m0s, 500ms."""
    if text is None:
        return None
    if isinstance(text, (int, float)):
        return float(text) / 1e9  # a bare number is nanoseconds
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", str(text).strip())
    if not parts or "".join(n + u for n, u in parts) != str(text).strip():
        return None
    scale = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def parse_bytes(text: Any) -> int | None:
    if text is None:
        return None
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*", str(text), re.IGNORECASE)
    if not m:
        return None
    unit = (m.group(2) or "b").lower().rstrip("b").rstrip("i")
    scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}[unit]
    return int(float(m.group(1)) * scale)


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        out = {}
        for item in env:
            key, _, value = str(item).partition("=")
            out[key] = value
        return out
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def refs(entries: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(source, entry) for the short and long syntax of secrets/configs."""
    for entry in entries or []:
        if isinstance(entry, str):
            yield entry, {"source": entry}
        elif isinstance(entry, dict):
            yield str(entry.get("source")), entry


def service_networks(service: dict[str, Any]) -> list[str]:
    nets = service.get("networks") or []
    return list(nets.keys()) if isinstance(nets, dict) else [str(n) for n in nets]


def named_volumes(service: dict[str, Any]) -> list[str]:
    names = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            source = entry.split(":", 1)[0] if ":" in entry else ""
            kind = "volume" if source and not source.startswith(("/", ".", "~")) else "bind"
        else:
            source = str(entry.get("source") or "")
            kind = entry.get("type", "volume")
        if kind == "volume" and source:
            names.append(source)
    return names


def bind_mounts(service: dict[str, Any]) -> list[str]:
    out = []
    for entry in service.get("volumes") or []:
        if isinstance(entry, str):
            source = entry.split(":", 1)[0]
            if source.startswith(("/", ".", "~")):
                out.append(source)
        elif entry.get("type") == "bind":
            out.append(str(entry.get("source")))
    return out


def secret_paths(service: dict[str, Any]) -> set[str]:
    paths = set()
    for source, entry in refs(service.get("secrets")):
        target = str(entry.get("target") or source)
        paths.add(target if target.startswith("/") else f"/run/secrets/{target}")
    return paths


def image_pinned(image: str) -> bool:
    if DIGEST.search(image):
        return True
    name, _, tag = image.rpartition(":")
    if not name or "/" in tag:  # no tag (the colon was a registry port)
        return False
    return tag != "latest" and bool(FULL_VERSION.search(tag))


# --------------------------------------------------------------------------
# Dockerfile


@dataclasses.dataclass
class Stage:
    name: str | None
    base: str
    lines: list[str]
    line_no: int


def parse_dockerfile(path: Path) -> tuple[list[Stage], dict[str, str]]:
    text = path.read_text()
    # Join continuation lines; drop comments and blank lines.
    logical: list[tuple[int, str]] = []
    buf, start = "", 0
    for no, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue
        if not buf:
            start = no
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        logical.append((start, buf + stripped))
        buf = ""
    if buf:
        logical.append((start, buf))

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for no, line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            words = rest.split()
            words = [w for w in words if not w.startswith("--platform")]
            base = words[0] if words else ""
            name = words[2] if len(words) >= 3 and words[1].lower() == "as" else None
            stages.append(Stage(name, base, [], no))
        elif keyword == "ARG" and not stages:
            key, _, default = rest.strip().partition("=")
            global_args[key.strip()] = default.strip().strip('"')
        elif stages:
            stages[-1].lines.append(line)
    return stages, global_args


def resolve_args(text: str, args: dict[str, str]) -> str:
    return re.sub(
        r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?",
        lambda m: args.get(m.group(1), m.group(0)),
        text,
    )


def stage_chain(stages: list[Stage], name: str) -> list[Stage]:
    """The stage and the stages it is built FROM, nearest first."""
    by_name = {s.name: s for s in stages if s.name}
    chain, seen = [], set()
    current = by_name.get(name)
    while current and current.name not in seen:
        chain.append(current)
        seen.add(current.name)
        current = by_name.get(current.base)
    return chain


def check_dockerfile(path: Path, report: Report) -> dict[str, list[Stage]]:
    """Returns, per stage name, its chain; reports unpinned bases."""
    where = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
    if not path.is_file():
        report.error(where, "missing")
        return {}
    stages, args = parse_dockerfile(path)
    names = {s.name for s in stages if s.name}
    for stage in stages:
        base = resolve_args(stage.base, args)
        if base in names or base == "scratch":
            continue
        if "$" in base:
            report.error(f"{where}:{stage.line_no}", f"FROM {stage.base}: no default for the build argument")
        elif not image_pinned(base):
            report.error(
                f"{where}:{stage.line_no}", f"FROM {base} is not pinned to a full version or a digest"
            )
    return {name: stage_chain(stages, name) for name in names}


# --------------------------------------------------------------------------
# Checks


def check_references(cfg: dict[str, Any], report: Report) -> None:
    services = cfg.get("services") or {}
    defined = {
        kind: set((cfg.get(kind) or {}).keys()) for kind in ("networks", "secrets", "configs", "volumes")
    }
    used: dict[str, set[str]] = {kind: set() for kind in defined}
    for name, svc in services.items():
        where = f"service {name}"
        for net in service_networks(svc):
            used["networks"].add(net)
            if net not in defined["networks"] and net != "default":
                report.error(where, f"network '{net}' is not defined under top-level networks")
        for kind in ("secrets", "configs"):
            for source, _ in refs(svc.get(kind)):
                used[kind].add(source)
                if source not in defined[kind]:
                    report.error(where, f"{kind[:-1]} '{source}' is not defined under top-level {kind}")
        for vol in named_volumes(svc):
            used["volumes"].add(vol)
            if vol not in defined["volumes"]:
                report.error(where, f"volume '{vol}' is not defined under top-level volumes")
        for path in bind_mounts(svc):
            report.warn(where, f"bind mount {path} must exist on every node the service may run on")
    for kind, names in defined.items():
        for unused in sorted(names - used[kind]):
            report.warn(f"{kind} {unused}", "defined but used by no service")


def check_images(
    cfg: dict[str, Any], chains: dict[str, list[Stage]], dockerfile: Path, report: Report
) -> None:
    rel = dockerfile.relative_to(REPO) if dockerfile.is_relative_to(REPO) else dockerfile
    for name, svc in (cfg.get("services") or {}).items():
        where = f"service {name}"
        image = str(svc.get("image") or "")
        if not image:
            report.error(where, "has no image")
            continue
        ours = OUR_IMAGE.match(image)
        if not ours:
            if not image_pinned(image):
                report.error(where, f"image {image} is not pinned to a full version (x.y.z) or a digest")
            continue
        tag = ours.group("tag")
        if not tag or tag == "latest":
            report.error(where, f"image {image}: give an explicit tag (TAG), not latest")
        target = ours.group("target")
        chain = chains.get(target)
        if not chain:
            report.error(
                where,
                f"image {image} has no Dockerfile: {rel} has no stage '{target}' "
                f"(an image named cellmesh-<target> is built with --target <target>)",
            )
            continue
        stage = chain[0]
        title = f'org.opencontainers.image.title="cellmesh-{target}"'
        if not any(line.upper().startswith("LABEL") and title in line for line in stage.lines):
            report.error(where, f"stage '{target}' of {rel} does not carry the label {title}")
        users = [
            line.split(None, 1)[1]
            for s in reversed(chain)
            for line in s.lines
            if line.upper().startswith("USER ")
        ]
        if not users or users[-1].split(":")[0] in ("root", "0"):
            report.error(where, f"stage '{target}' of {rel} runs as root (no USER, or USER root)")
        if not any(line.upper().startswith("HEALTHCHECK") for s in chain for line in s.lines):
            report.error(where, f"stage '{target}' of {rel} has no HEALTHCHECK")


def check_files_and_secrets(cfg: dict[str, Any], paths: Paths, report: Report) -> None:
    docs = paths.docs.read_text() if paths.docs.is_file() else ""
    if not docs:
        report.error(
            str(paths.docs), "missing: the operator's guide must say how to create the external secrets"
        )
    script = paths.create_secrets.read_text() if paths.create_secrets.is_file() else None
    external_names: set[str] = set()
    for kind in ("secrets", "configs"):
        for key, obj in (cfg.get(kind) or {}).items():
            obj = obj or {}
            where = f"{kind[:-1]} {key}"
            name = str(obj.get("name") or key)
            if obj.get("file"):
                path = Path(obj["file"])
                if not path.is_absolute():
                    path = paths.stack.parent / path
                if path.exists():
                    continue
                if kind == "secrets" and (str(path.name) in docs or str(obj["file"]) in docs):
                    report.notes.append(f"{where}: file {path} is absent; docs say the operator creates it")
                    continue
                report.error(
                    where, f"file {path} does not exist (and {paths.docs.name} does not say who creates it)"
                )
            elif obj.get("external"):
                if kind == "secrets":
                    external_names.add(name)
                if docs and name not in docs:
                    report.error(
                        where,
                        f"external {kind[:-1]} '{name}' is not in {paths.docs.name}: the operator is never told to create it",
                    )
            elif kind == "secrets" and obj.get("environment"):
                report.error(
                    where, "secrets from the deploying shell's environment are not supported by docker stack"
                )
            else:
                report.error(where, "has neither file nor external")
    if script is not None:
        # A name built in a loop ("cellmesh_tls_${role}_cert") is listed in full elsewhere.
        created = {n for n in re.findall(r"\bcellmesh_[a-z0-9_]+", script) if not n.endswith("_")}
        for name in sorted(external_names - created):
            report.error(f"secret {name}", f"{paths.create_secrets.name} does not create it")
        for name in sorted(n for n in created - external_names if n.startswith("cellmesh_")):
            report.warn(f"secret {name}", f"{paths.create_secrets.name} creates it but no service uses it")


def looks_sensitive(key: str) -> bool:
    base = key.upper()
    return bool(SENSITIVE_KEY.search(base)) or base in SENSITIVE_URL_KEYS or base.endswith(("_DSN",))


def check_environment(cfg: dict[str, Any], report: Report) -> None:
    for name, svc in (cfg.get("services") or {}).items():
        where = f"service {name}"
        mounted = secret_paths(svc)
        for key, value in env_of(svc).items():
            if key.upper().endswith("_FILE"):
                if not value:
                    report.error(where, f"{key} is empty")
                elif value.startswith("/run/secrets/") and value not in mounted:
                    report.error(where, f"{key}={value} but the service mounts no secret there")
                elif (
                    looks_sensitive(key[:-5])
                    and not value.startswith("/run/secrets/")
                    and value not in mounted
                ):
                    report.error(
                        where, f"{key}={value}: a secret's file should be a Docker secret under /run/secrets/"
                    )
                continue
            if URL_WITH_PASSWORD.search(value):
                report.error(where, f"{key} holds a URL with a password: use a secret and {key}_FILE")
            elif looks_sensitive(key) and value.strip():
                if SWITCH_KEY.search(key.upper()) and value.strip().lower() in SWITCH_VALUES:
                    continue
                report.error(
                    where, f"{key} is set to a literal value: pass it as a secret through {key}_FILE"
                )
        for field in ("command", "entrypoint"):
            text = svc.get(field)
            text = " ".join(map(str, text)) if isinstance(text, list) else str(text or "")
            if URL_WITH_PASSWORD.search(text) or PASSWORD_FLAG.search(text):
                report.error(where, f"{field} carries a password")
        test = (svc.get("healthcheck") or {}).get("test")
        text = " ".join(map(str, test)) if isinstance(test, list) else str(test or "")
        if URL_WITH_PASSWORD.search(text) or PASSWORD_FLAG.search(text):
            report.error(where, "healthcheck carries a password")


def deploy_mode(svc: dict[str, Any]) -> str:
    return str((svc.get("deploy") or {}).get("mode") or "replicated")


def config_file_for(cfg: dict[str, Any], svc: dict[str, Any], target_prefix: str) -> list[Path]:
    files = []
    for source, entry in refs(svc.get("configs")):
        target = str(entry.get("target") or f"/{source}")
        obj = (cfg.get("configs") or {}).get(source) or {}
        if target.startswith(target_prefix) and obj.get("file"):
            files.append(Path(obj["file"]))
    return files


def rabbitmq_settings(files: list[Path]) -> dict[str, str]:
    settings: dict[str, str] = {}
    for path in files:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, value = line.partition("=")
                settings[key.strip()] = value.strip()
    return settings


def check_operations(cfg: dict[str, Any], report: Report) -> None:
    services = cfg.get("services") or {}
    site_timeouts: list[tuple[str, int]] = []
    for name, svc in services.items():
        where = f"service {name}"
        deploy = svc.get("deploy") or {}
        mode = deploy_mode(svc)
        if mode not in DEPLOY_MODES:
            report.error(where, f"deploy.mode '{mode}' is not one of {', '.join(sorted(DEPLOY_MODES))}")
            continue
        job = mode in JOB_MODES
        health = svc.get("healthcheck") or {}
        if not job and (not health or health.get("disable") or not health.get("test")):
            report.error(
                where,
                "has no healthcheck (Swarm would route to, and roll upgrades onto, tasks that never became ready)",
            )
        restart = deploy.get("restart_policy") or {}
        if not restart:
            report.error(where, "has no deploy.restart_policy")
        elif not job and restart.get("condition", "any") != "any":
            report.error(
                where,
                "restart_policy.condition must be 'any': a task that exits 0 (a worker recycling itself) would not be replaced",
            )
        resources = deploy.get("resources") or {}
        limits, reservations = resources.get("limits") or {}, resources.get("reservations") or {}
        if not limits.get("memory") or not limits.get("cpus"):
            report.error(where, "needs deploy.resources.limits.memory and .cpus")
        if not reservations.get("memory"):
            report.error(where, "needs deploy.resources.reservations.memory")
        if not job:
            update = deploy.get("update_config") or {}
            if not update.get("order"):
                report.error(where, "needs deploy.update_config with an order (start-first or stop-first)")
        volumes = named_volumes(svc)
        if volumes:
            replicas = deploy.get("replicas", 1)
            if mode != "replicated" or str(replicas) != "1":
                report.error(
                    where, f"mounts data volume(s) {', '.join(volumes)}: must be replicated with replicas: 1"
                )
            for key in ("update_config", "rollback_config"):
                order = (deploy.get(key) or {}).get("order")
                if order != "stop-first":
                    report.error(
                        where,
                        f"mounts data volume(s): {key}.order must be stop-first (two tasks must never share the data)",
                    )
            constraints = (deploy.get("placement") or {}).get("constraints") or []
            if not any(re.match(r"\s*node\.(labels\.|hostname|id)", c) for c in constraints):
                report.error(
                    where,
                    "mounts a local data volume: pin it to one node with a placement constraint (node.labels...)",
                )
        env = env_of(svc)
        if "SITE_TIMEOUT_S" in env:
            try:
                timeout = int(env["SITE_TIMEOUT_S"])
            except ValueError:
                report.error(
                    where, f"SITE_TIMEOUT_S={env['SITE_TIMEOUT_S']} is not a whole number of seconds"
                )
                continue
            site_timeouts.append((name, timeout))
            grace = parse_duration(svc.get("stop_grace_period"))
            if grace is None:
                report.error(where, "needs a stop_grace_period (the default 10 s kills a worker mid-site)")
            elif grace < timeout + MIN_GRACE_MARGIN_S:
                report.error(
                    where,
                    f"stop_grace_period {svc.get('stop_grace_period')} ({grace:.0f} s) is shorter than "
                    f"SITE_TIMEOUT_S + {MIN_GRACE_MARGIN_S} s ({timeout + MIN_GRACE_MARGIN_S} s): "
                    "a stopping worker would be killed mid-site",
                )

    brokers = {n: s for n, s in services.items() if "rabbitmq" in str(s.get("image", ""))}
    for name, svc in brokers.items():
        settings = rabbitmq_settings(config_file_for(cfg, svc, "/etc/rabbitmq/"))
        timeout_ms = int(settings.get("consumer_timeout", RABBITMQ_DEFAULT_CONSUMER_TIMEOUT_MS))
        for worker, site_timeout in site_timeouts:
            need = (site_timeout + MIN_CONSUMER_TIMEOUT_MARGIN_S) * 1000
            if timeout_ms < need:
                report.error(
                    f"service {name}",
                    f"consumer_timeout {timeout_ms} ms is below {worker}'s SITE_TIMEOUT_S + "
                    f"{MIN_CONSUMER_TIMEOUT_MARGIN_S} s ({need} ms): RabbitMQ would take sites back from busy workers",
                )
        override = parse_bytes(settings.get("total_memory_available_override_value"))
        limit = parse_bytes(
            ((svc.get("deploy") or {}).get("resources") or {}).get("limits", {}).get("memory")
        )
        if override and limit and override > limit:
            report.error(
                f"service {name}",
                f"total_memory_available_override_value ({override} B) exceeds the memory limit ({limit} B): "
                "the broker would be killed before its memory alarm",
            )


def service_ports(svc: dict[str, Any]) -> set[int]:
    ports = set()
    env = env_of(svc)
    if env.get("GRPC_PORT", "").isdigit():
        ports.add(int(env["GRPC_PORT"]))
    for entry in svc.get("ports") or []:
        if isinstance(entry, dict) and entry.get("target"):
            ports.add(int(entry["target"]))
        elif isinstance(entry, (str, int)):
            ports.add(int(str(entry).rsplit(":", 1)[-1].split("/")[0].split("-")[0]))
    for port in svc.get("expose") or []:
        ports.add(int(str(port).split("/")[0]))
    return ports


def check_addresses(cfg: dict[str, Any], report: Report) -> None:
    services = cfg.get("services") or {}
    published: dict[int, str] = {}
    for name, svc in services.items():
        where = f"service {name}"
        for key, value in env_of(svc).items():
            if key.endswith("_ADDR"):
                host, _, port = value.rpartition(":")
            elif key.endswith(("_ENDPOINT_URL", "_ENDPOINT")) and "://" in value:
                netloc = value.split("://", 1)[1].split("/", 1)[0]
                host, _, port = netloc.rpartition(":") if ":" in netloc else (netloc, "", "")
            else:
                continue
            if not host or "." in host or host == "localhost":
                continue  # an address outside the stack
            if host not in services:
                report.error(where, f"{key}={value}: '{host}' is no service of this stack")
                continue
            served = service_ports(services[host])
            if port.isdigit() and served and int(port) not in served:
                report.error(where, f"{key}={value}: service {host} serves {sorted(served)}, not {port}")
        env = env_of(svc)
        test = (svc.get("healthcheck") or {}).get("test") or []
        test_text = " ".join(map(str, test)) if isinstance(test, list) else str(test)
        probe = re.search(r"services\.common\.healthcheck\s+\S*?:(\d+)", test_text)
        if probe and env.get("GRPC_PORT") and probe.group(1) != env["GRPC_PORT"]:
            report.error(
                where, f"healthcheck probes port {probe.group(1)} but GRPC_PORT is {env['GRPC_PORT']}"
            )
        if OUR_IMAGE.match(str(svc.get("image") or "")) and deploy_mode(svc) not in JOB_MODES:
            if "GRPC_PORT" not in env:
                report.warn(where, "GRPC_PORT not set: the image's default applies")
            if test and not probe:
                report.warn(where, "healthcheck does not use python -m services.common.healthcheck")
        for entry in svc.get("ports") or []:
            if isinstance(entry, dict) and entry.get("published"):
                published_port = int(entry["published"])
                if published_port in published:
                    report.error(
                        where, f"publishes port {published_port}, as does service {published[published_port]}"
                    )
                published[published_port] = name


# --------------------------------------------------------------------------


def run(paths: Paths, docker: str | None) -> Report:
    report = Report()
    if not paths.stack.is_file():
        report.error(str(paths.stack), "missing")
        return report
    if docker:
        cfg = docker_stack_config(docker, paths.stack, report)
        if cfg is None:
            return report
    else:
        cfg = load_without_docker(paths.stack, report)
    chains = check_dockerfile(paths.dockerfile, report)
    check_references(cfg, report)
    check_images(cfg, chains, paths.dockerfile, report)
    check_files_and_secrets(cfg, paths, report)
    check_environment(cfg, report)
    check_operations(cfg, report)
    check_addresses(cfg, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stack", type=Path, default=REPO / "stack" / "cellmesh.yml")
    parser.add_argument("--dockerfile", type=Path, help="default: Dockerfile beside the stack file")
    parser.add_argument(
        "--docs", type=Path, help="default: docs/operations.md beside the stack file's folder"
    )
    parser.add_argument(
        "--create-secrets", type=Path, help="default: create-secrets.sh beside the stack file"
    )
    parser.add_argument(
        "--docker", default=os.environ.get("DOCKER", "docker"), help="docker client (default: docker)"
    )
    parser.add_argument(
        "--no-docker",
        action="store_true",
        help="skip `docker stack config` (no schema validation) and interpolate the file here",
    )
    args = parser.parse_args(argv)

    stack = args.stack.resolve()
    paths = Paths(
        stack=stack,
        dockerfile=(args.dockerfile or stack.parent / "Dockerfile").resolve(),
        docs=(args.docs or stack.parent.parent / "docs" / "operations.md").resolve(),
        create_secrets=(args.create_secrets or stack.parent / "create-secrets.sh").resolve(),
    )
    docker = None
    if not args.no_docker:
        docker = shutil.which(args.docker)
        if docker is None:
            print(
                f"check_stack: the docker client ('{args.docker}') is not on PATH; "
                "install it (no engine is needed) or pass --no-docker to skip schema validation",
                file=sys.stderr,
            )
            return 2

    report = run(paths, docker)
    for note in report.notes:
        print(f"note: {note}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    for error in report.errors:
        print(f"error: {error}")
    shown = paths.stack.relative_to(REPO) if paths.stack.is_relative_to(REPO) else paths.stack
    checked = "docker stack config + checks" if docker else "checks without docker stack config"
    if report.errors:
        print(
            f"check_stack: {shown}: {len(report.errors)} error(s), {len(report.warnings)} warning(s) ({checked})"
        )
        return 1
    print(f"check_stack: {shown}: OK, {len(report.warnings)} warning(s) ({checked})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
