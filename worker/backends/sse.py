"""Server-Sent Events, as every SSE adapter reads them (OpenAI-compatible, Anthropic, Gemini).

Just enough of the WHATWG format: ``event:`` names the next event, ``data:`` lines are joined
with newlines until a blank line ends the event, a line starting with ``:`` is a comment (a
keep-alive). One extension: llama.cpp's server reports a failure after its 200 header as an
``error:`` line (older builds), read here as an ``error`` event.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass

__all__ = ["SSEDecoder", "SSEEvent", "lines_to_the_end"]


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str
    """The event's name; ``"message"`` when the server gave none."""
    data: str


class SSEDecoder:
    """Feeds on lines, returns each event as its blank line completes it."""

    def __init__(self) -> None:
        self._data: list[str] = []
        self._event = ""

    def feed(self, line: str) -> SSEEvent | None:
        """Take one line (without its line break); return an event when one is complete."""
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "error":
            self._event = "error"
            self._data.append(value)
        return None

    def flush(self) -> SSEEvent | None:
        """The event in progress, if any: also called at the end of the body, since a server
        may omit the last blank line."""
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent(self._event or "message", "\n".join(self._data))
        self._data, self._event = [], ""
        return event


async def lines_to_the_end(lines: AsyncIterable[str]) -> AsyncIterator[str]:
    """A body's lines and then one blank line, so the decoder also completes a last event
    whose closing blank line the server (or a proxy) left out."""
    async for line in lines:
        yield line
    yield ""
