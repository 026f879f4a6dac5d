"""OpenTelemetry spans for a job's path, when an OTLP endpoint is configured (extra ``otel``).

A job gives one ``corral.job`` span (node, model, outcome, tokens) holding ``corral.route``
(choosing the node), ``corral.send`` (publishing to its queue until the stream is subscribed),
``corral.first_token`` (from sent to the first token) and ``corral.stream`` (first token to
done). A gateway request is a ``corral.gateway`` span around its job, so the job's spans are
its children in the trace.

Enabled by ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``), as every OTel SDK
reads them, or corral's ``otlp_endpoint`` setting; spans go out over OTLP/HTTP protobuf in
batches (``OTEL_BSP_SCHEDULE_DELAY``). With none of them set, ``make_tracing`` returns
``NO_TRACING``: opentelemetry is not imported and each hook is an empty method.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.schemas import AnyStreamEvent, DeltaEvent, DoneEvent, ErrorEvent, is_terminal
from broker.settings import CorralSettings

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

    from broker.schemas import JobSpec
    from controller.router import Candidate

log = logging.getLogger("corral.tracing")

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
TIMEOUT_VARIABLES = ("OTEL_EXPORTER_OTLP_TIMEOUT", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT")
EXPORT_TIMEOUT_S = 2.0


class JobTrace:
    """One job's spans; this base class records nothing (tracing off)."""

    def phase(self, name: str) -> AbstractContextManager[None]:
        """A child span around ``route`` or ``send``."""
        return nullcontext()

    def routed(self, candidate: Candidate) -> None:
        """The node and model chosen (again, when the job moves)."""

    def sent(self) -> None:
        """The job is on its node's queue: the wait for the first token begins."""

    def event(self, event: AnyStreamEvent) -> None:
        """Each stream event: the first delta ends the wait, the terminal one the job."""

    def failed(self, error: BaseException) -> None:
        """The job could not be sent (nothing to serve it, Redis away)."""

    def abandoned(self) -> None:
        """The caller stopped following before the end (the span ends, marked so)."""


class Tracing:
    """Makes each job's ``JobTrace`` and a front door's request span; off by default."""

    enabled = False

    def job(self, spec: JobSpec) -> JobTrace:
        return _NO_JOB_TRACE

    def request(self, name: str, attributes: dict[str, Any]) -> AbstractContextManager[Any]:
        return nullcontext()

    def shutdown(self) -> None:
        """Flush the spans still batched (at a server's exit)."""


NO_TRACING = Tracing()
_NO_JOB_TRACE = JobTrace()


def otlp_configured(settings: CorralSettings) -> bool:
    return bool(settings.otlp_endpoint) or any(os.environ.get(v) for v in ENDPOINT_VARIABLES)


def make_tracing(settings: CorralSettings, service: str) -> Tracing:
    """OTLP tracing for ``service`` when an endpoint is configured, else ``NO_TRACING``."""
    if not otlp_configured(settings):
        return NO_TRACING
    try:
        return _OtelTracing(settings.otlp_endpoint, service)
    except ImportError:
        log.warning(
            "an OTLP endpoint is set but OpenTelemetry is not installed: "
            "pip install 'corral[otel]'; running without traces"
        )
        return NO_TRACING


class _OtelTracing(Tracing):
    enabled = True

    def __init__(self, endpoint: str | None, service: str) -> None:
        # Imported here, never at module import: without an endpoint nothing of OTel loads.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
        from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
        from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

        service_name = os.environ.get("OTEL_SERVICE_NAME") or service
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        # An explicit setting is a base URL, as OTEL_EXPORTER_OTLP_ENDPOINT is; without one the
        # exporter reads the standard variables itself.
        traces_url = endpoint.rstrip("/") + "/v1/traces" if endpoint else None
        # The SDK's default export timeout (10 s, retried within it) would hold `corral ask`
        # that long at exit when the collector is down; corral's is shorter unless set.
        timeout = None if any(os.environ.get(v) for v in TIMEOUT_VARIABLES) else EXPORT_TIMEOUT_S
        exporter = OTLPSpanExporter(traces_url, timeout=timeout)
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer: Tracer = self._provider.get_tracer("corral")

    def job(self, spec: JobSpec) -> JobTrace:
        return _OtelJobTrace(self._tracer, spec)

    @contextmanager
    def request(self, name: str, attributes: dict[str, Any]) -> Iterator[Span]:
        with self._tracer.start_as_current_span(name, attributes=attributes) as span:
            yield span

    def shutdown(self) -> None:
        self._provider.shutdown()


class _OtelJobTrace(JobTrace):
    """The job span (a child of the current span: a gateway request's) and its phases."""

    def __init__(self, tracer: Tracer, spec: JobSpec) -> None:
        from opentelemetry import trace  # noqa: PLC0415

        self._tracer = tracer
        attributes: dict[str, Any] = {"corral.job_id": spec.job_id}
        if spec.model:
            attributes["corral.requested_model"] = spec.model
        if spec.node:
            attributes["corral.requested_node"] = spec.node
        self._job = tracer.start_span("corral.job", attributes=attributes)
        self._context = trace.set_span_in_context(self._job)
        self._waiting: Span | None = None
        self._streaming: Span | None = None
        self._tokens = 0
        self._ended = False

    def _child(self, name: str) -> Span:
        return self._tracer.start_span(name, context=self._context)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        span = self._child(f"corral.{name}")
        try:
            yield
        except BaseException as exc:
            _record_error(span, exc)
            raise
        finally:
            span.end()

    def routed(self, candidate: Candidate) -> None:
        self._job.set_attribute("corral.node", candidate.node)
        self._job.set_attribute("corral.model", candidate.model)

    def sent(self) -> None:
        if self._waiting is None and self._streaming is None:
            self._waiting = self._child("corral.first_token")

    def event(self, event: AnyStreamEvent) -> None:
        if isinstance(event, DeltaEvent):
            self._tokens += 1
            if self._streaming is None:
                now = time.time_ns()
                if self._waiting is not None:
                    self._waiting.end(now)
                    self._waiting = None
                self._streaming = self._tracer.start_span(
                    "corral.stream", context=self._context, start_time=now
                )
        elif isinstance(event, DoneEvent):
            result = event.result
            self._job.set_attribute("corral.node", result.node)
            self._job.set_attribute("corral.model", result.model)
            outcome = "done" if result.status == "ok" else result.status
            self._end(outcome, result.usage.completion_tokens)
        elif is_terminal(event):  # a final error, or an answer cut off after its first token
            code = event.code if isinstance(event, ErrorEvent) else "interrupted"
            self._job.set_attribute("corral.error", code)
            self._end("cancelled" if code == "cancelled" else "failed", self._tokens)

    def failed(self, error: BaseException) -> None:
        _record_error(self._job, error)
        self._end("refused", 0)

    def abandoned(self) -> None:
        self._end("abandoned", self._tokens)

    def _end(self, outcome: str, tokens: int) -> None:
        if self._ended:
            return
        self._ended = True
        for span in (self._waiting, self._streaming):
            if span is not None:
                span.end()
        self._job.set_attribute("corral.outcome", outcome)
        self._job.set_attribute("corral.tokens", tokens)
        if outcome in ("failed", "refused"):
            from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415

            self._job.set_status(Status(StatusCode.ERROR, outcome))
        self._job.end()


class TraceRequests:
    """ASGI middleware: each HTTP request is a span (method, path, status) that a job sent
    while serving it hangs under. Installed only when tracing is on."""

    def __init__(self, app: ASGIApp, tracing: Tracing, name: str) -> None:
        self.app = app
        self.tracing = tracing
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def noting_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        attributes = {"http.request.method": scope["method"], "url.path": scope["path"]}
        with self.tracing.request(self.name, attributes) as span:
            try:
                await self.app(scope, receive, noting_status)
            finally:
                span.set_attribute("http.response.status_code", status)


def traced(app: ASGIApp, tracing: Tracing, name: str) -> ASGIApp:
    """``app`` with a span per request when ``tracing`` is on; ``app`` itself when it is off."""
    return TraceRequests(app, tracing, name) if tracing.enabled else app


def _record_error(span: Span, error: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode  # noqa: PLC0415

    # The class name only: a message may carry a prompt or a URL.
    span.set_status(Status(StatusCode.ERROR, type(error).__name__))


__all__ = [
    "NO_TRACING",
    "JobTrace",
    "TraceRequests",
    "Tracing",
    "make_tracing",
    "otlp_configured",
    "traced",
]
