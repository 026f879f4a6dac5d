"""A ``corral chat`` conversation as the REPL keeps it: the turns, the window of them sent
with each prompt, and the Markdown transcript.

No terminal, file or Redis here: ``controller.cli.chat`` feeds it what happened and prints
what it returns, so all of it is tested without a terminal.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

from broker.schemas import ChatMessage
from controller.cli.render import cost_text

HISTORY_WINDOW = 10
"""How many of the latest messages (questions and answers) go with each prompt."""

TurnKind = Literal["user", "assistant", "note"]


@dataclass(frozen=True, slots=True)
class Turn:
    """One entry of the conversation: a question, an answer, or a note (a new system
    prompt, a cleared history) that only the transcript shows."""

    kind: TurnKind
    text: str
    at: float
    node: str | None = None
    model: str | None = None
    unfinished: str | None = None
    """Why an answer is partial or missing (cancelled, failed); None when it completed."""
    in_context: bool = True
    """Whether later prompts may carry it (``/clear`` and failed answers take turns out)."""

    @property
    def label(self) -> str:
        if self.kind == "user":
            return "you"
        if self.kind == "note":
            return "note"
        return " · ".join(part for part in (self.node, self.model) if part) or "assistant"


@dataclass
class Conversation:
    """The local history of one chat, and the settings its next prompt goes out with."""

    system: str | None = None
    model: str | None = None
    window: int = HISTORY_WINDOW
    started_at: float = field(default_factory=time.time)
    turns: list[Turn] = field(default_factory=list)

    # --- what goes out ---------------------------------------------------------------------

    def context(self) -> tuple[ChatMessage, ...]:
        """The latest ``window`` messages that later prompts carry, oldest first (the system
        prompt is not among them: it always goes first, whatever the window)."""
        if self.window <= 0:
            return ()
        kept = [
            ChatMessage(role=t.kind, content=t.text)
            for t in self.turns
            if t.in_context and t.kind != "note"
        ]
        return tuple(kept[-self.window :])

    def messages_for(self, prompt: str) -> tuple[ChatMessage, ...]:
        """Every message a prompt is sent with: system, the window, the prompt itself."""
        system = (ChatMessage(role="system", content=self.system),) if self.system else ()
        return (*system, *self.context(), ChatMessage(role="user", content=prompt))

    # --- what happened ---------------------------------------------------------------------

    def add_answer(
        self, prompt: str, answer: str, *, node: str, model: str, at: float | None = None
    ) -> None:
        now = time.time() if at is None else at
        self.turns.append(Turn("user", prompt, now))
        self.turns.append(Turn("assistant", answer, now, node=node, model=model))

    def add_unfinished(
        self,
        prompt: str,
        partial: str,
        why: str,
        *,
        node: str | None = None,
        model: str | None = None,
        at: float | None = None,
    ) -> None:
        """An answer cut short (Ctrl-C, a failed backend). With some text it stays in the
        context, as a stopped answer would in any chat; with none the question is left out
        too, so the next prompt does not follow a question that was never answered."""
        now = time.time() if at is None else at
        kept = bool(partial.strip())
        self.turns.append(Turn("user", prompt, now, in_context=kept))
        self.turns.append(
            Turn(
                "assistant",
                partial,
                now,
                node=node,
                model=model,
                unfinished=why,
                in_context=kept,
            )
        )

    def set_system(self, text: str | None, at: float | None = None) -> None:
        self.system = text or None
        note = f"system prompt set: {text}" if text else "system prompt removed"
        self.add_note(note, at)

    def clear(self, at: float | None = None) -> int:
        """Forget the history for later prompts (the transcript keeps it); returns how many
        messages were dropped."""
        dropped = len(self.context_turns())
        self.turns = [replace(t, in_context=False) for t in self.turns]
        self.add_note("history cleared: the turns above are no longer sent", at)
        return dropped

    def add_note(self, text: str, at: float | None = None) -> None:
        self.turns.append(Turn("note", text, time.time() if at is None else at, in_context=False))

    def context_turns(self) -> list[Turn]:
        """The questions and answers later prompts may carry (the window takes the latest)."""
        return [t for t in self.turns if t.in_context and t.kind != "note"]

    @property
    def exchanges(self) -> int:
        """How many questions were asked (answered or not)."""
        return sum(t.kind == "user" for t in self.turns)

    # --- what is shown ---------------------------------------------------------------------

    def history_lines(self, width: int = 100) -> list[str]:
        """``/history``: each message later prompts may carry, one line each, with a mark on
        those the next prompt sends (``*``)."""
        turns = self.context_turns()
        if not turns:
            return ["(no history: the next prompt goes alone)"]
        sent_from = max(0, len(turns) - max(self.window, 0)) if self.window > 0 else len(turns)
        lines = []
        for index, turn in enumerate(turns):
            mark = "*" if index >= sent_from else " "
            text = " ".join(turn.text.split())
            head = f"{mark} {turn.label}: "
            room = max(10, width - len(head))
            lines.append(head + (text if len(text) <= room else text[: room - 1] + "…"))
        sent = len(turns) - sent_from
        lines.append(f"(the next prompt sends the {sent} marked * of {len(turns)})")
        return lines

    def transcript(self) -> str:
        """The whole session as Markdown: a heading per turn, the text as it came."""
        lines = [f"# corral chat, {_stamp(self.started_at, '%Y-%m-%d %H:%M UTC')}", ""]
        for turn in self.turns:
            clock = _stamp(turn.at, "%H:%M:%S")
            if turn.kind == "note":
                lines += [f"*{clock} · {turn.text}*", ""]
                continue
            lines += [f"## {turn.label} ({clock})", ""]
            if turn.text:
                lines += [turn.text.rstrip("\n"), ""]
            if turn.unfinished:
                lines += [f"*({turn.unfinished})*", ""]
        return "\n".join(lines).rstrip("\n") + "\n"


def _stamp(at: float, fmt: str) -> str:
    return datetime.fromtimestamp(at, UTC).strftime(fmt)


def answer_summary(
    node: str,
    model: str,
    first_token_ms: float | None,
    tokens: int,
    prompt_tokens: int | None,
    messages_sent: int | None,
    cost_usd: float | None = None,
    notes: tuple[str, ...] = (),
) -> str:
    """The dim line after each answer: who answered, how fast, how much (and what it cost)."""
    ttft = f"{first_token_ms:.0f} ms" if first_token_ms is not None else "-"
    prompt = f" · prompt {prompt_tokens} tokens" if prompt_tokens is not None else ""
    plural = "" if messages_sent == 1 else "s"
    sent = f" · {messages_sent} message{plural} sent" if messages_sent is not None else ""
    cost = f" · {cost_text(cost_usd)}" if cost_usd is not None else ""
    extra = "".join(f" · {note}" for note in notes)
    return f"{node} · {model} · first token {ttft} · {tokens} tokens{prompt}{cost}{sent}{extra}"
