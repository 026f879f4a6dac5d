"""A Celery task message as kombu's Redis transport would write it, built without I/O.

``app.send_task`` runs its whole path here: Celery's router, ``as_task_v2`` (headers,
``argsrepr``, ids), its ``before_task_publish`` / ``after_task_publish`` signals and kombu's
``Producer.publish`` (serializer, delivery mode, priority). Only the last step, the channel's
write, is replaced: where kombu's Redis channel would LPUSH the envelope (the body base64, a
``delivery_tag``, ``delivery_info``) onto the queue's list for the message's priority step, the
``Envelope`` says what to push and where, so an asyncio caller can write it on its own
connection (``controller.apublisher``). A worker consumes it as any Celery message.

What is not a task message (a ``task-sent`` event, when ``task_send_sent_event`` is on, goes
to Celery's event exchange, whose routing reads bindings from Redis) is kept as the call kombu
would have made, for a real producer to make off the caller's loop.

The signals fire while the message is built: ``after_task_publish`` comes before the write,
not after it.
"""

from __future__ import annotations

import base64
from bisect import bisect
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from kombu.messaging import Producer
from kombu.transport.redis import Channel as RedisChannel
from kombu.utils.json import dumps
from kombu.utils.uuid import uuid

# kombu's virtual channel limits a message's priority to this range before choosing its step.
_MIN_PRIORITY, _MAX_PRIORITY = 0, 9


@dataclass(frozen=True)
class ProducerCall:
    """A ``Producer.publish`` call kept for a real producer (its body, its keywords)."""

    body: Any
    kwargs: dict[str, Any]


@dataclass
class Envelope:
    """One task message ready to push: the Redis list, the JSON kombu writes, and what else
    publishing it involves."""

    list_key: str
    payload: str
    delivery_tag: str
    queue: str
    other_calls: list[ProducerCall] = field(default_factory=list)
    """Publishes to a real exchange (Celery's events), to make with a real producer."""


class _NoConnection:
    """What ``send_task`` asks of a producer's connection: there is none to translate."""

    def _reraise_as_library_errors(self) -> AbstractContextManager[None]:
        return nullcontext()


_NO_CONNECTION = _NoConnection()


class _EnvelopeProducer(Producer):
    """kombu's Producer, channel-less: ``publish`` prepares the message as always and
    ``_publish`` keeps, instead of sending, what the Redis channel would have pushed."""

    def __init__(self, builder: EnvelopeBuilder) -> None:
        super().__init__(None)  # type: ignore[no-untyped-call]
        self._builder = builder
        self.envelope: Envelope | None = None
        self.other_calls: list[ProducerCall] = []

    @property
    def connection(self) -> _NoConnection:
        return _NO_CONNECTION

    def publish(self, body: Any, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("exchange"):
            # Not a task message for a queue of ours (the anonymous exchange): Celery's
            # task-sent event, which kombu routes by the exchange's bindings in Redis.
            self.other_calls.append(ProducerCall(body, {**kwargs, "retry": True}))
            return
        super().publish(body, *args, **kwargs)  # type: ignore[no-untyped-call]

    def _publish(
        self,
        body: Any,
        priority: int | None,
        content_type: str | None,
        content_encoding: str | None,
        headers: dict[str, Any] | None,
        properties: dict[str, Any],
        routing_key: str,
        mandatory: bool,
        immediate: bool,
        exchange: str,
        declare: Sequence[Any],
        *_: Any,
    ) -> None:
        # ``declare``: kombu would first declare the queue (its ``_kombu.binding.*`` entry,
        # once per connection); the node's worker declares it when it starts consuming, and a
        # message for the anonymous exchange goes to the list by name, so nothing reads it.
        self.envelope = self._builder.envelope(
            body, priority, content_type, content_encoding, headers, properties, routing_key
        )


class EnvelopeBuilder:
    """Builds a Celery app's task messages for its Redis broker (``send``'s keywords are
    ``send_task``'s)."""

    def __init__(self, app: Celery) -> None:
        self._app = app
        options = app.conf.broker_transport_options or {}
        self._steps: list[int] = list(options.get("priority_steps", RedisChannel.priority_steps))
        self._sep: str = options.get("sep", RedisChannel.sep)
        self.unacked_key: str = options.get("unacked_key", RedisChannel.unacked_key)
        """kombu's hash of messages delivered to a worker and not yet acknowledged."""
        if options.get("global_keyprefix"):
            raise ValueError("a global_keyprefix is not supported by the asyncio publisher")

    def build(self, name: str, **send_task_kwargs: Any) -> Envelope:
        producer = _EnvelopeProducer(self)
        # retry=False: nothing is sent here, so nothing to retry; the caller retries the push.
        self._app.send_task(name, producer=producer, retry=False, **send_task_kwargs)
        if producer.envelope is None:  # send_task always publishes once
            raise RuntimeError(f"Celery published no message for {name}")
        producer.envelope.other_calls = producer.other_calls
        return producer.envelope

    def envelope(
        self,
        body: bytes | str,
        priority: int | None,
        content_type: str | None,
        content_encoding: str | None,
        headers: dict[str, Any] | None,
        properties: dict[str, Any],
        queue: str,
    ) -> Envelope:
        """kombu's ``Channel.prepare_message``, ``_inplace_augment_message`` and ``_put``,
        for the anonymous exchange (the routing key names the queue)."""
        properties.setdefault("delivery_info", {})
        properties.setdefault("priority", priority or 0)
        delivery_tag = uuid()
        properties.update(body_encoding="base64", delivery_tag=delivery_tag)
        properties["delivery_info"].update(exchange="", routing_key=queue)
        raw = body.encode() if isinstance(body, str) else body
        message = {
            "body": base64.b64encode(raw).decode(),
            "content-encoding": content_encoding,
            "content-type": content_type,
            "headers": headers or {},
            "properties": properties,
        }
        return Envelope(
            list_key=self.list_key(queue, properties["priority"]),
            payload=dumps(message),  # type: ignore[no-untyped-call]
            delivery_tag=delivery_tag,
            queue=queue,
        )

    def list_key(self, queue: str, priority: Any) -> str:
        """The Redis list for ``queue`` at ``priority`` (kombu's ``_q_for_pri``)."""
        try:
            value = max(min(int(priority), _MAX_PRIORITY), _MIN_PRIORITY)
        except (TypeError, ValueError):
            value = 0
        step = self._steps[bisect(self._steps, value) - 1]
        return f"{queue}{self._sep}{step}" if step else queue
