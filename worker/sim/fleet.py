"""Many simulated node agents in one process, each speaking the real job protocol.

Every node has its own queue (``corral.node.<name>``), heartbeat and liveness key, instance id,
models, capacity and pace. One Celery worker consumes every node's queue with the real task
body (``worker.tasks.register_tasks``), which hands each job to the node its assignment names;
the job then runs through the real lease claim, ``run_job`` and replay log
(``worker.stream``), so the controller cannot tell the fleet from as many workers. What is
shared is only what the process owns: one asyncio loop, one Redis pool, one cancel listener.

``kill`` makes a node vanish as a crashed machine would: no more heartbeats, its running jobs
stop without writing another event, and jobs that reach it later are dropped unseen. Its
clients notice its liveness key expire and move its jobs on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

import redis.exceptions
from redis.asyncio import Redis

from broker import names
from broker.errors import BrokerUnavailable, CorralError
from broker.redis_clients import async_client
from broker.schemas import (
    JobAssignment,
    JobResult,
    ModelOpRequest,
    Timings,
    free_memory_bytes,
)
from broker.settings import CorralSettings, redacted_url
from worker.heartbeat import build_node_info, publish_node_info
from worker.jobs import JobControl, run_job
from worker.model_ops import run_model_op
from worker.sim.node import BACKEND_NAME, SimNode
from worker.sim.profiles import NodeProfile
from worker.stream import JobStream, StreamScripts

log = logging.getLogger(__name__)
T = TypeVar("T")

_RECENT_CANCELS_KEPT = 10_000
_RECONNECT_DELAY_S = 1.0
_REDIS_CONNECTIONS = 96


class SimFleet:
    """The fleet's shared loop, Redis pool and cancel listener, and its nodes.

    ``run``, ``report_malformed`` and ``report_failure`` are what the Celery task calls (from
    Celery's threads), as it calls a ``NodeRuntime``'s.
    """

    def __init__(self, settings: CorralSettings, profiles: Sequence[NodeProfile]) -> None:
        if not profiles:
            raise ValueError("a fleet needs at least one node")
        self.settings = settings
        self.nodes = {p.name: SimNode(p) for p in profiles}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sim-loop", daemon=True)
        self._redis: Redis | None = None
        self._scripts: StreamScripts | None = None
        self._background: list[asyncio.Task[None]] = []
        self._recent_cancels: OrderedDict[str, None] = OrderedDict()

    @property
    def capacity(self) -> int:
        return sum(node.profile.capacity for node in self.nodes.values())

    @property
    def queues(self) -> list[str]:
        return [names.node_queue(name) for name in self.nodes]

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect, publish every node's first heartbeat, start the loops."""
        self._thread.start()
        self._call(self._startup(), timeout=60)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        try:
            self._call(self._shutdown(), timeout=30)
        except (redis.exceptions.RedisError, OSError, TimeoutError) as exc:
            log.warning("clean shutdown incomplete: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def kill(self, name: str) -> bool:
        """Make ``name`` vanish as a crashed node does; False if there is no such node."""
        node = self.nodes.get(name)
        if node is None:
            return False
        self._loop.call_soon_threadsafe(self._kill, node)
        return True

    # --- what the Celery task calls ---------------------------------------------------------

    def run(self, assignment: JobAssignment) -> JobResult | None:
        return self._call(self._run(assignment), timeout=self.settings.job_timeout_s + 30)

    def report_malformed(self, job_id: str, problem: str) -> None:
        self._call(self._report_error(job_id, "malformed", problem, "sim"), timeout=10)

    def report_failure(self, assignment: JobAssignment, problem: str) -> None:
        node = self.nodes.get(assignment.node)
        if node is None or node.killed:
            return  # a dead node says nothing
        final = assignment.attempt >= assignment.spec.max_attempts
        try:
            self._call(
                self._report_error(
                    assignment.spec.job_id,
                    "worker_error",
                    problem,
                    node.name,
                    attempt=assignment.attempt,
                    final=final,
                ),
                timeout=5,
            )
        except (redis.exceptions.RedisError, TimeoutError, OSError) as exc:
            log.warning("could not report the failure of job %s: %s", assignment.spec.job_id, exc)

    def start_model_op(self, request: ModelOpRequest) -> None:
        """Start a pull / warm / unload / rm on the node the request names; return at once."""
        future = asyncio.run_coroutine_threadsafe(self._model_op(request), self._loop)
        future.add_done_callback(_log_op_failure)

    # --- inside the loop --------------------------------------------------------------------

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=timeout)

    @property
    def redis(self) -> Redis:
        assert self._redis is not None, "fleet not started"
        return self._redis

    @property
    def scripts(self) -> StreamScripts:
        assert self._scripts is not None, "fleet not started"
        return self._scripts

    async def _startup(self) -> None:
        url = self.settings.broker_url.get_secret_value()
        # One pool for the fleet, bounded: a beat or a job waits for a connection rather than
        # the fleet opening one per node.
        self._redis = async_client(
            self.settings,
            max_connections=_REDIS_CONNECTIONS,
            blocking_timeout_s=30,
            socket_connect_timeout=5,
            health_check_interval=30,
        )
        try:
            await self._redis.ping()
        except (redis.exceptions.RedisError, OSError) as exc:
            raise BrokerUnavailable(
                f"cannot use Redis at {redacted_url(url)}: {type(exc).__name__}"
            ) from None
        self._scripts = StreamScripts(self._redis)
        await self._scripts.preload()
        await asyncio.gather(*(self._heartbeat(node) for node in self.nodes.values()))
        rng = random.Random(len(self.nodes))  # noqa: S311 - spreads heartbeats, not a secret
        self._background = [
            asyncio.create_task(self._heartbeat_loop(node, rng.random()), name=node.name)
            for node in self.nodes.values()
        ]
        self._background.append(asyncio.create_task(self._cancel_listener(), name="cancels"))
        self._background.append(asyncio.create_task(self._control_listener(), name="control"))

    async def _shutdown(self) -> None:
        for node in self.nodes.values():
            for control in node.active.values():
                if control.task is not None:
                    control.task.cancel()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        # Every live node shows down at once (one round trip for the fleet).
        pipe = self.redis.pipeline(transaction=False)
        for node in self.nodes.values():
            if not node.killed:
                pipe.delete(names.node_alive_key(node.name))
        with contextlib.suppress(redis.exceptions.RedisError):
            await pipe.execute()
        await self.redis.aclose()

    async def _heartbeat(self, node: SimNode) -> None:
        info = await build_node_info(
            node.config,
            node.backends,
            instance=node.instance,
            in_flight=len(node.active),
            backend_in_flight={BACKEND_NAME: node.load.in_flight},
            backend_latency_ms=(
                {BACKEND_NAME: node.load.latency_ms} if node.load.latency_ms is not None else {}
            ),
            interval_s=self.settings.heartbeat_interval_s,
            started_at=node.started_at,
            system=node.probe,
            capacity=node.profile.capacity,
            backend_counters={BACKEND_NAME: node.load.counters(node.active.values())},
        )
        node.stored_inventory = await publish_node_info(
            self.redis, info, stored=node.stored_inventory
        )

    async def _heartbeat_loop(self, node: SimNode, phase: float) -> None:
        interval = self.settings.heartbeat_interval_s
        # Spread the fleet's beats over the interval, as independent machines' would be.
        await asyncio.sleep(phase * interval)
        while not node.killed:
            try:
                await self._heartbeat(node)
            except redis.exceptions.RedisError as exc:
                log.warning("node %s: heartbeat not sent: %s", node.name, exc)
            await asyncio.sleep(interval)

    async def _cancel_listener(self) -> None:
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

    async def _control_listener(self) -> None:
        """``{"kill": [node, ...]}`` on the sim's control channel (see ``corral sim --help``)."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(names.SIM_CONTROL_CHANNEL)
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            self._on_control(_text(message["data"]))
            except redis.exceptions.RedisError as exc:
                log.warning("control listener lost Redis (%s); reconnecting", exc)
                await asyncio.sleep(_RECONNECT_DELAY_S)

    def _on_control(self, data: str) -> None:
        try:
            command = json.loads(data)
            victims = command["kill"]
            if not isinstance(victims, list):
                raise TypeError("kill takes a list of node names")
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignored a control message that is not {'kill': [names]}: %s", exc)
            return
        for name in victims:
            node = self.nodes.get(str(name))
            if node is None:
                log.warning("no simulated node %r to kill", name)
            else:
                self._kill(node)

    def _kill(self, node: SimNode) -> None:
        if node.killed:
            return
        log.warning("node %s killed: no more heartbeats, its jobs stop silently", node.name)
        node.killed = True
        for control in node.active.values():
            if control.task is not None:
                control.task.cancel()

    def _cancel_local(self, job_id: str) -> None:
        self._recent_cancels[job_id] = None
        while len(self._recent_cancels) > _RECENT_CANCELS_KEPT:
            self._recent_cancels.popitem(last=False)
        for node in self.nodes.values():
            control = node.active.get(job_id)
            if control is not None and control.task is not None:
                control.cancel_requested = True
                control.task.cancel()

    async def _run(self, assignment: JobAssignment) -> JobResult | None:
        """The steps of ``NodeRuntime._run`` on the node the assignment names."""
        node = self.nodes.get(assignment.node)
        if node is None or node.killed:
            # A dead machine takes no job: its client sees the node expire and moves it on.
            return None
        job_id = assignment.spec.job_id
        control = JobControl(assignment, cancel_requested=job_id in self._recent_cancels)
        node.active[job_id] = control
        result: JobResult | None = None
        try:
            async with node.load.slots:
                if node.killed:
                    return None  # it waited for a slot while its node died
                node.load.in_flight += 1
                try:
                    result = await self._run_claimed(node, control)
                finally:
                    node.load.in_flight -= 1
                    node.load.job_ended(control, result)
            if result is not None and result.timings.first_token_ms:
                node.load.observe_first_token(result.timings.first_token_ms)
            return result
        except asyncio.CancelledError:
            if node.killed:
                return None
            raise
        finally:
            node.active.pop(job_id, None)

    async def _run_claimed(self, node: SimNode, control: JobControl) -> JobResult | None:
        assignment = control.assignment
        job_id = assignment.spec.job_id
        stream = JobStream(self.scripts, job_id, self.settings.replay_ttl_s)
        claim = stream.claim(
            attempt=assignment.attempt,
            claimer=node.instance,
            node=assignment.node,
            backend=assignment.backend,
            model=assignment.model,
            lease_ttl_s=int(self.settings.job_timeout_s) + self.settings.replay_ttl_s,
            tier=assignment.tier,
            reason=assignment.reason,
        )
        timeout = assignment.spec.first_token_timeout_s or self.settings.first_token_timeout_s
        task = asyncio.create_task(
            run_job(control, node.backends, stream, claim, first_token_timeout_s=timeout)
        )
        control.task = task
        try:
            return await task
        except asyncio.CancelledError:
            if control.cancel_requested and task.cancelled() and not node.killed:
                claim.close()
                await self._report_error(job_id, "cancelled", "job cancelled", node.name)
                return None
            raise

    async def _model_op(self, request: ModelOpRequest) -> None:
        """The steps of ``NodeRuntime._model_op`` on the node the request names."""
        node = self.nodes.get(request.node)
        if node is None or node.killed:
            return
        stream = JobStream(self.scripts, request.op_id, self.settings.replay_ttl_s)
        started_at = time.time()
        system = await node.probe.snapshot()
        free = free_memory_bytes(system.memory, system.gpus)
        error: CorralError | None = None
        try:
            summary = await run_model_op(request, node.backends, free, stream.progress)
        except CorralError as exc:
            summary, error = str(exc), exc
        result = JobResult(
            job_id=request.op_id,
            status="ok" if error is None else "error",
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
            # The inventory changed: tell the cluster before saying done.
            await self._heartbeat(node)
            await stream.done(result)
        else:
            await stream.error(error.code, str(error), node.name, result)

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
        log_length = await self.redis.llen(names.job_log_key(job_id))
        stream = JobStream(self.scripts, job_id, self.settings.replay_ttl_s, first_seq=log_length)
        await stream.error(code, problem, node_name, None, attempt=attempt, final=final)


def _log_op_failure(future: Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("model operation failed inside the fleet", exc_info=future.exception())


def _text(data: bytes | str) -> str:
    return data.decode() if isinstance(data, bytes) else data
