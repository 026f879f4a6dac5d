"""The controller's Python API: route and submit a job, follow its stream, cancel it.

Streaming is lossless: the client subscribes to the job's channel and waits for Redis to confirm
before the job is sent; every event carries a sequence number; a gap (a missed message, a
reconnect) is refilled from the job's replay log, so each event is yielded once, in order.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import redis.exceptions
from celery import Celery
from pydantic import ValidationError
from redis import Redis
from redis.client import PubSub

from broker import names
from broker.celery_app import make_celery_app
from broker.errors import BrokerUnavailable, JobError, JobTimeout, NodeLost
from broker.schemas import (
    ChatMessage,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    GenerationOptions,
    JobAssignment,
    JobSpec,
    Priority,
    StartedEvent,
    parse_event,
)
from broker.settings import CorralSettings, redacted_url
from controller.cluster import preload_scripts, read_nodes
from controller.router import Candidate, NodeState, route

Event = StartedEvent | DeltaEvent | DoneEvent | ErrorEvent

# How often an idle follower re-reads the replay log and checks the node is still alive. This
# is not on the hot path: events wake the follower at once; this only bounds how long a lost
# message or a dead node goes unnoticed.
_IDLE_CHECK_S = 1.0
_IDLE_PUBSUBS_KEPT = 4


def new_job_id() -> str:
    return uuid.uuid4().hex


def make_spec(
    prompt: str,
    *,
    route: str | None = None,
    model: str | None = None,
    tags: frozenset[str] = frozenset(),
    system: str | None = None,
    options: GenerationOptions | None = None,
    priority: Priority = "interactive",
    session: str | None = None,
) -> JobSpec:
    messages = [ChatMessage(role="system", content=system)] if system else []
    messages.append(ChatMessage(role="user", content=prompt))
    return JobSpec(
        job_id=new_job_id(),
        messages=tuple(messages),
        route=route,
        model=model,
        tags=tags,
        priority=priority,
        session=session,
        options=options or GenerationOptions(),
        created_at=time.time(),
    )


@dataclass
class JobStreamReader:
    """Follows one job's events from a subscribed pub/sub plus the replay log."""

    redis: Redis
    pubsub: PubSub
    job_id: str
    node: str | None
    next_seq: int = 0
    release: Callable[[PubSub, str], None] | None = field(default=None, repr=False)
    """Hands the subscription back for reuse on close; without it the connection is closed."""
    _closed: bool = field(default=False, repr=False)
    _finished: bool = field(default=False, repr=False)

    def events(self, timeout_s: float) -> Iterator[Event]:
        """Yield every event once, in order, until done or error; raises JobError otherwise.

        ``timeout_s`` bounds the silence between two events, not the whole job.
        """
        try:
            yield from self._from_log()
            if self._finished:
                return
            deadline = time.monotonic() + timeout_s
            while True:
                wait = min(_IDLE_CHECK_S, max(0.0, deadline - time.monotonic()))
                message = self._next_message(wait)
                if message is None:
                    yield from self._from_log()
                    if self._finished:
                        return
                    if time.monotonic() >= deadline:
                        raise JobTimeout(f"no event from job {self.job_id} for {timeout_s:.0f}s")
                    self._check_node_alive()
                    continue
                try:
                    event = parse_event(message)
                except ValidationError:
                    continue  # not ours to crash on; the log holds the valid copy
                if event.seq < self.next_seq:
                    continue
                if event.seq > self.next_seq:
                    yield from self._from_log(upto=event.seq - 1)
                self.next_seq = event.seq + 1
                deadline = time.monotonic() + timeout_s
                yield event
                if isinstance(event, DoneEvent | ErrorEvent):
                    self._finished = True
                    return
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.release is not None:
                self.release(self.pubsub, names.job_channel(self.job_id))
            else:
                self.pubsub.close()

    def _next_message(self, wait_s: float) -> bytes | None:
        try:
            message = self.pubsub.get_message(ignore_subscribe_messages=True, timeout=wait_s)
        except redis.exceptions.ConnectionError:
            # redis-py resubscribes on the next call; whatever was missed is in the log.
            time.sleep(min(wait_s, 0.2))
            return None
        if message is None or message.get("type") != "message":
            return None
        data = message["data"]
        return data if isinstance(data, bytes) else str(data).encode()

    def _from_log(self, upto: int = -1) -> Iterator[Event]:
        try:
            raw = self.redis.lrange(names.job_log_key(self.job_id), self.next_seq, upto)
        except redis.exceptions.ConnectionError:
            return
        for payload in raw:
            event = parse_event(payload)
            self.next_seq = event.seq + 1
            yield event
            if isinstance(event, DoneEvent | ErrorEvent):
                self._finished = True
                return

    def _check_node_alive(self) -> None:
        if self.node is None:
            return
        try:
            alive = self.redis.exists(names.node_alive_key(self.node))
        except redis.exceptions.ConnectionError:
            return
        if not alive:
            raise NodeLost(
                f"node {self.node!r} stopped heartbeating while job {self.job_id} was on it"
            )


@dataclass(frozen=True)
class Submission:
    job_id: str
    candidate: Candidate
    reader: JobStreamReader


class CorralClient:
    """One per process; holds a Redis connection pool and a Celery producer pool."""

    def __init__(self, settings: CorralSettings) -> None:
        self.settings = settings
        url = settings.broker_url.get_secret_value()
        self._url = url
        self.redis = Redis.from_url(url, socket_connect_timeout=5)
        self.app: Celery = make_celery_app(settings)
        self._scripts_loaded = False
        self._idle_pubsubs: list[PubSub] = []
        self._pubsub_lock = threading.Lock()
        self._node_view: tuple[float, list[NodeState]] | None = None
        self._sent_since_read: Counter[str] = Counter()

    def close(self) -> None:
        with self._pubsub_lock:
            idle, self._idle_pubsubs = self._idle_pubsubs, []
        for pubsub in idle:
            pubsub.close()
        self.redis.close()
        self.app.close()

    def __enter__(self) -> CorralClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def nodes(self, max_age_s: float = 0.0) -> list[NodeState]:
        """The cluster as Redis has it; a view up to ``max_age_s`` old may be reused."""
        now = time.monotonic()
        if self._node_view is not None and now - self._node_view[0] <= max_age_s:
            return self._node_view[1]
        try:
            if not self._scripts_loaded:
                preload_scripts(self.redis)
                self._scripts_loaded = True
            states = read_nodes(self.redis)
        except redis.exceptions.AuthenticationError:
            raise BrokerUnavailable(
                f"Redis at {redacted_url(self._url)} refused the password"
            ) from None
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise BrokerUnavailable(
                f"cannot reach Redis at {redacted_url(self._url)}: {exc.__class__.__name__}"
            ) from None
        self._node_view = (now, states)
        self._sent_since_read.clear()
        return states

    def _routing_view(self) -> list[NodeState]:
        """The node list the router sees: reused for up to ``route_cache_s``, with the jobs this
        client has sent since it was read counted as queued, so a burst still spreads out."""
        states = self.nodes(max_age_s=self.settings.route_cache_s)
        if not self._sent_since_read:
            return states
        return [replace(s, queued=s.queued + self._sent_since_read[s.name]) for s in states]

    def submit(self, spec: JobSpec) -> Submission:
        """Route ``spec``, subscribe to its stream, then send it to the chosen node's queue.

        Raises a RoutingError when nothing can serve it (nothing is sent then).
        """
        candidate = route(spec, self._routing_view())[0]
        assignment = JobAssignment(
            spec=spec, node=candidate.node, backend=candidate.backend, model=candidate.model
        )
        # SUBSCRIBE goes out before the job does; its confirmation is awaited after the send,
        # which takes a round trip off the path to the first token. Nothing can be lost in
        # between: the worker appends every event to the replay log before publishing it, and
        # the reader starts by reading that log once the subscription is confirmed.
        reader = self._start_subscription(spec.job_id, candidate.node)
        try:
            self.app.send_task(
                names.RUN_JOB_TASK,
                args=[assignment.model_dump(mode="json")],
                task_id=spec.job_id,
                queue=names.node_queue(candidate.node),
                argsrepr=assignment.argsrepr(),
                kwargsrepr="{}",
                ignore_result=True,
            )
            self._sent_since_read[candidate.node] += 1
            self._await_subscription(reader)
            # After the send, off the path to the first token; attach and cancel read it.
            self.redis.set(
                names.job_node_key(spec.job_id), candidate.node, ex=self.settings.replay_ttl_s
            )
        except BaseException:
            reader.close()
            raise
        return Submission(spec.job_id, candidate, reader)

    def stream(self, spec: JobSpec) -> Iterator[Event]:
        """Submit and follow: the simple form of the API."""
        submission = self.submit(spec)
        yield from submission.reader.events(self.settings.job_timeout_s)

    def attach(self, job_id: str) -> JobStreamReader:
        """Follow a running or finished job from its first event."""
        node_raw = self.redis.get(names.job_node_key(job_id))
        exists = self.redis.exists(names.job_log_key(job_id))
        if node_raw is None and not exists:
            raise JobError(f"no job {job_id} (unknown, or older than the replay window)")
        node = node_raw.decode() if isinstance(node_raw, bytes) else None
        return self._subscribe(job_id, node)

    def cancel(self, job_id: str) -> bool:
        """Ask whichever worker has the job to stop it; False if the job is unknown."""
        known = self.redis.exists(names.job_node_key(job_id))
        pipe = self.redis.pipeline(transaction=False)
        pipe.set(names.job_cancel_key(job_id), 1, ex=self.settings.replay_ttl_s)
        pipe.publish(names.CANCEL_CHANNEL, job_id)
        pipe.execute()
        return bool(known)

    def _subscribe(self, job_id: str, node: str | None) -> JobStreamReader:
        reader = self._start_subscription(job_id, node)
        self._await_subscription(reader)
        return reader

    def _start_subscription(self, job_id: str, node: str | None) -> JobStreamReader:
        """Send SUBSCRIBE without waiting for Redis's answer (see ``submit``)."""
        with self._pubsub_lock:
            pubsub = self._idle_pubsubs.pop() if self._idle_pubsubs else None
        if pubsub is None:
            pubsub = self.redis.pubsub()  # type: ignore[no-untyped-call]  # redis-py stub gap
        pubsub.subscribe(names.job_channel(job_id))
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
        with self._pubsub_lock:
            if len(self._idle_pubsubs) < _IDLE_PUBSUBS_KEPT:
                self._idle_pubsubs.append(pubsub)
                return
        pubsub.close()

    def _await_subscription(self, reader: JobStreamReader) -> None:
        confirmed = reader.pubsub.get_message(timeout=5)
        if confirmed is None or confirmed.get("type") != "subscribe":
            reader.close()
            raise BrokerUnavailable("Redis did not confirm the subscription to the job stream")
