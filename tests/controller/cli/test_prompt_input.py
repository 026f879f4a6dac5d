"""How `corral ask` reads its prompt: words, `-` for standard input, or a pipe alone."""

from __future__ import annotations

import io

import pytest

from broker.errors import ConfigError, RequestTooLarge
from controller.cli.common import prompt_from


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_words_are_the_prompt_and_stdin_is_left_alone() -> None:
    stdin = io.StringIO("not read")
    assert prompt_from(("why", "is", "the", "sky", "blue"), stdin, 1024) == "why is the sky blue"
    assert stdin.tell() == 0


def test_a_pipe_alone_or_a_dash_reads_standard_input() -> None:
    assert prompt_from((), io.StringIO("piped question\n"), 1024) == "piped question"
    framed = prompt_from(("@pi2", "Summarise:", "-"), io.StringIO("line 1\nline 2\n"), 1024)
    assert framed == "@pi2 Summarise:\nline 1\nline 2"


def test_no_prompt_at_a_terminal_says_how_to_give_one() -> None:
    with pytest.raises(ConfigError, match=r"corral ask - < question.txt"):
        prompt_from((), Terminal(), 1024)


def test_two_dashes_and_empty_input_are_refused() -> None:
    with pytest.raises(ConfigError, match="only once"):
        prompt_from(("-", "-"), io.StringIO("x"), 1024)
    with pytest.raises(ConfigError, match="the prompt is empty"):
        prompt_from(("-",), io.StringIO("\n\n"), 1024)


def test_an_endless_pipe_is_cut_at_the_limit_and_refused() -> None:
    endless = io.StringIO("y" * 10_000)
    with pytest.raises(RequestTooLarge, match="over the limit of 2 KiB"):
        prompt_from(("-",), endless, 2048)
    assert endless.tell() == 2049  # read no further than needed to know
