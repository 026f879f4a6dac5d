"""The node's long-lived async side: backends, heartbeat, cancel listener, running jobs.

Celery's pool calls ``NodeRuntime.run`` from its thread(s); the work itself happens on the
loop that ``LoopRuntime`` runs in a background thread, which owns the Redis and HTTP clients.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping

import httpx
import redis.exceptions

from broker import names
from broker.catalog import catalog_for
from broker.errors import BackendRateLimited, CorralError
from broker.route_url import parse_route_url
from broker.schemas import JobAssignment, JobResult, ModelOpRequest, NodeInfo
from broker.settings import CorralSettings
from worker.backend_load import BackendLoad
from worker.backends.base import Backend
from worker.backends.registry import (
    build_backends,
    build_route_backend,
    import_adapters,
    make_http_client,
    needs_tls,
)
from worker.config import WorkerConfig, providers_with_keys
from worker.heartbeat import build_node_info, mark_node_down, publish_node_info
from worker.jobs import JobControl
from worker.limiter import Admission, ProviderLimiter
from worker.loop_runtime import LoopRuntime
from worker.sysinfo import SystemProbe

log = logging.getLogger(__name__)


class NodeRuntime(LoopRuntime):
    def __init__(self, settings: CorralSettings, config: WorkerConfig) -> None:
        super().__init__(settings, thread_name="corral-loop")
        self.config = config
        self._http: httpx.AsyncClient | None = None
        self.backends: dict[str, Backend] = {}
        self._active: dict[str, JobControl] = {}
        self._started_at = time.time()
        self.instance = uuid.uuid4().hex[:12]
        """This process's identity: leases and the liveness key carry it."""
        self._load: dict[str, BackendLoad] = {}
        self.capacity: int | None = None
        """Job slots: the sum of the backends' parallel capacities, known once started."""
        self._probe = SystemProbe()
        self._stored_inventory: str | None = None
        """Digest of the inventory last stored in Redis: a beat without changes sends less."""
        self._last_info: NodeInfo | None = None
        """The last beat: a backend too busy to list its models keeps what it listed then."""
        self.catalog = catalog_for(settings.capabilities, settings.prices)
        """The capability and price tables: fill the heartbeat's gaps, price each job."""
        self._limiter: ProviderLimiter | None = None
        self._published_limits: dict[str, int] = {}
        """Per backend, the provider headers' update count last written to Redis."""
        self.cloud_providers: frozenset[str] = frozenset()
        """The provider kinds this ``--cloud`` worker serves routes of (it holds their keys)."""
        self._route_backends: dict[tuple[str, str], Backend] = {}
        """Adapters built for cloud routes, by (kind, base URL): one per endpoint, kept."""

    def start(self) -> None:
        import_adapters(self.config)  # before the loop's thread exists: see its docstring
        super().start()

    # --- jobs (called from Celery's threads) -----------------------------------------------

    def run(self, assignment: JobAssignment) -> JobResult | None:
        """Run a job to its end; None when this copy must not run (already taken)."""
        return self._call(self._run_node_job(assignment), timeout=self.settings.job_timeout_s + 30)

    def report_malformed(self, job_id: str, problem: str) -> None:
        """Tell a waiting client its job was rejected, so it does not wait for nothing."""
        self._call(self._report_error(job_id, "malformed", problem, self.config.name), timeout=10)

    def report_failure(self, assignment: JobAssignment, problem: str) -> None:
        """Best effort: end the attempt with an error after an unexpected failure."""
        self._report_failure_now(assignment, problem, self.config.name)

    @property
    def in_flight(self) -> int:
        return len(self._active)

    # --- inside the loop --------------------------------------------------------------------

    async def _startup(self) -> None:
        await self._connect(self.config.capacity)  # cloud routes' slots included
        self._limiter = ProviderLimiter(self.redis, self.settings.limits)
        await self._limiter.preload()
        self._http = make_http_client(self.settings.job_timeout_s, tls=needs_tls(self.config))
        self.backends = build_backends(self.config, self._http)
        if self.config.cloud:
            self.cloud_providers = providers_with_keys()
            log.info("serving cloud routes of: %s", ", ".join(sorted(self.cloud_providers)))
        await self._heartbeat_once()
        # After the first inventory: an adapter may have learnt its parallel capacity from
        # its server (llama.cpp's slots). The node's job slots are fixed from here on.
        self._load = {name: BackendLoad(b.capacity) for name, b in self.backends.items()}
        self.capacity = sum(b.capacity for b in self.backends.values())
        self.capacity += self.config.cloud_capacity
        self._resize_pool(self.capacity)
        self._background = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(
                self._listen(names.CANCEL_CHANNEL, self._cancel_local), name="cancel-listener"
            ),
        ]

    async def _shutdown(self) -> None:
        for task in self._active.values():
            if task.task is not None:
                task.task.cancel()
        for bg in self._background:
            bg.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        try:
            waiting = await self._jobs_waiting_in_queue()
            if waiting:
                # A drain before a restart (a rolling update): jobs wait for this node, some
                # maybe pinned to it. Marked down, the node would lose them in the second
                # before it is back; left to expire (three heartbeats), the restarted worker
                # takes over and its clients move the jobs on (to it, or elsewhere). If it
                # does not come back, they move as from a crashed node.
                log.info(
                    "%d job(s) wait in this node's queue: the node stays listed until its "
                    "heartbeat expires, so a restart serves them",
                    waiting,
                )
            else:
                await mark_node_down(self.redis, self.config.name)
        except redis.exceptions.RedisError as exc:
            log.warning("could not mark node down: %s", exc)
        for backend in [*self.backends.values(), *self._route_backends.values()]:
            await backend.aclose()
        if self._http is not None:
            await self._http.aclose()
        await self.redis.aclose()

    async def _jobs_waiting_in_queue(self) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for queue in names.node_queue_lists(self.config.name):
            pipe.llen(queue)
        return sum(int(n) for n in await pipe.execute())

    async def _heartbeat_once(self) -> None:
        info = await build_node_info(
            self.config,
            self.backends,
            instance=self.instance,
            in_flight=len(self._active),
            backend_in_flight={name: load.in_flight for name, load in self._load.items()},
            backend_latency_ms={
                name: load.latency_ms
                for name, load in self._load.items()
                if load.latency_ms is not None
            },
            interval_s=self.settings.heartbeat_interval_s,
            started_at=self._started_at,
            system=self._probe,
            capacity=self.capacity,
            backend_counters={
                name: load.counters(
                    c for c in self._active.values() if c.assignment.backend == name
                )
                for name, load in self._load.items()
            },
            catalog=self.catalog,
            cloud_providers=self.cloud_providers,
            previous=self._last_info,
        )
        self._last_info = info
        self._stored_inventory = await publish_node_info(
            self.redis, info, stored=self._stored_inventory
        )
        if any(getattr(b, "rate_limits", None) is not None for b in self.backends.values()):
            # Only cloud adapters keep a provider's rate-limit headers: a node without one
            # does not import what publishes them.
            from worker.provider_limits import publish_provider_limits  # noqa: PLC0415

            await publish_provider_limits(
                self.redis, self.config.name, self.backends, self._published_limits
            )

    async def _heartbeat_loop(self) -> None:
        interval = self.settings.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await self._heartbeat_once()
            except redis.exceptions.RedisError as exc:
                log.warning("heartbeat not sent: %s", exc)

    def _cancel_local(self, job_id: str) -> None:
        self._remember_cancel(job_id)
        control = self._active.get(job_id)
        if control is None or control.task is None:
            return
        log.info("cancelling job %s", job_id)
        control.cancel_requested = True
        control.task.cancel()

    async def _run_node_job(self, assignment: JobAssignment) -> JobResult | None:
        if assignment.backend not in self.backends and assignment.spec.route_url:
            # A cloud route's job on a --cloud worker: its adapter's slots, made on first use.
            self._load.setdefault(assignment.backend, BackendLoad(self.config.cloud_capacity))
        result = await self._run_job(
            assignment,
            active=self._active,
            load=self._load.get(assignment.backend),
            backends=self.backends,
            claimer=self.instance,
            node_name=self.config.name,
        )
        if result is not None:
            from worker.usage import record_usage  # noqa: PLC0415 - after the first job

            await record_usage(self.redis, result, assignment.spec.route, time.time())
        return result

    def _job_backends(
        self, assignment: JobAssignment, backends: Mapping[str, Backend]
    ) -> tuple[Mapping[str, Backend], str | None]:
        """A configured backend serves by name. A cloud route's job whose backend is none of
        them is served with an adapter built for the route's endpoint (``--cloud``), kept for
        the next job there."""
        route_url = assignment.spec.route_url
        if assignment.backend in backends or route_url is None:
            return backends, None
        target = parse_route_url(route_url)
        if target.kind not in self.cloud_providers:
            return {}, (
                f"node {assignment.node!r} serves no {target.kind} route: it needs --cloud and "
                f"{' or '.join(target.key_variables) or 'a cloud endpoint'}"
            )
        key = (target.kind, target.base_url)
        backend = self._route_backends.get(key)
        if backend is None:
            assert self._http is not None, "runtime not started"
            try:
                backend = build_route_backend(
                    target, self._http, capacity=self.config.cloud_capacity
                )
            except CorralError as exc:
                return {}, str(exc)
            self._route_backends[key] = backend
        return {assignment.backend: backend}, None

    async def _admit(
        self, assignment: JobAssignment, backends: Mapping[str, Backend]
    ) -> tuple[Admission | None, BackendRateLimited | None]:
        backend = backends.get(assignment.backend)
        if backend is None or self._limiter is None:
            return None, None
        try:
            admission = await self._limiter.admit(
                backend.kind, assignment.model, assignment.spec.messages
            )
        except BackendRateLimited as exc:
            log.info("job %s not sent to %s: %s", assignment.spec.job_id, backend.name, exc)
            return None, exc
        return admission, None

    async def _settle(self, admission: Admission, result: JobResult | None) -> None:
        if self._limiter is not None:
            await self._limiter.settle(admission, result)

    async def _model_op(self, request: ModelOpRequest) -> JobResult:
        return await self._run_model_op(
            request,
            backends=self.backends,
            probe=self._probe,
            node_name=self.config.name,
            heartbeat=self._heartbeat_once,
        )


__all__ = ["BackendLoad", "NodeRuntime"]
