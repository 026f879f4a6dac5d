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
    "temperature": "/temperature [T] show or set the sampling temperature, 0 to 2 (- : default)",
    "max-tokens": "/max-tokens [N]  show or set the longest answer, in tokens (- : no limit)",
    "options": "/options         the sampling options each prompt goes out with",
    "nodes": "/nodes           the cluster's nodes, their backends, models and load",
    "route": "/route [add NAME URL [MODEL] | rm NAME]   the cluster's named routes",
    "help": "/help            this list",
    "exit": "/exit            leave (as Ctrl-D does)",
}
ALIASES = {"quit": "exit", "?": "help"}

UNSET = "-"
"""The argument that resets ``/model``, ``/system`` and the sampling options."""

OPTION_COMMANDS = {"temperature": "temperature", "max-tokens": "max_tokens"}
"""Chat commands that set a ``GenerationOptions`` field, and the field."""

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


def option_value(command: str, arg: str) -> float | int | None:
    """The value ``/temperature ARG`` or ``/max-tokens ARG`` asks for (None: back to the
    default); ConfigError when it is not a number of the right kind."""
    if arg == UNSET:
        return None
    try:
        return float(arg) if command == "temperature" else int(arg)
    except ValueError:
        kind = "a number such as 0.7" if command == "temperature" else "a whole number"
        raise ConfigError(f"/{command} takes {kind} (or - for the default), not {arg!r}") from None


def help_text() -> str:
    return "\n".join(
        [
            "Type a prompt to ask the cluster; `@name prompt` asks that node, with the history.",
            *COMMANDS.values(),
            "Ctrl-C stops an answer (the job is cancelled on its node); Ctrl-D leaves.",
        ]
    )
