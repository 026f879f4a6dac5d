"""The controller's Python API: route and submit a job, follow its stream, cancel it.

A submitted job is a ``JobRun``: iterating its events follows the stream (lossless, see
``controller.reader``) and moves the job to the next node when an attempt fails before its
first token (see ``controller.jobrun``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import redis.exceptions
from celery import Celery
from pydantic import ValidationError
from redis import ConnectionPool, Redis
from redis.client import PubSub

from broker import names
from broker.celery_app import make_celery_app
from broker.durations import keep_alive_seconds
from broker.errors import (
    BrokerUnavailable,
    ConfigError,
    JobError,
    ModelTooLarge,
    NoNodeAvailable,
    UnknownModel,
    UnknownNode,
    UnsupportedOperation,
)
from broker.redis_clients import sync_client
from broker.schemas import (
    AnyStreamEvent,
    ChatMessage,
    GenerationOptions,
    JobResult,
    JobSpec,
    ModelOpKind,
    ModelOpRequest,
    Priority,
    describe_validation_error,
)
from broker.settings import CorralSettings
from broker.sizing import fit_problem
from controller.breaker import BreakerPhase, Breakers
from controller.cluster import ClusterReader, ClusterView, preload_scripts
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
from controller.jobrun import Attempt, JobRun
from controller.limits import check_prompt_size
from controller.publisher import HeldPublisher
from controller.reader import JobStreamReader
from controller.router import Candidate, NodeState, routing_aliases
from controller.sessions import SessionStore
from controller.stream_control import StreamControl
from controller.tracing import NO_TRACING, JobTrace, Tracing

Event = AnyStreamEvent

_IDLE_PUBSUBS_KEPT = 4


def new_job_id() -> str:
    return uuid.uuid4().hex


def make_spec(
    prompt: str,
    *,
    node: str | None = None,
    model: str | None = None,
    route: str | None = None,
    route_url: str | None = None,
    tags: frozenset[str] = frozenset(),
    system: str | None = None,
    options: GenerationOptions | None = None,
    priority: Priority = "interactive",
    session: str | None = None,
    retry_partial: bool = False,
    max_attempts: int = 3,
    first_token_timeout_s: float | None = None,
) -> JobSpec:
    try:
        messages = [ChatMessage(role="system", content=system)] if system else []
        messages.append(ChatMessage(role="user", content=prompt))
        return JobSpec(
            job_id=new_job_id(),
            messages=tuple(messages),
            node=node,
            model=model,
            route=route,
            route_url=route_url,
            tags=tags,
            priority=priority,
            session=session,
            options=options or GenerationOptions(),
            created_at=time.time(),
            retry_partial=retry_partial,
            max_attempts=max_attempts,
            first_token_timeout_s=first_token_timeout_s,
        )
    except ValidationError as exc:
        # A bad flag (an empty --model, a long --session): say which, without the prompt.
        raise ConfigError(f"invalid job: {describe_validation_error(exc)}") from None


def with_history(history: tuple[ChatMessage, ...], spec: JobSpec) -> JobSpec:
    """``spec`` continuing a conversation: its own system prompt, if any, replaces the old."""
    if not history:
        return spec
    new_system = [m for m in spec.messages if m.role == "system"]
    kept = [m for m in history if not (new_system and m.role == "system")]
    rest = [m for m in spec.messages if m.role != "system"]
    return spec.model_copy(update={"messages": (*new_system, *kept, *rest)})


class CorralClient:
    """One per process; holds a Redis connection pool and a Celery producer pool.

    Thread-safe for submitting and following jobs from several threads (``ask --fanout``).
    ``redis``: a client to share (tests, a server's pool); it stays open on ``close``. Without
    one, the client makes its own from ``settings.broker_url`` and closes it. Celery's
    producer always connects by ``settings.broker_url``. For asyncio, see
    ``controller.aclient.AsyncCorralClient``.

    Commands share at most 64 connections (a thread waits for one when all are busy). Each
    followed job holds a connection of its own (its thread blocks on it), from a pool of at
    most ``max_streams`` kept apart from the commands' pool: a few hundred streams never
    starve routing and sending of connections.
    """

    @property
    def settings(self) -> CorralSettings:
        """The settings in force: ``config.current()`` when hot-reloaded (``config_watch``)."""
        return self.config.current() if self.config is not None else self._settings

    def __init__(
        self,
        settings: CorralSettings,
        redis: Redis | None = None,
        *,
        max_streams: int = 1024,
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
            # Threads beyond the pool's size wait for a connection instead of failing.
            redis = sync_client(
                settings, max_connections=64, blocking_timeout_s=20, socket_connect_timeout=5
            )
        self.redis = redis
        commands = self.redis.connection_pool
        self.max_streams = max_streams
        self._streams = Redis.from_pool(
            ConnectionPool(
                connection_class=commands.connection_class,
                max_connections=max_streams,
                **commands.connection_kwargs,
            )
        )
        self.app: Celery = make_celery_app(settings)
        self._publisher = HeldPublisher(self.app)
        self.breakers = Breakers(
            self.redis,
            threshold=settings.breaker_threshold,
            cooldown_s=settings.breaker_cooldown_s,
        )
        self.control = StreamControl(self.redis, settings.replay_ttl_s)
        self.sessions = SessionStore(self.redis, settings.session_ttl_s)
        self._scripts_loaded = False
        self._idle_pubsubs: list[PubSub] = []
        self._lock = threading.Lock()
        self._view: tuple[float, ClusterView] | None = None
        self._cluster_reader = ClusterReader()
        self._sent_since_read: Counter[str] = Counter()

    def close(self) -> None:
        with self._lock:
            idle, self._idle_pubsubs = self._idle_pubsubs, []
        for pubsub in idle:
            pubsub.close()
        self._streams.close()
        if self._owns_redis:
            self.redis.close()
        self._publisher.close()
        self.app.close()

    def __enter__(self) -> CorralClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the cluster ---------------------------------------------------------------------

    def cluster(self, max_age_s: float = 0.0) -> ClusterView:
        """Nodes and breakers as Redis has them; a view up to ``max_age_s`` old may be reused."""
        now = time.monotonic()
        with self._lock:
            if self._view is not None and now - self._view[0] <= max_age_s:
                return self._view[1]
        try:
            if not self._scripts_loaded:
                preload_scripts(self.redis)
                StreamControl.preload_into(self.redis)
                self._scripts_loaded = True
            view = self._cluster_reader.read(self.redis)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            # AuthenticationError is a ConnectionError: a refused password lands here too.
            raise unreachable(exc, self._url) from None
        with self._lock:
            self._view = (now, view)
            self._sent_since_read.clear()
        return view

    def nodes(self, max_age_s: float = 0.0) -> list[NodeState]:
        return list(self.cluster(max_age_s).nodes)

    def breaker_phases(self, view: ClusterView) -> dict[str, BreakerPhase]:
        """Every breaker that is not closed, by target."""
        return breaker_phases(view, self.settings.breaker_cooldown_s)

    def _routing_view(self, fresh: bool = False) -> ClusterView:
        """The cluster the router sees: reused for up to ``route_cache_s``, with the jobs this
        client has sent since it was read counted as queued, so a burst still spreads out."""
        view = self.cluster(max_age_s=0.0 if fresh else self.settings.route_cache_s)
        with self._lock:
            sent = Counter(self._sent_since_read)
        return with_sent(view, sent)

    def choose(
        self,
        spec: JobSpec,
        *,
        avoid: set[str] | None = None,
        never: set[str] | None = None,
        sticky_node: str | None = None,
        fresh: bool = False,
    ) -> Candidate:
        """The best candidate for ``spec``; RoutingError when there is none.

        Open breakers keep their targets out; a half-open one is tried by one job at a time
        (whoever takes its probe permit). ``never`` holds ``node/backend`` targets that are
        out; ``avoid`` those used only when nothing else is left.
        """
        view = self._routing_view(fresh)
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
            if all(self.breakers.try_probe(t) for t in half_open_targets(candidate, phases)):
                return with_reason(spec, candidate, view, phases, aliases=aliases, never=never)
        raise NoNodeAvailable(NO_PROBE_PERMIT)

    def _choose_first(self, spec: JobSpec, sticky: str | None) -> tuple[JobSpec, Candidate]:
        """The first candidate, and the spec as sent: a bare cloud model no node holds goes
        to its provider (``with_inferred_provider``)."""
        try:
            return spec, self.choose(spec, sticky_node=sticky)
        except UnknownModel:
            inferred = with_inferred_provider(
                spec, self.settings.aliases, self.settings.provider_urls
            )
            if inferred is None:
                raise
        return inferred, self.choose(inferred, sticky_node=sticky)

    # --- jobs ------------------------------------------------------------------------------

    def submit(self, spec: JobSpec) -> JobRun:
        """Route ``spec``, subscribe to its stream, then send it to the chosen node's queue.

        Raises a RoutingError when nothing can serve it, and RequestTooLarge for a prompt over
        ``max_prompt_bytes`` (nothing is sent then).
        """
        trace = self.tracing.job(spec)
        try:
            return self._submit(spec, trace)
        except BaseException as exc:
            trace.failed(exc)
            raise

    def _submit(self, spec: JobSpec, trace: JobTrace) -> JobRun:
        sticky: str | None = None
        if spec.session is not None:
            session = self.sessions.load(spec.session)
            sticky = session.node
            spec = with_history(session.messages, spec)
        check_prompt_size(spec, self.settings.max_prompt_bytes)
        with trace.phase("route"):
            try:
                spec, candidate = self._choose_first(spec, sticky)
            except NoNodeAvailable:
                self._raise_if_full()
                raise
        trace.routed(candidate)
        with trace.phase("send"):
            try:
                reader = self._subscribe_and_send(
                    spec.job_id, candidate.node, lambda: self._send(spec, candidate, attempt=1)
                )
            except WRITES_REFUSED as exc:
                raise refused_write(exc) from None
        trace.sent()
        # A worker that restarts takes the jobs it had reserved with it, started or not; the
        # reader notices the node's instance changing and the job moves on.
        reader.instance = candidate.instance or None
        reader.cursor.has_record = True  # _send writes it
        reader.cursor.live_from_first = True
        return JobRun(
            spec=spec,
            reader=reader,
            control=self.control,
            hooks=_ClientHooks(self),
            attempt=Attempt(1, candidate),
            trace=trace,
        )

    def _raise_if_full(self) -> None:
        """A full Redis refuses heartbeats too, so every node looks down: say so instead."""
        try:
            reason = full_broker_reason(self.redis.info("memory"))
        except redis.exceptions.RedisError:  # INFO may be denied (a least-privilege user)
            return
        if reason is not None:
            raise BrokerUnavailable(reason)

    def _send(self, spec: JobSpec, candidate: Candidate, attempt: int) -> None:
        task = job_task(spec, candidate, attempt)
        self._publisher.send_task(task.name, **task.kwargs)
        with self._lock:
            self._sent_since_read[candidate.node] += 1
        # After the send, off the path to the first token; attach and cancel read it.
        self.redis.set(
            names.job_node_key(spec.job_id), candidate.node, ex=self.settings.replay_ttl_s
        )

    def stream(self, spec: JobSpec) -> Iterator[Event]:
        """Submit and follow: the simple form of the API."""
        run = self.submit(spec)
        yield from run.events(self.settings.job_timeout_s)

    def embed(
        self,
        inputs: Sequence[str],
        *,
        model: str | None = None,
        node: str | None = None,
        tags: frozenset[str] = frozenset(),
        priority: Priority = "interactive",
    ) -> JobResult:
        """One vector per text (``result.embeddings``), from a node with an embedding model.

        The batch is one job; it moves to another node if its node fails, like a chat. Raises
        the job's error (``UnknownModel`` when no node has ``model`` as an embedding model).
        """
        spec = make_embed_spec(inputs, model=model, node=node, tags=tags, priority=priority)
        return self.run_embed(spec)

    def run_embed(self, spec: JobSpec) -> JobResult:
        """Run an embed job made with ``controller.embedding.make_embed_spec``."""
        outcome = EmbedOutcome(spec.job_id)
        # Read to the end: the run resets the node's breakers as it is iterated past the end.
        for event in self.stream(spec):
            outcome.see(event)
        return outcome.result()

    def attach(self, job_id: str) -> JobStreamReader:
        """Follow a running or finished job from its first event."""
        node = self.job_node(job_id)
        if node is None and not self.redis.exists(names.job_log_key(job_id)):
            raise JobError(f"no job {job_id} (unknown, or older than the replay window)")
        return self._subscribe(job_id, node)

    def cancel(self, job_id: str) -> bool:
        """Stop a job: a queued one is taken out of its queue and ended at once, a running
        one's worker closes its backend stream. False if the job is unknown."""
        node = self.job_node(job_id)
        self.control.cancel(job_id, node)
        return node is not None

    def job_node(self, job_id: str) -> str | None:
        """The node ``job_id`` was last sent to, while its record lasts."""
        node = self.redis.get(names.job_node_key(job_id))
        return node.decode() if isinstance(node, bytes) else None

    # --- model lifecycle -------------------------------------------------------------------

    def model_op(
        self,
        node: str,
        op: ModelOpKind,
        model: str,
        *,
        backend: str | None = None,
        force: bool = False,
        keep_alive: str | None = None,
    ) -> JobStreamReader:
        """Send a pull / warm / unload / rm to ``node``; follow the reader for its progress.

        Checked here first, with the node's last heartbeat: the node exists and is up, it has
        a backend that manages models, the model is there (but for a pull), and a model to
        warm fits the node's free memory (unless ``force``). The node checks the fit of a
        pull itself, once the download says how big the model is.
        """
        if keep_alive is not None:
            try:
                keep_alive_seconds(keep_alive)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        state = self._node_for_op(node)
        managing = [b for b in state.info.backends if b.manages_models]
        if backend is not None:
            managing = [b for b in managing if b.name == backend]
        if not managing:
            kinds = ", ".join(f"{b.name} ({b.kind})" for b in state.info.backends) or "none"
            raise UnsupportedOperation(
                f"node {node!r} has no backend{f' {backend!r}' if backend else ''} that can "
                f"manage models (it has: {kinds}); pull/warm/unload/rm need Ollama"
            )
        target = managing[0]
        if op != "pull":
            present = {m.name: m for m in target.models}
            if model not in present:
                raise UnknownModel(
                    f"model {model!r} is not on {node}/{target.name} "
                    f"(it has: {', '.join(sorted(present)) or 'none'})"
                )
            size = present[model].size_bytes
            free = state.info.free_memory_bytes()
            if op == "warm" and not force and size is not None and free is not None:
                problem = fit_problem(model, size, free)
                if problem is not None and not present[model].loaded:
                    raise ModelTooLarge(problem)
        request = ModelOpRequest(
            op_id=new_job_id(),
            node=node,
            backend=target.name,
            op=op,
            model=model,
            force=force,
            keep_alive=keep_alive,
            created_at=time.time(),
        )
        return self._subscribe_and_send(
            request.op_id,
            node,
            lambda: self.app.send_task(
                names.MODEL_OP_TASK,
                args=[request.model_dump(mode="json")],
                task_id=request.op_id,
                queue=names.node_queue(node),
                priority=names.INTERACTIVE_PRIORITY,
                argsrepr=request.argsrepr(),
                kwargsrepr="{}",
                ignore_result=True,
            ),
        )

    def _node_for_op(self, node: str) -> NodeState:
        states = {s.name: s for s in self.nodes()}
        if node not in states:
            raise UnknownNode(
                f"no node named {node!r} (known nodes: {', '.join(sorted(states)) or 'none'})"
            )
        if not states[node].up:
            raise NoNodeAvailable(f"node {node!r} is down")
        return states[node]

    def _subscribe_and_send(
        self, job_id: str, node: str, send: Callable[[], object]
    ) -> JobStreamReader:
        """Subscribe to ``job_id``'s stream, ``send`` its task, and return the reader.

        SUBSCRIBE goes out before the task does; its confirmation is awaited after the send,
        which takes a round trip off the path to the first token. Nothing can be lost in
        between: the worker appends every event to the replay log before publishing it, and
        the reader reads that log for any gap in the sequence numbers, or after a quiet wait
        (so an event published before the subscription took effect comes late, never lost).
        """
        reader = self._start_subscription(job_id, node)
        try:
            send()
            self._await_subscription(reader)
        except BaseException:
            reader.close()
            raise
        return reader

    def _subscribe(self, job_id: str, node: str | None) -> JobStreamReader:
        reader = self._start_subscription(job_id, node)
        self._await_subscription(reader)
        return reader

    def _start_subscription(self, job_id: str, node: str | None) -> JobStreamReader:
        """Send SUBSCRIBE without waiting for Redis's answer (see ``submit``)."""
        with self._lock:
            pubsub = self._idle_pubsubs.pop() if self._idle_pubsubs else None
        if pubsub is None:
            pubsub = self._streams.pubsub()  # type: ignore[no-untyped-call]  # redis-py stub gap
        try:
            pubsub.subscribe(names.job_channel(job_id))
        except redis.exceptions.MaxConnectionsError:
            pubsub.close()
            raise BrokerUnavailable(
                f"this client already follows {self.max_streams} streams (max_streams)"
            ) from None
        return JobStreamReader(self.redis, pubsub, job_id, node, release=self._release_pubsub)

    def _release_pubsub(self, pubsub: PubSub, channel: str) -> None:
        """Unsubscribe and keep the connection for the next job.

        redis-py closes a PubSub's connection on close(); opening a new one costs a TCP
        connect and handshake on the path to the next job's first token.
        """
        try:
            pubsub.unsubscribe(channel)  # type: ignore[no-untyped-call]
            deadline = time.monotonic() + 1.0
            while pubsub.subscribed and time.monotonic() < deadline:
                pubsub.get_message(timeout=0.1)  # drains stragglers and the confirmation
        except redis.exceptions.RedisError:
            pubsub.close()
            return
        if pubsub.subscribed:
            pubsub.close()
            return
        with self._lock:
            if len(self._idle_pubsubs) < _IDLE_PUBSUBS_KEPT:
                self._idle_pubsubs.append(pubsub)
                return
        pubsub.close()

    def _await_subscription(self, reader: JobStreamReader) -> None:
        try:
            confirmed = reader.pubsub.get_message(timeout=5)
        except redis.exceptions.ConnectionError:
            # A kept connection that Redis closed (it restarted) fails on its first read:
            # subscribe again on a fresh one. Whatever was published meanwhile is in the job's
            # log, which the reader reads once subscribed.
            reader.pubsub.close()
            reader.pubsub = self._streams.pubsub()  # type: ignore[no-untyped-call]
            try:
                reader.pubsub.subscribe(names.job_channel(reader.job_id))
                confirmed = reader.pubsub.get_message(timeout=5)
            except redis.exceptions.ConnectionError as exc:
                reader.close()
                raise unreachable(exc, self._url) from None
        if confirmed is None or confirmed.get("type") != "subscribe":
            reader.close()
            raise BrokerUnavailable("Redis did not confirm the subscription to the job stream")


class _ClientHooks:
    """A JobRun's view of its client: routing, sending, breakers and sessions."""

    def __init__(self, client: CorralClient) -> None:
        self._client = client

    def next_candidate(self, spec: JobSpec, *, avoid: set[str], never: set[str]) -> Candidate:
        return self._client.choose(spec, avoid=avoid, never=never, fresh=True)

    def send(self, spec: JobSpec, candidate: Candidate, attempt: int) -> None:
        self._client._send(spec, candidate, attempt)

    def attempt_succeeded(self, candidate: Candidate) -> None:
        # Only targets with a breaker entry need resetting: no extra round trip per job.
        view = self._client.cluster(max_age_s=self._client.settings.route_cache_s)
        for target in success_targets(candidate, view):
            self._client.breakers.record_success(target)

    def attempt_failed(
        self, candidate: Candidate, code: str, retry_after: float | None = None
    ) -> None:
        target = failure_target(candidate, code)
        hold = breaker_hold(code, retry_after, self._client.settings.quota_cooldown_s)
        if hold is not None:
            self._client.breakers.hold(target, *hold)
        else:
            self._client.breakers.record_failure(target, open_now=code in RATE_LIMIT_CODES)

    def finished(self, spec: JobSpec, result_text: str, candidate: Candidate) -> None:
        if spec.session is None:
            return
        reply = ChatMessage(role="assistant", content=result_text)
        self._client.sessions.save(spec.session, candidate.node, (*spec.messages, reply))
