"""``corral chat``: an interactive REPL over the cluster, with a local conversation.

Line editing and a persistent input history come from prompt_toolkit (the history file is
``$XDG_STATE_HOME/corral/chat_history``). Each prompt goes out with the system prompt and the
latest messages of the conversation kept here (``controller.cli.conversation``), to the node
its ``@name`` names or to the router's choice; the answer streams in and joins the
conversation labelled with the node and model that gave it. The session is written as a
Markdown transcript on exit and on ``/save``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click
import redis
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from broker.errors import ConfigError, CorralError, RoutingError
from broker.schemas import EFFORTS, Effort, GenerationOptions, describe_validation_error
from controller.cli.chat_answer import Answer, stream_answer
from controller.cli.chat_input import (
    OPTION_COMMANDS,
    ROUTES_HOW,
    UNSET,
    Command,
    Prompt,
    help_text,
    option_value,
    parse_line,
)
from controller.cli.common import ExitCode, fail, settings_from
from controller.cli.conversation import HISTORY_WINDOW, Conversation, answer_summary
from controller.cli.render import breaker_notes, nodes_table, stderr_console
from controller.client import CorralClient, make_spec, with_history
from controller.config_watch import ConfigWatch, watched_path
from controller.prompt import parse_tags
from controller.routes import Mention, RouteStore, make_route, resolve_mention
from controller.tracing import make_tracing

if TYPE_CHECKING:
    from prompt_toolkit import PromptSession


def state_dir() -> Path:
    """corral's own folder under the user's state directory (XDG), made private: the input
    history and transcripts hold whatever was typed."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    folder = Path(base) / "corral"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def default_transcript_path(started_at: float) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started_at))
    return state_dir() / "chats" / f"chat-{stamp}.md"


# What the worker's cancellation says, as the chat tells it.
_CANCEL_NOTES = {
    "": "the node stopped generating",
    "job cancelled": "the node stopped generating",
    "job cancelled before it started": "it had not started yet",
}


@dataclass
class ChatRepl:
    """What the REPL does with each line; the prompt_toolkit loop is in ``chat_command``."""

    client: CorralClient
    conversation: Conversation
    transcript_path: Path
    tags: frozenset[str] = frozenset()
    session: str | None = None
    """Keep the history in the cluster's session store (``--session``) instead of sending
    the local one."""
    timeout_s: float = 600.0
    options: GenerationOptions = field(default_factory=GenerationOptions)
    out: Console = field(default_factory=lambda: Console(highlight=False, soft_wrap=True))
    err: Console = field(default_factory=stderr_console)

    def handle(self, line: str) -> bool:
        """Act on one typed line; False when the user asked to leave."""
        try:
            parsed = parse_line(line)
        except ConfigError as exc:
            self.error(str(exc))
            return True
        if parsed is None:
            return True
        if isinstance(parsed, Prompt):
            self.ask(parsed)
            return True
        return self.command(parsed)

    def error(self, message: str) -> None:
        self.err.print(f"[red]✗ {escape(message)}[/red]")

    def dim(self, message: str) -> None:
        self.err.print(f"[dim]{escape(message)}[/dim]")

    # --- prompts ---------------------------------------------------------------------------

    def ask(self, prompt: Prompt) -> None:
        self.refresh_config()
        settings = self.client.settings
        conv = self.conversation
        try:
            mention = self.node_for(prompt.target, conv.model)
            spec = make_spec(
                prompt.text,
                node=mention.node if mention else None,
                model=mention.model if mention else conv.model,
                route=mention.route_name if mention else None,
                route_url=mention.route_url if mention else None,
                tags=self.tags,
                system=conv.system,
                options=self.options,
                session=self.session,
                max_attempts=settings.max_attempts,
                first_token_timeout_s=settings.first_token_timeout_s,
            )
        except CorralError as exc:
            if isinstance(exc, RoutingError):  # the transcript keeps a prompt nothing could serve
                conv.add_unfinished(prompt.text, "", f"failed: {exc}")
            self.error(str(exc))
            return
        if self.session is None:
            spec = with_history(conv.context(), spec)
        answer = stream_answer(
            self.client, spec, out=sys.stdout, err=self.err, timeout_s=self.timeout_s
        )
        self._record(prompt.text, answer, len(spec.messages), spec.job_id)

    def node_for(self, target: str | None, model: str | None) -> Mention | None:
        """Where ``@target`` sends a prompt, and with which model: a route of that name (its
        serving node and model, unless /model names one), else the node of that name."""
        if target is None:
            return None
        return resolve_mention(
            target, RouteStore(self.client.redis), self.client.nodes(), model=model
        )

    def _record(self, prompt: str, answer: Answer, sent: int, job_id: str) -> None:
        conv = self.conversation
        if answer.outcome == "done" and answer.result is not None:
            result = answer.result
            conv.add_answer(prompt, answer.text, node=result.node, model=result.model)
            summary = answer_summary(
                result.node,
                result.model,
                answer.first_token_ms,
                result.usage.completion_tokens,
                result.usage.prompt_tokens,
                None if self.session else sent,
                result.usage.cost_usd,
                result.notes,
            )
            self.dim(summary)
            return
        where = f" on {answer.node}" if answer.node else ""
        if answer.outcome == "cancelled":
            words = len(answer.text.split())
            why = f"cancelled after {words} words"
            conv.add_unfinished(prompt, answer.text, why, node=answer.node, model=answer.model)
            stopped = _CANCEL_NOTES.get(answer.reason, answer.reason)
            self.err.print(
                f"[yellow]✂ cancelled job {job_id}{escape(where)} after {words} words: "
                f"{escape(stopped)}[/yellow]"
            )
            return
        why = f"failed: {answer.reason}"
        conv.add_unfinished(prompt, answer.text, why, node=answer.node, model=answer.model)
        self.error(answer.reason + (f" (job {job_id}{where})" if answer.node else ""))

    # --- commands --------------------------------------------------------------------------

    def command(self, command: Command) -> bool:
        conv = self.conversation
        name, arg = command.name, command.arg
        if name == "exit":
            return False
        if name == "help":
            self.out.print(escape(help_text()))
        elif name == "model":
            if arg:
                conv.model = None if arg == UNSET else arg
                conv.add_note(f"model: {conv.model or 'any'}")
            self.dim(f"model: {conv.model or 'any (the router chooses)'}")
        elif name == "system":
            if arg:
                conv.set_system(None if arg == UNSET else arg)
            self.dim(f"system prompt: {conv.system or '(none)'}")
        elif name in ("history", "clear") and self.session:
            self.dim(
                f"--session {self.session}: the cluster's session store holds the history "
                "sent with each prompt; start another session ID for a fresh one"
            )
        elif name == "history":
            for line in conv.history_lines(self.out.width):
                self.out.print(escape(line))
        elif name == "clear":
            dropped = conv.clear()
            self.dim(f"history cleared ({dropped} messages); the transcript keeps them")
        elif name == "save":
            self.save(Path(arg).expanduser() if arg else self.transcript_path)
        elif name in OPTION_COMMANDS:
            if arg:
                self.set_option(name, arg)
            self.dim(self.options_line())
        elif name == "options":
            self.dim(self.options_line())
        elif name == "nodes":
            self.show_nodes()
        elif name == "route":
            self.route(arg)
        return True

    def set_option(self, command: str, arg: str) -> None:
        """Change one sampling option for the rest of the session (validated as a job's
        options are: a temperature over 2 is refused here, not by the node)."""
        try:
            value = option_value(command, arg)
            changed = {**self.options.model_dump(), OPTION_COMMANDS[command]: value}
            self.options = GenerationOptions.model_validate(changed)
        except ConfigError as exc:
            self.error(str(exc))
            return
        except ValidationError as exc:
            self.error(f"/{command} {arg}: {describe_validation_error(exc)}")
            return
        self.conversation.add_note(self.options_line())

    def options_line(self) -> str:
        opts = self.options
        temperature = "the model's default" if opts.temperature is None else f"{opts.temperature:g}"
        limit = "none" if opts.max_tokens is None else str(opts.max_tokens)
        return f"options: temperature {temperature} · max tokens {limit}"

    def refresh_config(self) -> None:
        """Take in an edit of corral.yaml (aliases, limits) before the next prompt."""
        watch = self.client.config
        if watch is None:
            return
        before = watch.problem
        if watch.poll():
            self.dim(f"{watch.path} reloaded")
        elif watch.problem and watch.problem != before:
            self.error(f"corral.yaml edit refused, the last good config stays: {watch.problem}")

    def show_nodes(self) -> None:
        try:
            view = self.client.cluster()
        except CorralError as exc:
            self.error(str(exc))
            return
        if not view.nodes:
            self.dim("no nodes have registered yet (start one with `corral worker`)")
            return
        settings = self.client.settings
        notes = breaker_notes(view.breakers, view.redis_time, settings.breaker_cooldown_s)
        self.out.print(nodes_table(view.nodes, notes))

    def route(self, arg: str) -> None:
        """``/route`` lists; ``/route add NAME URL [MODEL]`` and ``/route rm NAME`` change."""
        words = arg.split()
        store = RouteStore(self.client.redis)
        try:
            if not words:
                self.show_routes(store)
            elif words[0] == "add" and len(words) in (3, 4):
                added = make_route(words[1], words[2], words[3] if len(words) == 4 else None)
                store.add(added)
                self.dim(f"route @{added.name} -> {added.url} {added.model or '(no model)'}")
            elif words[0] == "rm" and len(words) == 2:
                if not store.remove(words[1]):
                    raise ConfigError(f"no route named {words[1]!r}")
                self.dim(f"removed route @{words[1].lower()}")
            else:
                raise ConfigError("/route, /route add NAME URL [MODEL] or /route rm NAME")
        except CorralError as exc:
            self.error(str(exc))
        except redis.RedisError as exc:
            self.error(f"Redis: {exc.__class__.__name__}")

    def show_routes(self, store: RouteStore) -> None:
        routes, enabled = store.all(), store.enabled()
        for route in routes:
            self.out.print(escape(f"@{route.name}  {route.url}  {route.model or '(no model)'}"))
        state = "on" if enabled else "off (`corral route on`)"
        self.dim(f"{len(routes)} route(s), routing {state}; {ROUTES_HOW}")

    def save(self, path: Path) -> bool:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(self.conversation.transcript(), encoding="utf-8")
        except OSError as exc:
            self.error(f"cannot write the transcript to {path}: {exc.strerror or exc}")
            return False
        self.dim(f"transcript saved to {path}")
        return True


@click.command("chat")
@click.option("--model", help="Ask for this model (change it with /model).")
@click.option("--system", help="A system prompt (change it with /system).")
@click.option("--tag", "tags", multiple=True, help="Required capability tag (repeatable, or a,b).")
@click.option(
    "--window",
    type=click.IntRange(0, 1000),
    default=HISTORY_WINDOW,
    show_default=True,
    help="How many of the latest messages go with each prompt.",
)
@click.option(
    "--session",
    metavar="ID",
    help="Keep the history in the cluster's session store (as `ask --session`), not here.",
)
@click.option(
    "--transcript",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where the Markdown transcript goes (default: a new file under "
    "$XDG_STATE_HOME/corral/chats).",
)
@click.option("--max-tokens", type=click.IntRange(1), help="Stop each answer after this many.")
@click.option("--temperature", type=click.FloatRange(0, 2))
@click.option(
    "--effort",
    type=click.Choice(EFFORTS),
    help="How hard a reasoning model thinks (mapped onto its family's own control).",
)
@click.option(
    "--timeout", type=click.FloatRange(min=1), help="Seconds of silence before giving up."
)
@click.pass_context
def chat_command(
    ctx: click.Context,
    model: str | None,
    system: str | None,
    tags: tuple[str, ...],
    window: int,
    session: str | None,
    transcript: Path | None,
    max_tokens: int | None,
    temperature: float | None,
    effort: Effort | None,
    timeout: float | None,
) -> None:
    """Chat with the cluster: `@NODE prompt` asks that node, a plain prompt the router's
    choice; the conversation's latest messages go with each prompt. /help inside lists the
    commands; Ctrl-C stops an answer, Ctrl-D leaves (the transcript is saved then)."""
    settings = settings_from(ctx)
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        fail(ConfigError("corral chat needs a terminal; for scripts use `corral ask`"))
    conversation = Conversation(model=model, window=window)
    if system:
        conversation.set_system(system)
    try:
        history_path = state_dir() / "chat_history"
        path = transcript or default_transcript_path(conversation.started_at)
    except OSError as exc:
        fail(ConfigError(f"cannot create corral's state folder: {exc}"))
    # The chat says itself when corral.yaml is reloaded or refused (refresh_config), in its
    # own style; the watch's log lines would repeat it on stderr.
    logging.getLogger("corral.config").addHandler(logging.NullHandler())
    # An unreachable OTLP collector must not print retries over the conversation.
    logging.getLogger("opentelemetry").addHandler(logging.NullHandler())
    try:
        config = ConfigWatch(settings, watched_path())
    except CorralError as exc:
        fail(exc)
    tracing = make_tracing(settings, "corral-chat")
    with CorralClient(settings, config=config, tracing=tracing) as client:
        repl = ChatRepl(
            client,
            conversation,
            path,
            tags=parse_tags(tags),
            session=session,
            timeout_s=timeout or settings.job_timeout_s,
            options=GenerationOptions(
                max_tokens=max_tokens, temperature=temperature, effort=effort
            ),
        )
        _greet(repl)
        _loop(repl, _line_editor(history_path))
        saved = not conversation.exchanges or repl.save(path)
    tracing.shutdown()  # sends the spans still batched
    sys.exit(ExitCode.OK if saved else ExitCode.FAILED)


def _greet(repl: ChatRepl) -> None:
    try:
        up = sum(node.up for node in repl.client.nodes())
    except CorralError as exc:
        fail(exc)
    repl.dim(
        f"corral chat · {up} node(s) up · /help for commands · Ctrl-C stops an answer, "
        "Ctrl-D leaves"
    )


def _line_editor(history_path: Path) -> PromptSession[str]:
    """prompt_toolkit's line editor with the input history kept in ``history_path``; Esc then
    Enter (or Alt-Enter) starts a new line of the same prompt, Enter sends it."""
    # Imported here: every other corral command would pay ~0.1 s to load it.
    from prompt_toolkit import PromptSession  # noqa: PLC0415
    from prompt_toolkit.history import FileHistory  # noqa: PLC0415
    from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent  # noqa: PLC0415

    bindings = KeyBindings()

    @bindings.add("escape", "enter")
    def _(event: KeyPressEvent) -> None:
        event.current_buffer.insert_text("\n")

    return PromptSession(history=FileHistory(str(history_path)), key_bindings=bindings)


def _loop(repl: ChatRepl, prompt: PromptSession[str]) -> None:
    while True:
        try:
            line = prompt.prompt("you> ")
        except KeyboardInterrupt:
            continue  # as in Python's REPL: the line is dropped, the chat goes on
        except EOFError:
            return
        try:
            if not repl.handle(line):
                return
        except KeyboardInterrupt:
            repl.dim("interrupted")  # a slow /nodes or /save: the chat goes on
