"""The async side every job host shares: one loop thread, one Redis pool, the job steps.

A node's ``NodeRuntime`` and a simulated fleet's ``SimFleet`` both run their jobs the same way:
Celery's threads call in, the work happens on one asyncio loop in a background thread that owns
the Redis pool (warm between jobs, and a cancel can stop a job by cancelling its task, which
closes the backend's HTTP stream). What differs is who the jobs belong to: the node itself, or
the simulated node an assignment names. So the steps here take the node's parts as arguments.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping, MutableMapping
from concurrent.futures import Future
from typing import Any, Literal, TypeVar

import redis.exceptions
from redis.asyncio import Redis

from broker import names
from broker.catalog import Catalog
from broker.errors import BackendRateLimited, BrokerUnavailable, CorralError
from broker.redis_clients import async_client, decoded
from broker.schemas import JobAssignment, JobResult, ModelOpRequest, Timings, free_memory_bytes
from broker.settings import CorralSettings, redacted_url
from worker.backend_load import BackendLoad
from worker.backends.base import Backend
from worker.jobs import JobControl, run_job
from worker.limiter import Admission
from worker.stream import JobStream, StreamScripts
from worker.sysinfo import SystemProbe

log = logging.getLogger(__name__)
T = TypeVar("T")

_RECONNECT_DELAY_S = 1.0
_RECENT_CANCELS_KEPT = 10_000
REDIS_RESERVE = 8
"""Redis connections beyond one per job slot: the heartbeat, the cancel (and control) listener's
subscription, model operations. Past the pool's size a command waits for a connection."""


def _never() -> bool:
    return False


class LoopRuntime:
    """One asyncio loop in a thread, its Redis pool and scripts, and the steps of a job.

    Subclasses write ``_startup`` (calling ``_connect`` first) and ``_shutdown``, and decide
    which node's parts a job or a model operation runs with.
    """

    _startup_timeout_s = 30.0
    _shutdown_timeout_s = 10.0

    def __init__(self, settings: CorralSettings, *, thread_name: str) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=thread_name, daemon=True
        )
        self._redis: Redis | None = None
        self._scripts: StreamScripts | None = None
        self._background: list[asyncio.Task[None]] = []
        self._recent_cancels: OrderedDict[str, None] = OrderedDict()
        self.catalog: Catalog | None = None
        """The capability and price tables a node prices jobs and maps efforts with."""

    # --- life cycle (called from the main thread) ------------------------------------------

    def start(self) -> None:
        """Connect, check the broker answers, publish the first heartbeat(s), start the loops.

        Raises BrokerUnavailable with a message that names the broker without its password.
        """
        self._thread.start()
        self._call(self._startup(), timeout=self._startup_timeout_s)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self._shutdown(), timeout=self._shutdown_timeout_s)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            # On the way out: a node still expires from the cluster within three heartbeats.
            log.warning("clean shutdown incomplete: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def start_model_op(self, request: ModelOpRequest) -> None:
        """Start a pull / warm / unload / rm on the loop and return at once.

        A pull can take many minutes: holding one of Celery's slots for it would stop the
        node's jobs meanwhile. Progress and the outcome go to the op's stream.
        """
        future = asyncio.run_coroutine_threadsafe(self._model_op(request), self._loop)
        future.add_done_callback(_log_op_failure)

    # --- what subclasses write ---------------------------------------------------------------

    async def _startup(self) -> None:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        raise NotImplementedError

    async def _model_op(self, request: ModelOpRequest) -> JobResult | None:
        raise NotImplementedError

    # What a node adds around a job (a simulated fleet needs none of it).

    def _job_backends(
        self, assignment: JobAssignment, backends: Mapping[str, Backend]
    ) -> tuple[Mapping[str, Backend], str | None]:
        """The backends the job may use, and why its backend is missing if it is."""
        return backends, None

    async def _admit(
        self, assignment: JobAssignment, backends: Mapping[str, Backend]
    ) -> tuple[Admission | None, BackendRateLimited | None]:
        """Count the call against the configured rate limits before the backend is asked."""
        return None, None

    async def _settle(self, admission: Admission, result: JobResult | None) -> None:
        """Correct the admitted call's count with what it really used."""

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

    async def _connect(self, job_slots: int) -> None:
        """Open the pool, check Redis answers us, load the stream scripts."""
        url = self.settings.broker_url.get_secret_value()
        # A blocking pool: past its size a command waits (up to 30 s) for a connection instead
        # of failing at once (redis-py's default pool raised MaxConnectionsError at 100, and a
        # job whose claim failed was lost). A running job holds at most one connection at a
        # time, so one per slot plus the reserve never makes a job wait.
        self._redis = async_client(
            self.settings,
            max_connections=job_slots + REDIS_RESERVE,
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

    def _resize_pool(self, job_slots: int) -> None:
        """Grow the pool when the slots are known only after connecting (llama.cpp's)."""
        pool = self.redis.connection_pool
        pool.max_connections = max(pool.max_connections, job_slots + REDIS_RESERVE)

    async def _listen(self, channel: str, handle: Callable[[str], None]) -> None:
        """Hand each message on ``channel`` to ``handle``; reconnects on its own."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(channel)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            handle(decoded(message["data"]))
            except redis.exceptions.RedisError as exc:
                log.warning("listener on %s lost Redis (%s); reconnecting", channel, exc)
                await asyncio.sleep(_RECONNECT_DELAY_S)

    def _remember_cancel(self, job_id: str) -> None:
        # Remembered even when the job is not running here yet: if it is waiting in a
        # node's queue, it is skipped without a backend request when it comes up.
        self._recent_cancels[job_id] = None
        while len(self._recent_cancels) > _RECENT_CANCELS_KEPT:
            self._recent_cancels.popitem(last=False)

    async def _run_job(
        self,
        assignment: JobAssignment,
        *,
        active: MutableMapping[str, JobControl],
        load: BackendLoad | None,
        backends: Mapping[str, Backend],
        claimer: str,
        node_name: str,
        gone: Callable[[], bool] = _never,
    ) -> JobResult | None:
        """Run a job in one of its backend's slots; None when this copy must not run.

        ``gone`` says the node died meanwhile (a simulated crash): its job then ends unseen.
        """
        job_id = assignment.spec.job_id
        # Registered before the claim, so a cancel arriving in between is not lost.
        control = JobControl(assignment, cancel_requested=job_id in self._recent_cancels)
        active[job_id] = control
        result: JobResult | None = None
        try:
            if load is not None:
                await load.slots.acquire()
            try:
                if gone():
                    return None  # it waited for a slot while its node died
                if load is not None:
                    load.in_flight += 1
                try:
                    result = await self._run_claimed(control, backends, claimer, node_name, gone)
                finally:
                    if load is not None:
                        load.in_flight -= 1
                        load.job_ended(control, result)
            finally:
                if load is not None:
                    load.slots.release()
            if result is not None and load is not None and result.timings.first_token_ms:
                load.observe_first_token(result.timings.first_token_ms)
            return result
        except asyncio.CancelledError:
            if gone():
                return None
            raise
        finally:
            active.pop(job_id, None)

    async def _run_claimed(
        self,
        control: JobControl,
        backends: Mapping[str, Backend],
        claimer: str,
        node_name: str,
        gone: Callable[[], bool],
    ) -> JobResult | None:
        assignment = control.assignment
        job_id = assignment.spec.job_id
        stream = JobStream(self.scripts, job_id, self.settings.replay_ttl_s)
        claim = stream.claim(
            attempt=assignment.attempt,
            claimer=claimer,
            node=assignment.node,
            backend=assignment.backend,
            model=assignment.model,
            lease_ttl_s=int(self.settings.job_timeout_s) + self.settings.replay_ttl_s,
            tier=assignment.tier,
            reason=assignment.reason,
        )
        timeout = assignment.spec.first_token_timeout_s or self.settings.first_token_timeout_s
        backends, missing = self._job_backends(assignment, backends)
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
            if admission is not None:
                await self._settle(admission, result)
        except asyncio.CancelledError:
            # Cancelled before its first step ran: run_job never saw it, so report here.
            if control.cancel_requested and task.cancelled() and not gone():
                claim.close()  # never started: nothing to undo
                await self._report_error(job_id, "cancelled", "job cancelled", node_name)
                return None
            raise
        if result is None:
            log.warning(
                "job %s attempt %d: another delivery or attempt owns it; no more from here",
                job_id,
                assignment.attempt,
            )
        return result

    async def _run_model_op(
        self,
        request: ModelOpRequest,
        *,
        backends: Mapping[str, Backend],
        probe: SystemProbe,
        node_name: str,
        heartbeat: Callable[[], Awaitable[None]],
    ) -> JobResult:
        stream = JobStream(self.scripts, request.op_id, self.settings.replay_ttl_s)
        started_at = time.time()
        system = await probe.snapshot()
        free = free_memory_bytes(system.memory, system.gpus)
        # Imported on the first model operation (pull, warm, unload, rm), not with the node.
        from worker.model_ops import run_model_op  # noqa: PLC0415

        try:
            summary = await run_model_op(request, backends, free, stream.progress)
            status: Literal["ok", "error"] = "ok"
            error: CorralError | None = None
        except CorralError as exc:
            summary, status, error = str(exc), "error", exc
        result = JobResult(
            job_id=request.op_id,
            status=status,
            node=request.node,
            backend=request.backend or "-",
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
            await heartbeat()
            await stream.done(result)
        else:
            await stream.error(error.code, str(error), node_name, result)
        return result

    async def _report_error(
        self,
        job_id: str,
        code: str,
        problem: str,
        node_name: str,
        *,
        attempt: int = 1,
        final: bool = True,
    ) -> None:
        # Appended after whatever the job already streamed, so the client sees it in order.
        log_length = await self.redis.llen(names.job_log_key(job_id))
        stream = JobStream(self.scripts, job_id, self.settings.replay_ttl_s, first_seq=log_length)
        await stream.error(code, problem, node_name, None, attempt=attempt, final=final)

    def _report_failure_now(self, assignment: JobAssignment, problem: str, node_name: str) -> None:
        """Best effort, from Celery's thread: end the attempt with an error after an
        unexpected failure; the controller may move the job on while it has attempts left."""
        job_id = assignment.spec.job_id
        final = assignment.attempt >= assignment.spec.max_attempts
        try:
            self._call(
                self._report_error(
                    job_id,
                    "worker_error",
                    problem,
                    node_name,
                    attempt=assignment.attempt,
                    final=final,
                ),
                timeout=5,
            )
        except (redis.exceptions.RedisError, TimeoutError, OSError) as exc:
            log.warning("could not report the failure of job %s: %s", job_id, exc)


def _log_op_failure(future: Future[JobResult | None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("model operation failed inside the worker", exc_info=future.exception())


__all__ = ["REDIS_RESERVE", "LoopRuntime"]
