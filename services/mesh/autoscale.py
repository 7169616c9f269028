"""The autoscaler: workers that follow the queue.

Every AUTOSCALE_INTERVAL_S it reads the backlog from the catalog, asks the
policy (services/mesh/scaling.py) how many workers that needs, and tells a
backend to run that many:

- `LocalBackend`: worker processes of the local mesh (`cellmesh up
  --autoscale MIN:MAX`). It starts workers with `start_worker` and stops one
  by SIGTERM, idle workers first (each worker's `GetWorkerStatus`): the
  worker stops taking sites, finishes what it holds and exits.
- `SwarmBackend`: the `cpworker` service of a Swarm, through the Docker
  Engine API (`docker` package): its replica count. Swarm chooses the task
  to stop and gives it SIGTERM and the service's stop_grace_period.

**Why the catalog, not the broker.** The scheduler keeps at most
QUEUE_PER_CONSUMER ready tasks per worker on the broker and leaves the rest
READY in the catalog, so the queue's depth says how many workers there are
rather than how much work waits. The catalog's progress of every plate
(`ListPlates`, then `GetPlateProgress` of each of its pipelines) counts all
of it: READY and CLAIMED (`ready`), QUEUED and RUNNING. Plates already
complete are skipped. `python -m services.mesh.autoscale` runs the Swarm
backend (the stack's `autoscaler` service).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from cellmesh.catalog.v1 import catalog_pb2, catalog_pb2_grpc
from cellmesh.worker.v1 import worker_pb2, worker_pb2_grpc

from services.common.settings import Var, load, positive_float, positive_int
from services.mesh.scaling import Decision, Observation, ScalePolicy, ScaleState, decide

log = logging.getLogger(__name__)


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


VARS = (
    Var("AUTOSCALE_MIN", "1", _non_negative_int, "fewest workers"),
    Var("AUTOSCALE_MAX", "4", positive_int, "most workers"),
    Var("AUTOSCALE_UP_COOLDOWN_S", "15", _non_negative_float, "seconds between two scale-ups"),
    Var(
        "AUTOSCALE_DOWN_COOLDOWN_S",
        "60",
        _non_negative_float,
        "seconds the demand must fit into fewer workers, and since the last scaling, before a scale-down",
    ),
    Var("AUTOSCALE_INTERVAL_S", "5", positive_float, "seconds between two looks at the backlog"),
    Var("CP_SLOTS", "1", positive_int, "CellProfiler slots of one worker"),
)


@dataclass(frozen=True)
class AutoscaleSettings:
    policy: ScalePolicy
    interval_s: float

    @classmethod
    def from_values(cls, v: dict[str, Any]) -> AutoscaleSettings:
        try:
            policy = ScalePolicy(
                v["AUTOSCALE_MIN"],
                v["AUTOSCALE_MAX"],
                v["CP_SLOTS"],
                v["AUTOSCALE_UP_COOLDOWN_S"],
                v["AUTOSCALE_DOWN_COOLDOWN_S"],
            )
        except ValueError as exc:
            raise ValueError(f"AUTOSCALE_MIN/AUTOSCALE_MAX/CP_SLOTS: {exc}") from exc
        return cls(policy, v["AUTOSCALE_INTERVAL_S"])

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> AutoscaleSettings:
        return cls.from_values(load(VARS, env))


def parse_range(text: str) -> tuple[int, int]:
    """`MIN:MAX` (e.g. 1:3) as given to `up --autoscale`."""
    low, sep, high = text.partition(":")
    try:
        if not sep:
            raise ValueError
        lo, hi = int(low), int(high)
    except ValueError:
        raise ValueError(f"{text!r}: give MIN:MAX, two whole numbers, e.g. 1:3") from None
    if lo < 0 or hi < max(1, lo):
        raise ValueError(f"{text!r}: MIN must be 0 or more and MAX at least 1 and at least MIN")
    return lo, hi


class Backend(Protocol):
    async def replicas(self) -> int:
        """Workers running and taking sites now."""
        ...

    @property
    def worker_start_s(self) -> float:
        """Seconds a new worker takes to take sites (0: not known yet)."""
        ...

    async def scale_to(self, replicas: int) -> None: ...


@dataclass(frozen=True)
class Backlog:
    """One look at the catalog."""

    waiting: int  # sites READY, CLAIMED or QUEUED
    running: int  # sites RUNNING
    #: Sites settled (DONE or FAILED) so far, per (plate, pipeline) not yet complete.
    settled: dict[tuple[str, str], int] = field(default_factory=dict)


class CatalogBacklog:
    """Backlog and running sites of every plate that is not complete."""

    def __init__(self, catalog: catalog_pb2_grpc.CatalogServiceAsyncStub) -> None:
        self.catalog = catalog

    async def read(self) -> Backlog:
        plates = (await self.catalog.ListPlates(catalog_pb2.ListPlatesRequest(), timeout=10)).plates
        waiting = running = 0
        settled: dict[tuple[str, str], int] = {}
        for plate in plates:
            for sha in plate.pipeline_sha256 or [""]:
                try:
                    p = (
                        await self.catalog.GetPlateProgress(
                            catalog_pb2.GetPlateProgressRequest(plate=plate.name, pipeline_sha256=sha),
                            timeout=10,
                        )
                    ).progress
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.NOT_FOUND:  # deleted meanwhile
                        continue
                    raise
                if p.complete:
                    continue
                waiting += p.ready + p.queued
                running += p.running
                settled[(plate.name, sha)] = p.done + p.failed
        return Backlog(waiting, running, settled)


#: Throughput is measured over this many seconds of looks at the catalog.
THROUGHPUT_WINDOW_S = 60.0


class Throughput:
    """Sites settled per second over the last THROUGHPUT_WINDOW_S, from the
    catalog's per-plate counts (a plate seen for the first time counts from
    then on)."""

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S) -> None:
        self.window_s = window_s
        self._last: dict[tuple[str, str], int] = {}
        self._total = 0
        self._points: deque[tuple[float, int]] = deque()

    def add(self, now: float, settled: dict[tuple[str, str], int]) -> float:
        self._total += sum(max(0, n - self._last[k]) for k, n in settled.items() if k in self._last)
        self._last = dict(settled)
        self._points.append((now, self._total))
        while len(self._points) > 2 and now - self._points[1][0] >= self.window_s:
            self._points.popleft()
        (t0, n0), (t1, n1) = self._points[0], self._points[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0


class Autoscaler:
    """Looks at the backlog, decides, and scales the backend."""

    def __init__(
        self,
        settings: AutoscaleSettings,
        backend: Backend,
        backlog: CatalogBacklog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.backlog = backlog
        self.clock = clock
        self.state = ScaleState()
        self.throughput = Throughput()
        self.decisions: list[Decision] = []

    async def step(self) -> Decision:
        seen = await self.backlog.read()
        now = self.clock()
        obs = Observation(
            seen.waiting,
            seen.running,
            await self.backend.replicas(),
            self.throughput.add(now, seen.settled),
            self.backend.worker_start_s,
        )
        decision = decide(self.settings.policy, obs, self.state, now)
        if decision.changes:
            log.info(
                "autoscale: %d -> %d worker(s): %s (backlog %d, running %d, %.2f site(s)/s)",
                obs.replicas, decision.replicas, decision.reason, obs.backlog, obs.in_flight, obs.throughput,
            )  # fmt: skip
            self.decisions.append(decision)
            await self.backend.scale_to(decision.replicas)
        return decision

    async def run(self, stop: asyncio.Event, on_change: Callable[[], None] | None = None) -> None:
        p = self.settings.policy
        log.info(
            "autoscaling workers between %d and %d (%d slot(s) each), every %.1f s; cool-downs up %.0f s, down %.0f s",
            p.min_replicas, p.max_replicas, p.slots_per_worker, self.settings.interval_s,
            p.up_cooldown_s, p.down_cooldown_s,
        )  # fmt: skip
        while not stop.is_set():
            try:
                decision = await self.step()
                if decision.changes and on_change is not None:
                    on_change()
            except (grpc.aio.AioRpcError, OSError, RuntimeError) as exc:
                # The catalog restarting, a worker that would not start: try again next time.
                log.warning("autoscale: no decision this time: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.interval_s)


# ---------------------------------------------------------------- local mesh


class LocalBackend:
    """Worker processes of a local mesh (services/mesh/demo.py)."""

    def __init__(self, mesh: Any, options: Any, start_timeout: float = 180.0) -> None:
        from services.mesh.procs import Proc

        self.mesh = mesh
        self.options = options
        self.start_timeout = start_timeout
        #: Workers told to stop, until they exit: no longer in mesh.procs, so
        #: the supervisor does not start them again.
        self.stopping: list[Proc] = []
        self._next = 1 + max((self._index(p.name) for p in self.workers()), default=-1)
        self.started = 0
        self.stopped = 0
        #: How long the last start of workers took, until they were healthy.
        self.worker_start_s = 0.0
        #: (name, exit code) of every worker it stopped that has exited.
        self.exited: list[tuple[str, int | None]] = []

    @staticmethod
    def _index(name: str) -> int:
        return int(name.rsplit("-", 1)[1])

    def workers(self) -> list[Any]:
        return [p for p in self.mesh.procs.procs if p.name.startswith("cpworker-")]

    def _reap(self) -> None:
        for proc in list(self.stopping):
            if not proc.alive:
                code = proc.popen.returncode if proc.popen else None
                log.info("autoscale: %s stopped (exit code %s)", proc.name, code)
                self.exited.append((proc.name, code))
                self.stopping.remove(proc)

    async def replicas(self) -> int:
        self._reap()
        return len(self.workers())

    async def scale_to(self, replicas: int) -> None:
        current = self.workers()
        if replicas > len(current):
            await self._start(replicas - len(current))
        elif replicas < len(current):
            for proc in await self._pick_idle(current, len(current) - replicas):
                self._stop(proc)

    async def _start(self, count: int) -> None:
        from services.mesh.demo import start_worker

        indexes = list(range(self._next, self._next + count))
        self._next += count
        began = time.monotonic()
        results = await asyncio.gather(
            *(start_worker(self.mesh, self.options, i) for i in indexes), return_exceptions=True
        )
        self.started += sum(1 for r in results if not isinstance(r, BaseException))
        if any(not isinstance(r, BaseException) for r in results):
            self.worker_start_s = time.monotonic() - began
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            # A worker that did not start goes; the next look tries again.
            for proc in self.workers():
                if self._index(proc.name) in indexes and not proc.alive:
                    self.mesh.procs.procs.remove(proc)
            raise RuntimeError(f"{len(failed)} worker(s) did not start: {failed[0]}")

    async def status(self, proc: Any) -> worker_pb2.GetWorkerStatusResponse | None:
        try:
            async with self.mesh.channel(proc.grpc_addr) as channel:
                stub: worker_pb2_grpc.WorkerServiceAsyncStub = worker_pb2_grpc.WorkerServiceStub(channel)
                reply: worker_pb2.GetWorkerStatusResponse = await stub.GetWorkerStatus(
                    worker_pb2.GetWorkerStatusRequest(), timeout=5
                )
                return reply
        except grpc.aio.AioRpcError:
            return None

    async def _pick_idle(self, workers: list[Any], count: int) -> list[Any]:
        """The `count` workers to stop: those running no site first, then those
        running the fewest; among equals the newest."""
        statuses = await asyncio.gather(*(self.status(p) for p in workers))

        def busy(i: int) -> tuple[int, int]:
            s = statuses[i]
            return (len(s.active) if s is not None else 0, -self._index(workers[i].name))

        order = sorted(range(len(workers)), key=busy)
        return [workers[i] for i in order[:count]]

    def _stop(self, proc: Any) -> None:
        log.info("autoscale: stopping %s (SIGTERM: it finishes its sites, takes no new one)", proc.name)
        self.mesh.procs.procs.remove(proc)
        self.stopping.append(proc)
        proc.signal(signal.SIGTERM)
        self.stopped += 1

    async def close(self, grace: float = 60.0) -> None:
        """Waits for the workers told to stop (SIGKILL after `grace`)."""
        deadline = time.monotonic() + grace
        while self.stopping and time.monotonic() < deadline:
            self._reap()
            await asyncio.sleep(0.2)
        for proc in self.stopping:
            log.warning("%s did not stop in %.0f s; killing it", proc.name, grace)
            proc.signal(signal.SIGKILL)
        self.stopping.clear()


# --------------------------------------------------------------------- Swarm


class SwarmBackend:
    """The replica count of a Swarm service (the Docker Engine API on a
    manager: the autoscaler runs there with the docker socket mounted)."""

    #: A new replica pulls its image, starts Java and turns healthy within
    #: about the health check's start period.
    worker_start_s = 90.0

    def __init__(self, client: Any, service: str) -> None:
        self.client = client
        self.service_name = service

    def _service(self) -> Any:
        import docker.errors

        try:
            return self.client.services.get(self.service_name)
        except docker.errors.NotFound:
            raise RuntimeError(
                f"Swarm has no service {self.service_name!r} (AUTOSCALE_SERVICE: the stack's name, '_', then cpworker)"
            ) from None

    def _replicas(self) -> int:
        service = self._service()
        service.reload()
        mode = service.attrs.get("Spec", {}).get("Mode", {})
        if "Replicated" not in mode:
            raise RuntimeError(
                f"service {self.service_name} is not replicated (mode {sorted(mode)}): it cannot be scaled"
            )
        return int(mode["Replicated"].get("Replicas", 0))

    async def replicas(self) -> int:
        return await asyncio.to_thread(self._replicas)

    def _scale(self, replicas: int) -> None:
        if not self._service().scale(replicas):
            raise RuntimeError(f"Swarm did not scale {self.service_name} to {replicas}")

    async def scale_to(self, replicas: int) -> None:
        await asyncio.to_thread(self._scale, replicas)


# ------------------------------------------------- python -m services.mesh.autoscale


def swarm_vars() -> tuple[Var, ...]:
    from services.common.settings import COMMON_VARS, port

    return (
        *COMMON_VARS,
        *VARS,
        Var("GRPC_PORT", "50055", port),
        Var("CATALOG_ADDR", "127.0.0.1:50051", help="host:port of the catalog"),
        Var("AUTOSCALE_SERVICE", "cellmesh_cpworker", help="the Swarm service of the workers"),
    )


async def main_swarm(v: dict[str, Any]) -> None:
    """The Swarm autoscaler: health SERVING once the catalog and the Docker
    Engine API have answered; stops on SIGTERM."""
    import docker
    import docker.errors

    from services.common import channels
    from services.common.server import GrpcServer, stop_event_on_signals

    stop = stop_event_on_signals()
    settings = AutoscaleSettings.from_values(v)
    from services.common.auth import MeshAuth

    auth = MeshAuth.from_settings(v)
    server = GrpcServer([], v["GRPC_HOST"], v["GRPC_PORT"], v["GRACE_SECONDS"], auth=auth)
    await server.start()
    try:
        async with channels.channel(v["CATALOG_ADDR"], auth) as channel:
            backlog = CatalogBacklog(catalog_pb2_grpc.CatalogServiceStub(channel))
            scaler: Autoscaler | None = None
            while scaler is None and not stop.is_set():
                try:
                    backend = SwarmBackend(docker.from_env(), v["AUTOSCALE_SERVICE"])
                    candidate = Autoscaler(settings, backend, backlog)
                    await candidate.step()
                    scaler = candidate
                except (grpc.aio.AioRpcError, OSError, RuntimeError, docker.errors.DockerException) as exc:
                    log.warning(
                        "autoscale: the catalog or the Docker Engine API (is /var/run/docker.sock mounted,"
                        " on a manager?) does not answer yet: %s",
                        exc,
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), settings.interval_s)
            if scaler is not None:
                await server.set_serving(True)
                await scaler.run(stop)
    finally:
        await server.stop()


if __name__ == "__main__":
    from services.common import logs

    values = load(swarm_vars())
    logs.configure(values["LOG_LEVEL"], "autoscaler")
    asyncio.run(main_swarm(values))
