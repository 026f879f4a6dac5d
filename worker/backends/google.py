"""The adapter for Google's Gemini API (generativelanguage.googleapis.com), in its own format.

``stream_chat`` posts to ``/v1beta/models/{model}:streamGenerateContent?alt=sse`` with
``contents`` (roles ``user`` and ``model``), the system messages as ``systemInstruction``, the
tools, and the options in ``generationConfig`` (the body is built in ``google_wire``). Each
``data:`` event is a whole ``GenerateContentResponse``: ``candidates[0].content.parts`` carry
the new text or a whole ``functionCall`` (a call, with Gemini's id or else ``call_<n>``), the
last adds ``finishReason`` and ``usageMetadata``; there is no end sentinel, the body just
ends. A prompt the safety filter blocks is answered 200 with ``promptFeedback.blockReason``
and no candidate; an answer it stops ends with ``finishReason: SAFETY`` (both
``ContentBlocked``). A per-day quota (``QuotaFailure`` with a per-day quota id) is an exhausted
quota; other 429s carry ``RetryInfo.retryDelay``. The key travels in the ``x-goog-api-key``
header, never the URL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, time, timedelta, timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from broker.errors import BackendProtocolError, ContentBlocked
from broker.schemas import ChatMessage, GenerationOptions, ModelInfo, ToolCall, ToolDefinition
from worker.backends.base import AdapterIdentity, Chunk
from worker.backends.cloud import ModelCache
from worker.backends.google_wire import generate_request_body
from worker.backends.http_errors import ErrorReport, HttpErrors, Scrubber, error_text, url_secrets
from worker.backends.sse import SSEDecoder, lines_to_the_end

__all__ = ["GoogleBackend", "generate_request_body"]  # the body is built in google_wire

API_VERSION = "v1beta"
BLOCKED_FINISH = frozenset(
    {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY"}
)
"""Finish reasons that mean a filter stopped the answer, not that it was complete."""
FINISH_REASONS = {"STOP": "stop", "MAX_TOKENS": "length"}
QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, populate_by_name=True)


class _FunctionCall(_Wire):
    id: str | None = None
    name: str = ""
    args: dict[str, Any] | None = None


class _Part(_Wire):
    text: str | None = None
    thought: bool = False
    function_call: _FunctionCall | None = Field(default=None, alias="functionCall")


class _Content(_Wire):
    parts: list[_Part] = Field(default_factory=list)


class _Candidate(_Wire):
    content: _Content = Field(default_factory=_Content)
    finish_reason: str | None = Field(default=None, alias="finishReason")


class _Feedback(_Wire):
    block_reason: str | None = Field(default=None, alias="blockReason")


class _UsageMetadata(_Wire):
    prompt_tokens: int | None = Field(default=None, alias="promptTokenCount")
    completion_tokens: int | None = Field(default=None, alias="candidatesTokenCount")


class _Response(_Wire):
    candidates: list[_Candidate] = Field(default_factory=list)
    prompt_feedback: _Feedback | None = Field(default=None, alias="promptFeedback")
    usage: _UsageMetadata | None = Field(default=None, alias="usageMetadata")
    error: Any = None


class _Status(_Wire):
    code: int | None = None
    message: str = ""
    status: str = ""
    details: list[dict[str, Any]] = Field(default_factory=list)


class _ErrorBody(_Wire):
    error: _Status | None = None


class _ListedModel(_Wire):
    name: str
    methods: list[str] = Field(default_factory=list, alias="supportedGenerationMethods")
    input_limit: int | None = Field(default=None, alias="inputTokenLimit")


class _ModelPage(_Wire):
    models: list[_ListedModel] = Field(default_factory=list)
    next_page: str | None = Field(default=None, alias="nextPageToken")


def _retry_delay(details: list[dict[str, Any]]) -> float | None:
    for detail in details:
        if detail.get("@type") == RETRY_INFO:
            delay = str(detail.get("retryDelay", "")).removesuffix("s")
            try:
                return float(delay)
            except ValueError:
                return None
    return None


def _per_day_quota(details: list[dict[str, Any]]) -> bool:
    for detail in details:
        if detail.get("@type") == QUOTA_FAILURE:
            for violation in detail.get("violations") or []:
                if "PerDay" in str(violation.get("quotaId", "")):
                    return True
    return False


def _pacific() -> tzinfo:
    """Where Gemini's per-day quotas reset at midnight (Google's rate-limit docs); standard
    time's fixed offset on a system without the time zone database."""
    try:
        return ZoneInfo("America/Los_Angeles")
    except ZoneInfoNotFoundError:
        return timezone(timedelta(hours=-8))


def seconds_to_quota_reset(now: datetime | None = None) -> float:
    """Seconds until the next midnight in Pacific time, when a per-day quota is whole again."""
    zone = _pacific()
    moment = (now or datetime.now(UTC)).astimezone(zone)
    midnight = datetime.combine(moment.date() + timedelta(days=1), time(), zone)
    return (midnight - moment).total_seconds()


def _bad_key(details: list[dict[str, Any]]) -> bool:
    return any(
        d.get("@type") == ERROR_INFO and d.get("reason") == "API_KEY_INVALID" for d in details
    )


class GoogleBackend(AdapterIdentity):
    """Google's Gemini API through an injected ``httpx.AsyncClient``."""

    def __init__(
        self,
        name: str,
        base_url: str,
        client: httpx.AsyncClient,
        api_key: SecretStr,
        *,
        key_source: str,
        capacity: int = 4,
        models: ModelCache | None = None,
    ) -> None:
        super().__init__(name, "google", capacity=capacity, base_url=base_url)
        self._root = f"{base_url.rstrip('/').removesuffix('/' + API_VERSION)}/{API_VERSION}"
        self._client = client
        self._api_key = api_key
        self._scrub = Scrubber((*url_secrets(base_url), api_key.get_secret_value()))
        self._errors = HttpErrors(
            backend=name,
            where=f"google backend {name!r} at {self._public_url}",
            scrub=self._scrub,
            read_error=self._read_error,
            key_source=key_source,
        )
        self._models = models or ModelCache()

    async def inventory(self) -> list[ModelInfo]:
        return await self._models.get(self._list_models)

    async def _list_models(self) -> list[ModelInfo]:
        models: list[ModelInfo] = []
        params: dict[str, str | int] = {"pageSize": 1000}
        while True:
            with self._errors.translating():
                response = await self._client.get(
                    f"{self._root}/models", params=params, headers=self._headers()
                )
                await self._errors.check(response, model=None)
            try:
                page = _ModelPage.model_validate_json(response.content)
            except ValidationError:
                raise self._errors.bad_payload(
                    "a model list it cannot read", response.text
                ) from None
            models += [
                ModelInfo(
                    name=m.name.removeprefix("models/"),
                    loaded=True,
                    context_length=m.input_limit,
                )
                for m in page.models
                if "generateContent" in m.methods
            ]
            if not page.next_page:
                return models
            params["pageToken"] = page.next_page

    async def stream_chat(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        options: GenerationOptions,
        tools: Sequence[ToolDefinition] = (),
    ) -> AsyncIterator[Chunk]:
        body = generate_request_body(messages, options, model, tools)
        path = f"{self._root}/models/{model.removeprefix('models/')}:streamGenerateContent"
        decoder = SSEDecoder()
        finish: str | None = None
        usage: _UsageMetadata | None = None
        calls = 0
        with self._errors.translating():
            async with self._client.stream(
                "POST", path, params={"alt": "sse"}, json=body, headers=self._headers()
            ) as response:
                await self._errors.check(response, model)
                async for line in lines_to_the_end(response.aiter_lines()):
                    sse = decoder.feed(line)
                    if sse is None:
                        continue
                    parsed = self._parse(sse.data, model)
                    usage = parsed.usage or usage
                    for candidate in parsed.candidates[:1]:
                        for part in candidate.content.parts:
                            if part.function_call is not None:
                                # Gemini gives a call no id: number them, so a result can
                                # name the call it answers.
                                call = self._whole_call(part.function_call, calls)
                                calls += 1
                                yield Chunk(text="", tool_calls=(call,))
                            elif part.text and not part.thought:
                                yield Chunk(text=part.text)
                        finish = candidate.finish_reason or finish
                    if finish in BLOCKED_FINISH:
                        raise ContentBlocked(
                            f"{self._errors.where} stopped the answer: finishReason {finish}"
                        )
                    if finish == "MALFORMED_FUNCTION_CALL":
                        raise BackendProtocolError(
                            f"{self._errors.where} made a function call it could not express"
                            " (finishReason MALFORMED_FUNCTION_CALL)"
                        )
        if finish is None:
            raise self._errors.mid_stream("the stream ended without a finishReason")
        # Gemini ends an answer that called functions with STOP, like any other.
        reason = "tool_calls" if calls and finish == "STOP" else None
        yield Chunk(
            text="",
            done=True,
            finish_reason=reason or FINISH_REASONS.get(finish, finish.lower()),
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
        )

    # --- internals -------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"x-goog-api-key": self._api_key.get_secret_value()}

    def _whole_call(self, call: _FunctionCall, number: int) -> ToolCall:
        try:
            call_id = call.id or f"call_{number}"
            return ToolCall(id=call_id, name=call.name, arguments=call.args or {})
        except ValidationError as exc:
            raise BackendProtocolError(
                f"{self._errors.where} sent a functionCall corral cannot carry: "
                f"{exc.errors()[0]['msg']}"
            ) from None

    def _parse(self, data: str, model: str) -> _Response:
        try:
            parsed = _Response.model_validate_json(data)
        except ValidationError:
            raise self._errors.bad_payload(
                "an event that is not a GenerateContentResponse", data
            ) from None
        if parsed.error is not None:
            try:
                status = _Status.model_validate(parsed.error)
            except ValidationError:
                raise self._errors.mid_stream(str(parsed.error)) from None
            code = status.code or 500
            raise self._errors.in_stream(code, self._report(status, code), model)
        feedback = parsed.prompt_feedback
        if feedback is not None and feedback.block_reason and not parsed.candidates:
            raise ContentBlocked(
                f"{self._errors.where} blocked the prompt: blockReason {feedback.block_reason}"
            )
        return parsed

    def _report(self, status: _Status, code: int) -> ErrorReport:
        message = self._scrub.detail(f"{status.status}: {status.message}".strip(": "))
        missing = code == 404 and "model" in status.message.lower()
        per_day = _per_day_quota(status.details)
        return ErrorReport(
            message,
            model_missing=missing,
            quota_exhausted=per_day,
            auth_failed=_bad_key(status.details),
            # A per-day quota's retryDelay says when to ask again, not when it is refilled.
            retry_after=seconds_to_quota_reset() if per_day else _retry_delay(status.details),
        )

    def _read_error(self, response: httpx.Response) -> ErrorReport:
        try:
            status = _ErrorBody.model_validate_json(response.content).error
        except ValidationError:
            status = None
        if status is None:
            return ErrorReport(error_text(response, None, self._scrub))
        return self._report(status, response.status_code)
