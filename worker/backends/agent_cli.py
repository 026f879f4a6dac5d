"""A backend that runs an installed agent CLI (``claude -p``, ``codex exec``) once per job.

The node's own login to the CLI (a subscription) pays for the answer. Each job is one
subprocess, asyncio-driven: the prompt goes on stdin (never on the command line, where ``ps``
shows it to every user), stdout streams back as tokens, and the process runs in a session of
its own, so a cancelled job kills the whole process group (an agent CLI starts helpers).

Errors map onto the tree like an HTTP adapter's: a CLI that says it is rate limited (before
any answer, or on a failed exit) is ``BackendRateLimited`` with the reset time when it gives
one; a missing command is ``BackendUnavailable``; another failed exit is
``BackendUnavailable`` with the last line of its stderr, scrubbed of secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence

from broker.errors import BackendProtocolError, BackendRateLimited, BackendUnavailable, ConfigError
from broker.schemas import ChatMessage, GenerationOptions, ModelInfo, ToolDefinition
from worker.backends.base import AdapterIdentity, Chunk, refuse_beyond_text
from worker.backends.cli_output import (
    CliInvocation,
    prompt_text,
    rate_limit_in,
    retry_after_in,
    text_of_json_line,
)

__all__ = ["AgentCliBackend", "check_no_secrets", "scrub_secrets"]

log = logging.getLogger(__name__)

KILL_GRACE_S = 2.0
"""After SIGTERM, how long the process group has before SIGKILL."""
_STDERR_KEPT = 16 * 1024
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


def _secret_values(environ: Mapping[str, str]) -> list[str]:
    return [v for k, v in environ.items() if _SECRET_NAME.search(k) and len(v) >= 8]


def scrub_secrets(text: str, environ: Mapping[str, str] | None = None) -> str:
    """``text`` with the value of every secret-looking environment variable replaced."""
    for value in _secret_values(os.environ if environ is None else environ):
        text = text.replace(value, "***")
    return text


def check_no_secrets(
    command: Sequence[str], name: str, environ: Mapping[str, str] | None = None
) -> None:
    """Refuse a command line holding a secret (``${ANTHROPIC_API_KEY}`` expanded into it):
    any local user can read a process's arguments."""
    secrets = _secret_values(os.environ if environ is None else environ)
    if any(s in arg for arg in command for s in secrets):
        raise ConfigError(
            f"cli backend {name!r}: its command holds the value of a secret environment "
            "variable; the CLI reads its own login or environment, never put keys on its "
            "command line"
        )


class AgentCliBackend(AdapterIdentity):
    """One agent CLI, serving the models its configuration names."""

    def __init__(
        self,
        name: str,
        invocation: CliInvocation,
        models: Sequence[str],
        *,
        capacity: int = 1,
        workdir: str | None = None,
    ) -> None:
        super().__init__(name, "cli", capacity=capacity)
        self._invocation = invocation
        self._models = tuple(models)
        self._workdir = workdir

    async def inventory(self) -> list[ModelInfo]:
        program = self._invocation.command[0]
        if shutil.which(program) is None:
            raise BackendUnavailable(f"command {program!r} is not installed (not on PATH)")
        # Nothing to load: a subscription's models are always ready.
        return [
            ModelInfo(name=m, loaded=True, capabilities=frozenset({"chat"})) for m in self._models
        ]

    async def stream_chat(
        self,
        model: str,
        messages: Sequence[ChatMessage],
        options: GenerationOptions,
        tools: Sequence[ToolDefinition] = (),
    ) -> AsyncIterator[Chunk]:
        # An agent CLI takes a prompt as text: tools and images would be lost without a word.
        refuse_beyond_text(f"cli backend {self.name!r}", messages, tools)
        # Sampling options have no flag on these CLIs: they are not passed.
        with contextlib.ExitStack() as stack:
            cwd = self._workdir or stack.enter_context(
                tempfile.TemporaryDirectory(prefix="corral-cli-")
            )
            process = await self._spawn(model, cwd)
            try:
                async for chunk in self._answer(process, prompt_text(messages)):
                    yield chunk
            finally:
                await _end(process)

    async def _spawn(self, model: str, cwd: str) -> asyncio.subprocess.Process:
        argv = self._invocation.argv(model)
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=cwd,
                start_new_session=True,  # its own process group, killed whole on cancel
            )
        except OSError as exc:
            raise BackendUnavailable(f"cannot run {argv[0]!r}: {exc.strerror}") from None

    async def _answer(
        self, process: asyncio.subprocess.Process, prompt: str
    ) -> AsyncIterator[Chunk]:
        # All three are pipes (see _spawn).
        assert process.stdin is not None
        assert process.stdout is not None
        assert process.stderr is not None
        feeding = asyncio.create_task(_feed(process.stdin, prompt))
        stderr = asyncio.create_task(_tail(process.stderr))
        invocation = self._invocation
        pieces = 0
        unparsed = 0
        try:
            async for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip("\r\n")
                if pieces == 0 and rate_limit_in(line, invocation):
                    raise _rate_limited(line)
                if invocation.output == "jsonl":
                    text = text_of_json_line(line, invocation)
                    if text is None:
                        unparsed += not line.lstrip().startswith("{")
                        continue
                else:
                    # Lines, with the newline between them kept and the last one dropped.
                    text = line if pieces == 0 else "\n" + line
                if text:
                    pieces += 1
                    yield Chunk(text)
            code = await process.wait()
            await feeding
            errors = await stderr
        finally:
            feeding.cancel()
            stderr.cancel()
        if code != 0:
            raise _failed_exit(invocation, code, errors)
        if pieces == 0 and unparsed:
            raise BackendProtocolError(
                f"{invocation.command[0]!r} printed no JSON line with text at "
                f"{'.'.join(invocation.text_path)}"
            )
        yield Chunk("", done=True, finish_reason="stop", completion_tokens=pieces)


async def _feed(stdin: asyncio.StreamWriter, prompt: str) -> None:
    """Write the prompt and close stdin; a CLI that exits without reading it is no error."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        stdin.write(prompt.encode())
        await stdin.drain()
        stdin.close()


async def _tail(stream: asyncio.StreamReader) -> str:
    """The last few KB of stderr (read throughout, so a chatty CLI never blocks on a pipe)."""
    kept = b""
    while chunk := await stream.read(4096):
        kept = (kept + chunk)[-_STDERR_KEPT:]
    return kept.decode(errors="replace")


def _rate_limited(text: str) -> BackendRateLimited:
    wait = retry_after_in(text)
    when = f", resets in {wait:.0f} s" if wait is not None else ""
    return BackendRateLimited(f"the CLI is rate limited{when}: {scrub_secrets(text)[:200]}", wait)


def _failed_exit(
    invocation: CliInvocation, code: int, stderr: str
) -> BackendRateLimited | BackendUnavailable:
    program = invocation.command[0]
    if rate_limit_in(stderr, invocation):
        lines = [ln for ln in stderr.splitlines() if ln.strip()]
        return _rate_limited(lines[-1] if lines else stderr)
    if code in (126, 127):
        return BackendUnavailable(f"{program!r} could not be run (exit {code})")
    last = next((ln for ln in reversed(stderr.splitlines()) if ln.strip()), "")
    detail = f": {scrub_secrets(last)[:200]}" if last else ""
    return BackendUnavailable(f"{program!r} exited with {code}{detail}")


async def _end(process: asyncio.subprocess.Process) -> None:
    """Stop the CLI and whatever it started: SIGTERM to its group, SIGKILL after a grace."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(process.wait()), KILL_GRACE_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
