"""Reading fields out of a request body with a clear 400 for a wrong type."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import ValidationError

from broker.schemas import EFFORTS, GenerationOptions, describe_validation_error
from controller.gateway.errors import bad_request

_T = TypeVar("_T", int, float, str)


def optional(body: dict[str, Any], key: str, kind: type[_T]) -> _T | None:
    """``body[key]`` as ``kind`` (an int is a float; a bool is neither), or None if absent."""
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # type: ignore[return-value]
    if not ok:
        raise bad_request(f"'{key}' must be {'a number' if kind is not str else 'a string'}")
    return value  # type: ignore[no-any-return]


def options_from(
    *,
    temperature: float | None,
    max_tokens: int | None,
    seed: int | None,
    stop: object,
    effort: str | None = None,
    think: bool | None = None,
) -> GenerationOptions:
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise bad_request("'stop' must be a string or a list of strings")
    if effort is not None and effort not in EFFORTS:
        raise bad_request(f"'reasoning_effort' must be one of {', '.join(EFFORTS)}")
    try:
        return GenerationOptions(
            temperature=temperature,
            max_tokens=max_tokens,
            seed=seed,
            stop=stops,
            effort=effort,
            think=think,
        )
    except ValidationError as exc:
        raise bad_request(f"invalid options: {describe_validation_error(exc)}") from None
