"""The node's long-lived async side: backends, heartbeat, cancel listener, running jobs.

Celery's thread pool calls ``NodeRuntime.run`` from its threads; the work itself happens on one
asyncio loop in a background thread, which owns the Redis and HTTP clients. One loop keeps
connection pools warm between jobs (no per-job connect on the hot path) and lets a cancel
message stop a job by cancelling its task, which closes the backend's HTTP stream.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Coroutine, Iterable, Mapping
from concurrent.futures import Future
from typing import Any, Literal, TypeVar

import httpx
import redis.exceptions
from redis.asyncio import Redis

from broker import names
from broker.catalog import catalog_for
from broker.errors import BackendRateLimited, BrokerUnavailable, CorralError
from broker.redis_clients import async_client
from broker.route_url import parse_route_url
from broker.schemas import (
    JobAssignment,
    JobCounters,
    JobResult,
    ModelOpRequest,
    Timings,
    free_memory_bytes,
)
from broker.settings import CorralSettings, redacted_url
from worker.backends.base import Backend
from worker.backends.registry import (
    build_backends,
    build_route_backend,
    make_http_client,
    needs_tls,
)
from worker.config import WorkerConfig, providers_with_keys
from worker.heartbeat import build_node_info, mark_node_down, publish_node_info
from worker.jobs import JobControl, run_job
from worker.limiter import Admission, ProviderLimiter
from worker.model_ops import run_model_op
from worker.provider_limits import publish_provider_limits
from worker.stream import JobStream, StreamScripts
from worker.sysinfo import SystemProbe
from worker.usage import record_usage

_REDIS_CONNECTIONS = 512
"""The worker's Redis connections at most (heartbeat, cancel listener, one per running job)."""

log = logging.getLogger(__name__)
T = TypeVar("T")

_RECONNECT_DELAY_S = 1.0
_RECENT_CANCELS_KEPT = 10_000
# Weight of the newest time-to-first-token in a backend's moving average: a few jobs move it.
_LATENCY_EWMA_WEIGHT = 0.3


class BackendLoad:
    """What runs on one backend now and how fast it has answered lately."""

    def __init__(self, capacity: int) -> None:
        # Never more requests at once than the backend runs in parallel: a job beyond that
        # waits here (the node's Celery pool is sized to the sum over its backends).
        self.slots = asyncio.Semaphore(capacity)
        self.in_flight = 0
        self.latency_ms: float | None = None
        self.tokens_of_ended_jobs = 0
        self.jobs_done = 0
        self.jobs_failed = 0

    def observe_first_token(self, ms: float) -> None:
        if self.latency_ms is None:
            self.latency_ms = ms
        else:
            self.latency_ms += _LATENCY_EWMA_WEIGHT * (ms - self.latency_ms)

    def job_ended(self, control: JobControl, result: JobResult | None) -> None:
        """Count a job that ran here, in the same step that drops it from the running jobs
        (so a heartbeat never counts its tokens twice or not at all)."""
        reported = result.usage.completion_tokens if result is not None else None
        # The backend's own count when it gave one, never less than what was streamed: the
        # counter only goes up, so a reader's rate is never negative.
        self.tokens_of_ended_jobs += max(control.tokens_streamed, reported or 0)
        if result is None:
            return  # another delivery owns it, or the worker is stopping: not this one's
        if result.status == "ok":
            self.jobs_done += 1
        elif result.status == "error":
            self.jobs_failed += 1

    def counters(self, running: Iterable[JobControl]) -> JobCounters:
        """Since the worker started; ``running`` are the jobs on this backend now."""
        return JobCounters(
            tokens_out=self.tokens_of_ended_jobs + sum(c.tokens_streamed for c in running),
            jobs_done=self.jobs_done,
            jobs_failed=self.jobs_failed,
        )


class NodeRuntime:
    def __init__(self, settings: CorralSettings, config: WorkerConfig) -> None:
        self.settings = settings
        self.config = config
        self.catalog = catalog_for(settings.capabilities, settings.prices)
        """The capability and price tables: fill the heartbeat's gaps, price each job."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="corral-loop", daemon=True
        )
        self._redis: Redis | None = None
        self._scripts: StreamScripts | None = None
        self._limiter: ProviderLimiter | None = None
        self._published_limits: dict[str, int] = {}
        """Per backend, the provider headers' update count last written to Redis."""
        self._http: httpx.AsyncClient | None = None
        self.backends: dict[str, Backend] = {}
        self.cloud_providers: frozenset[str] = frozenset()
        """The provider kinds this ``--cloud`` worker serves routes of (it holds their keys)."""
        self._route_backends: dict[tuple[str, str], Backend] = {}
        """Adapters built for cloud routes, by (kind, base URL): one per endpoint, kept."""
        self._active: dict[str, JobControl] = {}
        self._recent_cancels: OrderedDict[str, None] = OrderedDict()
        self._background: list[asyncio.Task[None]] = []
        self._started_at = time.time()
        self.instance = uuid.uuid4().hex[:12]
        """This process's identity: leases and the liveness key carry it."""
        self._load: dict[str, BackendLoad] = {}
        self.capacity: int | None = None
        """Job slots: the sum of the backends' parallel capacities, known once started."""
        self._probe = SystemProbe()
        self._stored_inventory: str | None = None
        """Digest of the inventory last stored in Redis: a beat without changes sends less."""

    # --- life cycle (called from the main thread) ------------------------------------------

    def start(self) -> None:
        """Connect, check the broker answers, publish the first heartbeat, start the loops.

        Raises BrokerUnavailable with a message that names the broker without its password.
        """
        self._thread.start()
        self._call(self._startup(), timeout=30)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self._shutdown(), timeout=10)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            # On the way out: the node still expires from the cluster within three heartbeats.
            log.warning("clean shutdown incomplete: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    # --- jobs (called from Celery's threads) -----------------------------------------------

    def run(self, assignment: JobAssignment) -> JobResult | None:
        """Run a job to its end; None when this copy must not run (already taken)."""
        return self._call(self._run(assignment), timeout=self.settings.job_timeout_s + 30)

    def start_model_op(self, request: ModelOpRequest) -> None:
        """Start a pull / warm / unload / rm on the loop and return at once.

        A pull can take many minutes: holding one of Celery's slots for it would stop the
        node's jobs meanwhile. Progress and the outcome go to the op's stream.
        """
        future = asyncio.run_coroutine_threadsafe(self._model_op(request), self._loop)
        future.add_done_callback(_log_op_failure)

    def report_malformed(self, job_id: str, problem: str) -> None:
        """Tell a waiting client its job was rejected, so it does not wait for nothing."""
        self._call(self._report_error(job_id, "malformed", problem), timeout=10)

    def report_failure(self, assignment: JobAssignment, problem: str) -> None:
        """Best effort: end the attempt with an error after an unexpected failure; the
        controller may move the job on while it has attempts left."""
        job_id = assignment.spec.job_id
        final = assignment.attempt >= assignment.spec.max_attempts
        try:
            self._call(
                self._report_error(
                    job_id, "worker_error", problem, attempt=assignment.attempt, final=final
                ),
                timeout=5,
            )
        except (redis.exceptions.RedisError, TimeoutError, OSError) as exc:
            log.warning("could not report the failure of job %s: %s", job_id, exc)

    @property
    def in_flight(self) -> int:
        return len(self._active)

    # --- inside the loop --------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=timeout)

    @property
    def redis(self) -> Redis:
        assert self._redis is not None, "runtime not started"
        return self._redis

    @property
    def scripts(self) -> StreamScripts:
        assert self._scripts is not None, "runtime not started"
        return self._scripts

    async def _startup(self) -> None:
        url = self.settings.broker_url.get_secret_value()
        # A blocking pool: past its size a write waits (up to 30 s) for a connection instead of
        # failing at once (the default pool raised MaxConnectionsError at 100, and a job whose
        # claim failed was lost). Each running job holds at most one connection at a time.
        self._redis = async_client(
            self.settings,
            max_connections=_REDIS_CONNECTIONS,
            blocking_timeout_s=30,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        try:
            await self._redis.ping()
        except redis.exceptions.AuthenticationError:
            raise BrokerUnavailable(
                f"Redis at {redacted_url(url)} refused the password (check CORRAL_BROKER_URL)"
            ) from None
        except redis.exceptions.ResponseError as exc:
            raise BrokerUnavailable(f"Redis at {redacted_url(url)} refused us: {exc}") from None
        except (redis.exceptions.ConnectionError, OSError) as exc:
            raise BrokerUnavailable(
                f"cannot reach Redis at {redacted_url(url)}: {type(exc).__name__}"
            ) from None
        self._scripts = StreamScripts(self._redis)
        await self._scripts.preload()
        self._limiter = ProviderLimiter(self._redis, self.settings.limits)
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
        self._background = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._cancel_listener(), name="cancel-listener"),
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
        )
        self._stored_inventory = await publish_node_info(
            self.redis, info, stored=self._stored_inventory
        )
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

    async def _cancel_listener(self) -> None:
        """Stop running jobs whose id arrives on the cancel channel; reconnects on its own."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(names.CANCEL_CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._cancel_local(_text(message["data"]))
            except redis.exceptions.RedisError as exc:
                log.warning("cancel listener lost Redis (%s); reconnecting", exc)
                await asyncio.sleep(_RECONNECT_DELAY_S)

    def _cancel_local(self, job_id: str) -> None:
        # Remembered even when the job is not running here yet: if it is waiting in this
        # node's queue, it is skipped without a backend request when it comes up.
        self._recent_cancels[job_id] = None
        while len(self._recent_cancels) > _RECENT_CANCELS_KEPT:
            self._recent_cancels.popitem(last=False)
        control = self._active.get(job_id)
        if control is None or control.task is None:
            return
        log.info("cancelling job %s", job_id)
        control.cancel_requested = True
        control.task.cancel()

    async def _run(self, assignment: JobAssignment) -> JobResult | None:
        job_id = assignment.spec.job_id
        # Registered before the claim, so a cancel arriving in between is not lost.
        control = JobControl(assignment, cancel_requested=job_id in self._recent_cancels)
        self._active[job_id] = control
        if assignment.backend not in self.backends and assignment.spec.route_url:
            # A cloud route's job on a --cloud worker: its adapter's slots, made on first use.
            self._load.setdefault(assignment.backend, BackendLoad(self.config.cloud_capacity))
        load = self._load.get(assignment.backend)
        result: JobResult | None = None
        try:
            if load is not None:
                await load.slots.acquire()
                load.in_flight += 1
            try:
                result = await self._run_claimed(control)
            finally:
                if load is not None:
                    load.in_flight -= 1
                    load.slots.release()
                    load.job_ended(control, result)
            if result is not None and load is not None and result.timings.first_token_ms:
                load.observe_first_token(result.timings.first_token_ms)
            if result is not None:
                await record_usage(self.redis, result, assignment.spec.route, time.time())
            return result
        finally:
            del self._active[job_id]

    async def _run_claimed(self, control: JobControl) -> JobResult | None:
        assignment = control.assignment
        job_id = assignment.spec.job_id
        stream = JobStream(self.scripts, job_id, self.settings.replay_ttl_s)
        claim = stream.claim(
            attempt=assignment.attempt,
            claimer=self.instance,
            node=assignment.node,
            backend=assignment.backend,
            model=assignment.model,
            lease_ttl_s=int(self.settings.job_timeout_s) + self.settings.replay_ttl_s,
            tier=assignment.tier,
            reason=assignment.reason,
        )
        timeout = assignment.spec.first_token_timeout_s or self.settings.first_token_timeout_s
        backends, missing = self._backends_for(assignment)
        admission, refused = await self._admit(assignment, backends)
        task = asyncio.create_task(
            run_job(
                control,
                backends,
                stream,
                claim,
                first_token_timeout_s=timeout,
                missing_reason=missing,
                catalog=self.catalog,
                refused=refused,
            )
        )
        control.task = task
        try:
            result = await task
            if admission is not None and self._limiter is not None:
                await self._limiter.settle(admission, result)
        except asyncio.CancelledError:
            # Cancelled before its first step ran: run_job never saw it, so report here.
            if control.cancel_requested and task.cancelled():
                claim.close()  # never started: nothing to undo
                await self._report_error(job_id, "cancelled", "job cancelled")
                return None
            raise
        if result is None:
            log.warning(
                "job %s attempt %d: another delivery or attempt owns it; no more from here",
                job_id,
                assignment.attempt,
            )
        return result

    def _backends_for(self, assignment: JobAssignment) -> tuple[dict[str, Backend], str | None]:
        """The backends a job may use here, and why its backend is missing if it is.

        A configured backend serves by name. A cloud route's job whose backend is none of
        them is served with an adapter built for the route's endpoint (``--cloud``), kept for
        the next job there."""
        route_url = assignment.spec.route_url
        if assignment.backend in self.backends or route_url is None:
            return self.backends, None
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
        """Count the call against the configured rate limits before the backend is asked."""
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

    async def _model_op(self, request: ModelOpRequest) -> JobResult:
        stream = JobStream(self.scripts, request.op_id, self.settings.replay_ttl_s)
        started_at = time.time()
        system = await self._probe.snapshot()
        free = free_memory_bytes(system.memory, system.gpus)
        backend_name = request.backend or "-"
        try:
            summary = await run_model_op(request, self.backends, free, stream.progress)
            status: Literal["ok", "error"] = "ok"
            error: CorralError | None = None
        except CorralError as exc:
            summary, status, error = str(exc), "error", exc
        result = JobResult(
            job_id=request.op_id,
            status=status,
            node=request.node,
            backend=backend_name,
            model=request.model,
            text=summary,
            timings=Timings(
                queued_ms=max(0.0, (started_at - request.created_at) * 1000),
                first_token_ms=None,
                total_ms=max(0.0, (time.time() - request.created_at) * 1000),
            ),
            error_code=error.code if error else None,
            error_message=str(error) if error else None,
        )
        if error is None:
            # The inventory changed: tell the cluster before saying done, so a `corral models`
            # run right after the op already sees it.
            await self._heartbeat_once()
            await stream.done(result)
        else:
            await stream.error(error.code, str(error), self.config.name, result)
        return result

    async def _report_error(
        self, job_id: str, code: str, problem: str, *, attempt: int = 1, final: bool = True
    ) -> None:
        # Appended after whatever the job already streamed, so the client sees it in order.
        log_length = await self.redis.llen(names.job_log_key(job_id))
        stream = JobStream(self.scripts, job_id, self.settings.replay_ttl_s, first_seq=log_length)
        await stream.error(code, problem, self.config.name, None, attempt=attempt, final=final)


def _log_op_failure(future: Future[JobResult]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("model operation failed inside the worker", exc_info=future.exception())


def _text(data: bytes | str) -> str:
    return data.decode() if isinstance(data, bytes) else data
