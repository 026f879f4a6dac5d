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
from collections.abc import Sequence

import redis.exceptions

from broker import names
from broker.schemas import JobAssignment, JobResult, ModelOpRequest
from broker.settings import CorralSettings
from worker.heartbeat import build_node_info, publish_node_info
from worker.loop_runtime import LoopRuntime
from worker.sim.node import BACKEND_NAME, SimNode
from worker.sim.profiles import NodeProfile

log = logging.getLogger(__name__)

MAX_THREADS = 128
"""Celery threads that carry jobs by default: each holds one running job. More than this many
jobs at once wait in their nodes' queues, as they would behind a busy machine."""


class SimFleet(LoopRuntime):
    """The fleet's shared loop, Redis pool and cancel listener, and its nodes.

    ``run``, ``report_malformed`` and ``report_failure`` are what the Celery task calls (from
    Celery's threads), as it calls a ``NodeRuntime``'s.
    """

    _startup_timeout_s = 60.0
    _shutdown_timeout_s = 30.0

    def __init__(
        self,
        settings: CorralSettings,
        profiles: Sequence[NodeProfile],
        *,
        threads: int | None = None,
    ) -> None:
        if not profiles:
            raise ValueError("a fleet needs at least one node")
        super().__init__(settings, thread_name="sim-loop")
        self.nodes = {p.name: SimNode(p) for p in profiles}
        self.threads = threads or min(self.capacity, MAX_THREADS)
        """Jobs running at once across the fleet: Celery's threads, each holding one job."""

    @property
    def capacity(self) -> int:
        return sum(node.profile.capacity for node in self.nodes.values())

    @property
    def queues(self) -> list[str]:
        return [names.node_queue(name) for name in self.nodes]

    def kill(self, name: str) -> bool:
        """Make ``name`` vanish as a crashed node does; False if there is no such node."""
        node = self.nodes.get(name)
        if node is None:
            return False
        self._loop.call_soon_threadsafe(self._kill, node)
        return True

    # --- what the Celery task calls ---------------------------------------------------------

    def run(self, assignment: JobAssignment) -> JobResult | None:
        node = self.nodes.get(assignment.node)
        if node is None or node.killed:
            # A dead machine takes no job: its client sees the node expire and moves it on.
            return None
        return self._call(
            self._run_job(
                assignment,
                active=node.active,
                load=node.load,
                backends=node.backends,
                claimer=node.instance,
                node_name=node.name,
                gone=lambda: node.killed,
            ),
            timeout=self.settings.job_timeout_s + 30,
        )

    def report_malformed(self, job_id: str, problem: str) -> None:
        self._call(self._report_error(job_id, "malformed", problem, "sim"), timeout=10)

    def report_failure(self, assignment: JobAssignment, problem: str) -> None:
        node = self.nodes.get(assignment.node)
        if node is None or node.killed:
            return  # a dead node says nothing
        self._report_failure_now(assignment, problem, node.name)

    # --- inside the loop --------------------------------------------------------------------

    async def _startup(self) -> None:
        # One pool for the fleet, sized to the jobs Celery runs at once, not to the nodes: a
        # beat waits for a connection rather than the fleet opening one per node.
        await self._connect(self.threads)
        await asyncio.gather(*(self._heartbeat(node) for node in self.nodes.values()))
        rng = random.Random(len(self.nodes))  # noqa: S311 - spreads heartbeats, not a secret
        self._background = [
            asyncio.create_task(self._heartbeat_loop(node, rng.random()), name=node.name)
            for node in self.nodes.values()
        ]
        self._background.append(
            asyncio.create_task(
                self._listen(names.CANCEL_CHANNEL, self._cancel_local), name="cancels"
            )
        )
        self._background.append(
            asyncio.create_task(
                self._listen(names.SIM_CONTROL_CHANNEL, self._on_control), name="control"
            )
        )

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
        self._remember_cancel(job_id)
        for node in self.nodes.values():
            control = node.active.get(job_id)
            if control is not None and control.task is not None:
                control.cancel_requested = True
                control.task.cancel()

    async def _model_op(self, request: ModelOpRequest) -> JobResult | None:
        node = self.nodes.get(request.node)
        if node is None or node.killed:
            return None
        return await self._run_model_op(
            request,
            backends=node.backends,
            probe=node.probe,
            node_name=node.name,
            heartbeat=lambda: self._heartbeat(node),
        )
