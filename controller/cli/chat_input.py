"""What a line typed into ``corral chat`` means: a prompt (maybe ``@name``-addressed) or a
``/command``. Pure parsing, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from broker.errors import ConfigError
from controller.prompt import split_mention

COMMANDS: dict[str, str] = {
    "model": "/model [M]       show the model, or ask for M from now on (/model - : any)",
    "system": "/system [TEXT]   show the system prompt, or set it (/system - : none)",
    "history": "/history         the messages later prompts carry (* : sent with the next)",
    "save": "/save [FILE]     write the transcript as Markdown (default: the session's file)",
    "clear": "/clear           forget the history (the transcript keeps it)",
    "nodes": "/nodes           the cluster's nodes, their backends, models and load",
    "route": "/route [add NAME URL [MODEL] | rm NAME]   the cluster's named routes",
    "help": "/help            this list",
    "exit": "/exit            leave (as Ctrl-D does)",
}
ALIASES = {"quit": "exit", "?": "help"}

UNSET = "-"
"""The argument that resets ``/model`` and ``/system``."""

ROUTES_HOW = "add one with /route add NAME URL [MODEL] (or `corral route add NAME URL [MODEL]`)"


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    arg: str = ""


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str
    target: str | None = None
    """The ``@name`` the line began with: a named route first, then a node (the REPL
    resolves it, not this parser)."""


def parse_line(line: str) -> Command | Prompt | None:
    """A typed line as a command or a prompt; None for a blank line.

    ``//text`` sends ``/text`` as a prompt. Raises ConfigError for an unknown command or a
    malformed ``@name``, with the fix in the message.
    """
    stripped = line.strip()
    if not stripped:
        return None
    if stripped.startswith("//"):
        return Prompt(stripped[1:])
    if stripped.startswith("/"):
        word, _, arg = stripped[1:].partition(" ")
        name = ALIASES.get(word.lower(), word.lower())
        if name not in COMMANDS:
            raise ConfigError(f"unknown command /{word} (/help lists them)")
        return Command(name, arg.strip())
    target, text = split_mention(stripped)
    return Prompt(text, target)


def help_text() -> str:
    return "\n".join(
        [
            "Type a prompt to ask the cluster; `@name prompt` asks that node, with the history.",
            *COMMANDS.values(),
            "Ctrl-C stops an answer (the job is cancelled on its node); Ctrl-D leaves.",
        ]
    )
