"""What both APIs share: the library's clients, the limits, metrics, and how a held job is
answered (streamed with a disconnect watch, or collected whole)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from broker.errors import CorralError
from broker.schemas import JobSpec, ModelOpKind
from broker.settings import CorralSettings
from controller.aclient import AsyncCorralClient
from controller.client import CorralClient
from controller.gateway.errors import HttpError, bad_request, http_error
from controller.gateway.image_urls import ImageFetcher
from controller.gateway.jobs import (
    ClientGone,
    HeldJob,
    submit_and_hold,
    unless_disconnected,
)
from controller.gateway.metrics import GatewayMetrics
from controller.routes import AsyncRouteCache

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
_MODEL_OP_TIMEOUT_S = 120.0


@dataclass
class Gateway:
    client: AsyncCorralClient
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    images: ImageFetcher = field(default_factory=ImageFetcher)
    """How image URLs in requests are treated; see ``controller.gateway.image_urls``."""
    _blocking: CorralClient | None = None
    _blocking_lock: threading.Lock = field(default_factory=threading.Lock)
    routes: AsyncRouteCache = field(init=False)
    """The cluster's named routes, read at most once per ``route_cache_s``."""

    def __post_init__(self) -> None:
        self.routes = AsyncRouteCache(self.client.redis)

    @property
    def settings(self) -> CorralSettings:
        """The settings in force (hot-reloaded when the client follows a ``ConfigWatch``)."""
        return self.client.settings

    async def aclose(self) -> None:
        if self._blocking is not None:
            await asyncio.to_thread(self._blocking.close)
        await self.client.aclose()

    # --- requests ------------------------------------------------------------------------

    async def read_json(self, request: Request) -> dict[str, Any]:
        """The request's JSON object; 413 past ``max_body_bytes`` (read no further), 400 if
        it is not a JSON object."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise self._too_large()
        body = bytearray()
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > self.max_body_bytes:
                raise self._too_large()
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON") from None
        if not isinstance(parsed, dict):
            raise bad_request("the request body must be a JSON object")
        return parsed

    def _too_large(self) -> HttpError:
        return HttpError(
            413,
            f"the request body is over the gateway's limit of {self.max_body_bytes} bytes"
            " (corral serve --max-body-bytes)",
            code="request_too_large",
        )

    # --- jobs ----------------------------------------------------------------------------

    async def hold(self, request: Request, api: str, spec: JobSpec) -> HeldJob:
        """Submit and wait for the first token; the job is cancelled if the client leaves."""

        async def cancel() -> None:
            await self.client.cancel(spec.job_id)

        try:
            spec = await self.resolve_mention(spec)
            job = await unless_disconnected(
                submit_and_hold(self.client, spec, self.settings.job_timeout_s),
                request.receive,
                cancel,
            )
        except HttpError as exc:
            self.metrics.refused.labels(api, str(exc.status)).inc()
            raise
        except ClientGone:
            self.metrics.refused.labels(api, "499").inc()  # nginx's "client closed request"
            raise
        self.metrics.job_started()
        return job

    async def resolve_mention(self, spec: JobSpec) -> JobSpec:
        """``model@name`` or ``X-Corral-Node``: a named route's node and model, else a node."""
        if spec.node is None:
            return spec
        max_age_s = self.settings.route_cache_s
        try:
            nodes = await self.client.nodes(max_age_s=max_age_s)
            mention = await self.routes.mention(
                spec.node, nodes, model=spec.model, max_age_s=max_age_s
            )
        except CorralError as exc:
            raise http_error(exc) from None
        return spec.model_copy(
            update={
                "node": mention.node,
                "model": mention.model,
                "route": mention.route_name,
                "route_url": mention.route_url,
            }
        )

    def stream(
        self,
        api: str,
        job: HeldJob,
        frames: AsyncIterator[bytes],
        media_type: str,
        headers: dict[str, str],
    ) -> Response:
        return JobStreamResponse(self, api, job, frames, media_type, headers)

    async def collect(
        self, request: Request, api: str, job: HeldJob, render: Callable[[], Any]
    ) -> Any:
        """Await the whole job (``render`` consumes its events); cancel it if the client
        leaves."""

        async def cancel() -> None:
            job.outcome = "cancelled"
            await self.client.cancel(job.job_id)

        try:
            return await unless_disconnected(render(), request.receive, cancel)
        finally:
            await self.finish(api, job)

    async def finish(self, api: str, job: HeldJob) -> None:
        await job.aclose()
        self.metrics.job_ended(
            api=api,
            node=job.node,
            model=job.model,
            outcome=job.outcome,
            submitted_at=job.submitted_at,
            first_token_at=job.first_token_at,
            prompt_tokens=job.prompt_tokens,
            completion_tokens=job.completion_tokens,
        )

    # --- model operations ----------------------------------------------------------------

    async def model_op(
        self, node: str, op: ModelOpKind, model: str, keep_alive: str | None = None
    ) -> None:
        """A pull / warm / unload on ``node``, through the blocking client in a thread (the
        library's ``model_op`` is blocking-only); waits for the node to finish it."""

        def run() -> None:
            with self._blocking_lock:
                if self._blocking is None:
                    self._blocking = CorralClient(self.settings)
                blocking = self._blocking
            reader = blocking.model_op(node, op, model, keep_alive=keep_alive)
            for _event in reader.events(_MODEL_OP_TIMEOUT_S):
                pass

        try:
            await asyncio.to_thread(run)
        except CorralError as exc:
            raise http_error(exc) from None


class JobStreamResponse(Response):
    """A streamed answer that watches its client: when the client leaves, the job is
    cancelled (its node stops generating) instead of running on for nobody."""

    def __init__(
        self,
        gateway: Gateway,
        api: str,
        job: HeldJob,
        frames: AsyncIterator[bytes],
        media_type: str,
        headers: dict[str, str],
    ) -> None:
        super().__init__(None, 200, headers, media_type)
        # Streamed: no Content-Length (Response sets one for its empty body), and no proxy
        # buffering (nginx), so each token leaves as it comes.
        self.raw_headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        self.raw_headers += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        self._gateway = gateway
        self._api = api
        self._job = job
        self._frames = frames

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            # The first frame comes from the events held for the status line: it leaves
            # right behind the headers, with nothing scheduled in between.
            await unless_disconnected(self._pump(send), receive, self._cancel_job)
        except (ClientGone, OSError):
            pass  # the client left; its job was cancelled if it was still running
        finally:
            await self._gateway.finish(self._api, self._job)

    async def _cancel_job(self) -> None:
        self._job.outcome = "cancelled"
        await self._gateway.client.cancel(self._job.job_id)

    async def _pump(self, send: Send) -> None:
        async for frame in self._frames:
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
