"""A fake agent CLI: a Python script a test writes to disk and a ``cli`` backend runs.

It behaves like ``claude -p`` or ``codex exec`` from the outside: it reads the prompt on
stdin, takes ``--model NAME``, and answers on stdout. Its mode is its first argument:

- ``stream``: a few lines, ``LINE_DELAY_S`` apart, the last naming the model and the prompt.
- ``jsonl``: the same lines as Claude Code's ``stream-json`` objects (and a few without text).
- ``ratelimit``: a usage-limit message naming a reset time on stdout, exit 1.
- ``ratelimit-stderr``: the same on stderr, exit 1.
- ``fail``: an error on stderr that echoes ``$FAKE_CLI_TOKEN`` (a secret), exit 2.
- ``@PATH``: the mode written in the file PATH, read on each run (a test switches it).
- ``hang``: starts a child in its own process group, writes both pids to ``$FAKE_CLI_PIDS``,
  prints one line, then sleeps until killed.
"""

from __future__ import annotations

import sys
from pathlib import Path

LINES = ("one", "two", "three")
LINE_DELAY_S = 0.05
RATE_LIMIT_MESSAGE = "Claude AI usage limit reached. Try again in 45 minutes."

SCRIPT = r"""
import json, os, subprocess, sys, time

mode = sys.argv[1]
if mode.startswith("@"):  # the mode is read from this file on each run: a test switches it
    with open(mode[1:]) as f:
        mode = f.read().strip()
args = sys.argv[2:]
model = args[args.index("--model") + 1] if "--model" in args else "default"
prompt = sys.stdin.read()

def say(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

if mode == "stream":
    for word in LINES:
        say(word)
        time.sleep(DELAY)
    say(f"model={model} prompt={prompt}")
elif mode == "jsonl":
    say(json.dumps({"type": "system", "subtype": "init", "model": model}))
    for word in LINES:
        delta = {"type": "content_block_delta", "delta": {"type": "text_delta", "text": word + " "}}
        say(json.dumps({"type": "stream_event", "event": delta}))
        time.sleep(DELAY)
    say(json.dumps({"type": "result", "result": "ignored"}))
elif mode == "ratelimit":
    say(RATE)
    sys.exit(1)
elif mode == "ratelimit-stderr":
    sys.stderr.write("working...\n" + RATE + "\n")
    sys.exit(1)
elif mode == "fail":
    token = os.environ.get("FAKE_CLI_TOKEN", "")
    sys.stderr.write("fatal: login refused for token " + token + "\n")
    sys.exit(2)
elif mode == "hang":
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(os.environ["FAKE_CLI_PIDS"], "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    say("thinking")
    time.sleep(600)
"""


def write_fake_cli(directory: Path) -> Path:
    """Write the script into ``directory``; run it as ``python SCRIPT MODE [--model M]``."""
    path = directory / "fake_agent_cli.py"
    header = f"LINES = {LINES!r}\nDELAY = {LINE_DELAY_S!r}\nRATE = {RATE_LIMIT_MESSAGE!r}\n"
    path.write_text(header + SCRIPT)
    return path


def fake_cli_command(script: Path, mode: str) -> tuple[str, ...]:
    return (sys.executable, str(script), mode)
