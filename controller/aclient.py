"""The controller's Python API for asyncio: route and submit a job, follow it, cancel it.

``AsyncCorralClient`` has ``CorralClient``'s job surface (``submit``, ``stream``, ``attach``,
``cancel``, ``nodes``, ``cluster``, ``choose``) over ``redis.asyncio``. Both clients share what
they decide (``controller.dispatch``, ``controller.run_core``, ``controller.stream_core``), so
a job moves, fails and streams the same way whichever one sent it. Every followed job shares
one pub/sub connection (``controller.job_channels``): thousands of streams in one event loop
cost a queue each, not a socket or a thread.

Jobs are published on the loop: Celery builds each message as ``send_task`` would, and one
bounded await writes it on the client's own Redis connection (``controller.apublisher``), so a
slow broker never stalls the loop and no thread hop sits on the path to the first token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import redis.exceptions
from celery import Celery
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from broker import names
from broker.celery_app import make_celery_app
from broker.errors import BrokerUnavailable, JobError, NoNodeAvailable, UnknownModel
from broker.redis_clients import async_client
from broker.schemas import AnyStreamEvent, ChatMessage, JobResult, JobSpec, Priority
from broker.settings import CorralSettings
from controller.acluster import AsyncClusterReader, preload_scripts_async
from controller.ajobrun import AsyncJobRun
from controller.apublisher import AsyncPublisher
from controller.areader import AsyncJobStreamReader
from controller.breaker import AsyncBreakers, BreakerPhase
from controller.client import with_history
from controller.cluster import ClusterView
from controller.config_watch import ConfigWatch
from controller.dispatch import (
    NO_PROBE_PERMIT,
    RATE_LIMIT_CODES,
    WRITES_REFUSED,
    breaker_hold,
    breaker_phases,
    failure_target,
    full_broker_reason,
    half_open_targets,
    job_task,
    preferred_candidates,
    refused_write,
    success_targets,
    unreachable,
    with_inferred_provider,
    with_reason,
    with_sent,
)
from controller.embedding import EmbedOutcome, make_embed_spec
from controller.job_channels import JobChannels
from controller.limits import check_prompt_size
from controller.router import Candidate, NodeState, routing_aliases
from controller.run_core import Attempt
from controller.sessions import AsyncSessionStore
from controller.stream_control import AsyncStreamControl
from controller.task_envelope import ProducerCall
from controller.tracing import NO_TRACING, JobTrace, Tracing

Event = AnyStreamEvent

_CONNECTION_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
_SUBSCRIBE_CONFIRM_S = 5.0

log = logging.getLogger(__name__)


class AsyncCorralClient:
    """One per event loop; use ``async with`` (or ``await aclose()``).

    ``redis``: an asyncio client to share (tests, a server's pool); it stays open on
    ``aclose``. Without one, the client makes its own from ``settings.broker_url`` and closes
    it, with at most ``max_connections`` connections (one of them carries every followed
    job's messages). Jobs are published on that client's connections, on the loop; Celery's
    own producer (which connects by ``settings.broker_url``) sends only Celery's task-sent
    events (``task_events``), from ``send_threads`` threads (one at least) off the loop.
    ``config``: a hot-reloaded configuration (``controller.config_watch``); ``settings`` then
    follows its ``current()``, so each job is routed by the settings in force when it is sent.
    ``tracing``: OpenTelemetry spans per job (``controller.tracing``); none by default.
    """

    @property
    def settings(self) -> CorralSettings:
        return self.config.current() if self.config is not None else self._settings

    def __init__(
        self,
        settings: CorralSettings,
        redis: AsyncRedis | None = None,
        *,
        send_threads: int = 2,
        max_connections: int = 32,
        config: ConfigWatch | None = None,
        tracing: Tracing = NO_TRACING,
    ) -> None:
        self._settings = settings
        self.config = config
        self.tracing = tracing
        url = settings.broker_url.get_secret_value()
        self._url = url
        self._owns_redis = redis is None
        if redis is None:
            # A burst of jobs waits for a pooled connection rather than opening one per job.
            # After a Redis restart each pooled connection fails its next command once
            # ("closed by server", nothing executed): one immediate retry on a fresh one.
            redis = async_client(
                settings,
                max_connections=max_connections,
                blocking_timeout_s=20,
                socket_connect_timeout=5,
                retry=Retry(NoBackoff(), 1),
                retry_on_error=[_CONNECTION_ERRORS[0]],  # ConnectionError (`redis` is shadowed)
            )
        self.redis = redis
        self.app: Celery = make_celery_app(settings)
        self._publisher = AsyncPublisher(self.app, self.redis, url)
        self.breakers = AsyncBreakers(
            self.redis,
            threshold=settings.breaker_threshold,
            cooldown_s=settings.breaker_cooldown_s,
        )
        self.control = AsyncStreamControl(self.redis, settings.replay_ttl_s)
        self.sessions = AsyncSessionStore(self.redis, settings.session_ttl_s)
        self._channels: JobChannels | None = None
        self._send_threads = max(1, send_threads)
        self._sender: ThreadPoolExecutor | None = None  # made for the first Celery event
        self._view: tuple[float, ClusterView] | None = None
        self._view_lock: asyncio.Lock | None = None
        self._scripts_loaded = False
        self._cluster_reader = AsyncClusterReader()
        self._sent_since_read: Counter[str] = Counter()

    async def aclose(self) -> None:
        if self._channels is not None:
            await self._channels.aclose()
        if self._sender is not None:
            self._sender.shutdown(wait=False)
        if self._owns_redis:
            await self.redis.aclose()
        self.app.close()

    async def __aenter__(self) -> AsyncCorralClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def following(self) -> int:
        """How many job streams this client is following now."""
        return 0 if self._channels is None else len(self._channels)

    # --- the cluster ---------------------------------------------------------------------

    async def cluster(self, max_age_s: float = 0.0) -> ClusterView:
        """Nodes and breakers as Redis has them; a view up to ``max_age_s`` old may be reused.

        Concurrent callers share one read: a burst of jobs costs one round trip, not one each.
        """
        if self._view_lock is None:
            self._view_lock = asyncio.Lock()
        async with self._view_lock:
            now = time.monotonic()
            if self._view is not None and now - self._view[0] <= max_age_s:
                return self._view[1]
            try:
                if not self._scripts_loaded:
                    await preload_scripts_async(self.redis)
                    self._scripts_loaded = True
                view = await self._cluster_reader.read(self.redis)
            except _CONNECTION_ERRORS as exc:
                raise unreachable(exc, self._url) from None
            self._view = (now, view)
            self._sent_since_read.clear()
            return view

    async def nodes(self, max_age_s: float = 0.0) -> list[NodeState]:
        return list((await self.cluster(max_age_s)).nodes)

    def breaker_phases(self, view: ClusterView) -> dict[str, BreakerPhase]:
        return breaker_phases(view, self.settings.breaker_cooldown_s)

    async def choose(
        self,
        spec: JobSpec,
        *,
        avoid: set[str] | None = None,
        never: set[str] | None = None,
        sticky_node: str | None = None,
        fresh: bool = False,
    ) -> Candidate:
        """The best candidate for ``spec`` (see ``CorralClient.choose``)."""
        view = await self.cluster(max_age_s=0.0 if fresh else self.settings.route_cache_s)
        view = with_sent(view, Counter(self._sent_since_read))
        phases = self.breaker_phases(view)
        aliases = routing_aliases(self.settings.aliases, self.settings.priority)
        preferred = preferred_candidates(
            spec,
            view,
            phases,
            aliases=aliases,
            avoid=avoid,
            never=never,
            sticky_node=sticky_node,
            limits=self.settings.limits,
        )
        for candidate in preferred:
            if await self._probe_permits(half_open_targets(candidate, phases)):
                return with_reason(spec, candidate, view, phases, aliases=aliases, never=never)
        raise NoNodeAvailable(NO_PROBE_PERMIT)

    async def _probe_permits(self, targets: list[str]) -> bool:
        """Every half-open target's probe permit, stopping at the first one refused."""
        for target in targets:
            if not await self.breakers.try_probe(target):
                return False
        return True

    async def _choose_first(self, spec: JobSpec, sticky: str | None) -> tuple[JobSpec, Candidate]:
        """See ``CorralClient._choose_first``."""
        try:
            return spec, await self.choose(spec, sticky_node=sticky)
        except UnknownModel:
            inferred = with_inferred_provider(
                spec, self.settings.aliases, self.settings.provider_urls
            )
            if inferred is None:
                raise
        return inferred, await self.choose(inferred, sticky_node=sticky)

    # --- jobs ------------------------------------------------------------------------------

    async def submit(self, spec: JobSpec) -> AsyncJobRun:
        """Route ``spec``, subscribe to its stream, then send it to the chosen node's queue.

        Raises a RoutingError when nothing can serve it, and RequestTooLarge for a prompt over
        ``max_prompt_bytes`` (nothing is sent then).
        """
        trace = self.tracing.job(spec)
        try:
            return await self._submit(spec, trace)
        except BaseException as exc:
            trace.failed(exc)
            raise

    async def _submit(self, spec: JobSpec, trace: JobTrace) -> AsyncJobRun:
        sticky: str | None = None
        if spec.session is not None:
            session = await self.sessions.load(spec.session)
            sticky = session.node
            spec = with_history(session.messages, spec)
        check_prompt_size(spec, self.settings.max_prompt_bytes)
        with trace.phase("route"):
            try:
                spec, candidate = await self._choose_first(spec, sticky)
            except NoNodeAvailable:
                await self._raise_if_full()
                raise
        trace.routed(candidate)
        with trace.phase("send"):
            reader = await self._start_subscription(spec.job_id, candidate.node)
            try:
                await self._send(spec, candidate, attempt=1)
                await self._await_subscription(reader)
            except BaseException as exc:
                await reader.aclose()
                if isinstance(exc, WRITES_REFUSED):
                    raise refused_write(exc) from None
                raise
        trace.sent()
        reader.cursor.instance = candidate.instance or None
        reader.cursor.has_record = True  # the send writes it
        reader.cursor.live_from_first = True
        return AsyncJobRun(
            spec=spec,
            reader=reader,
            control=self.control,
            hooks=_AsyncClientHooks(self),
            attempt=Attempt(1, candidate),
            trace=trace,
        )

    async def stream(self, spec: JobSpec) -> AsyncIterator[Event]:
        """Submit and follow: the simple form of the API."""
        run = await self.submit(spec)
        async for event in run.events(self.settings.job_timeout_s):
            yield event

    async def embed(
        self,
        inputs: Sequence[str],
        *,
        model: str | None = None,
        node: str | None = None,
        tags: frozenset[str] = frozenset(),
        priority: Priority = "interactive",
    ) -> JobResult:
        """One vector per text (see ``CorralClient.embed``)."""
        spec = make_embed_spec(inputs, model=model, node=node, tags=tags, priority=priority)
        return await self.run_embed(spec)

    async def run_embed(self, spec: JobSpec) -> JobResult:
        """Run an embed job made with ``controller.embedding.make_embed_spec``."""
        outcome = EmbedOutcome(spec.job_id)
        async for event in self.stream(spec):
            outcome.see(event)
        return outcome.result()

    async def attach(self, job_id: str) -> AsyncJobStreamReader:
        """Follow a running or finished job from its first event."""
        node = await self.job_node(job_id)
        if node is None and not await self.redis.exists(names.job_log_key(job_id)):
            raise JobError(f"no job {job_id} (unknown, or older than the replay window)")
        reader = await self._start_subscription(job_id, node)
        await self._await_subscription(reader)
        return reader

    async def cancel(self, job_id: str) -> bool:
        """Stop a job (see ``CorralClient.cancel``). False if the job is unknown."""
        node = await self.job_node(job_id)
        await self.control.cancel(job_id, node)
        return node is not None

    async def job_node(self, job_id: str) -> str | None:
        node = await self.redis.get(names.job_node_key(job_id))
        return node.decode() if isinstance(node, bytes) else None

    async def _raise_if_full(self) -> None:
        """A full Redis refuses heartbeats too, so every node looks down: say so instead."""
        try:
            reason = full_broker_reason(await self.redis.info("memory"))
        except redis.exceptions.RedisError:  # INFO may be denied (a least-privilege user)
            return
        if reason is not None:
            raise BrokerUnavailable(reason)

    async def _send(self, spec: JobSpec, candidate: Candidate, attempt: int) -> None:
        task = job_task(spec, candidate, attempt)
        envelope = self._publisher.builder.build(task.name, **task.kwargs)
        # The job's node record (attach and cancel read it) is written with the message.
        await self._publisher.publish(
            envelope,
            node_key=names.job_node_key(spec.job_id),
            node=candidate.node,
            ttl_s=self.settings.replay_ttl_s,
            redis_now=self._redis_now,
        )
        self._sent_since_read[candidate.node] += 1
        if envelope.other_calls:
            self._publish_off_loop(envelope.other_calls)

    def _redis_now(self) -> float:
        """Redis's clock (its TIME) now, from the last cluster view's reading of it."""
        if self._view is None:
            return time.time()
        read_at, view = self._view
        return view.redis_time + (time.monotonic() - read_at)

    def _publish_off_loop(self, calls: list[ProducerCall]) -> None:
        """Celery's task-sent events, by kombu's producer (it routes them by the event
        exchange's bindings) in a send thread: they follow the job, never hold it up."""
        if self._sender is None:
            self._sender = ThreadPoolExecutor(self._send_threads, thread_name_prefix="corral-send")
        self._sender.submit(self._publish_calls, calls)

    def _publish_calls(self, calls: list[ProducerCall]) -> None:
        try:
            with self.app.producer_or_acquire() as producer:
                for call in calls:
                    producer.publish(call.body, **call.kwargs)
        except Exception:
            log.warning("a Celery task event was not sent", exc_info=True)

    async def _start_subscription(self, job_id: str, node: str | None) -> AsyncJobStreamReader:
        """Send SUBSCRIBE without waiting for Redis's answer (see ``CorralClient.submit``)."""
        if self._channels is None:
            self._channels = JobChannels(self.redis)
        try:
            inbox = await self._channels.subscribe(names.job_channel(job_id))
        except _CONNECTION_ERRORS as exc:
            raise unreachable(exc, self._url) from None
        return AsyncJobStreamReader(self.redis, self._channels, inbox, job_id, node)

    async def _await_subscription(self, reader: AsyncJobStreamReader) -> None:
        if reader.inbox.confirmed.done():
            return  # (usually: Redis confirmed it while the job was being published)
        try:
            await asyncio.wait_for(asyncio.shield(reader.inbox.confirmed), _SUBSCRIBE_CONFIRM_S)
        except TimeoutError:
            await reader.aclose()
            raise BrokerUnavailable(
                "Redis did not confirm the subscription to the job stream"
            ) from None


class _AsyncClientHooks:
    """An AsyncJobRun's view of its client: routing, sending, breakers and sessions."""

    def __init__(self, client: AsyncCorralClient) -> None:
        self._client = client

    async def next_candidate(self, spec: JobSpec, *, avoid: set[str], never: set[str]) -> Candidate:
        return await self._client.choose(spec, avoid=avoid, never=never, fresh=True)

    async def send(self, spec: JobSpec, candidate: Candidate, attempt: int) -> None:
        await self._client._send(spec, candidate, attempt)

    async def attempt_succeeded(self, candidate: Candidate) -> None:
        view = await self._client.cluster(max_age_s=self._client.settings.route_cache_s)
        for target in success_targets(candidate, view):
            await self._client.breakers.record_success(target)

    async def attempt_failed(
        self, candidate: Candidate, code: str, retry_after: float | None = None
    ) -> None:
        target = failure_target(candidate, code)
        hold = breaker_hold(code, retry_after, self._client.settings.quota_cooldown_s)
        if hold is not None:
            await self._client.breakers.hold(target, *hold)
        else:
            await self._client.breakers.record_failure(target, open_now=code in RATE_LIMIT_CODES)

    async def finished(self, spec: JobSpec, result_text: str, candidate: Candidate) -> None:
        if spec.session is None:
            return
        reply = ChatMessage(role="assistant", content=result_text)
        await self._client.sessions.save(spec.session, candidate.node, (*spec.messages, reply))
