"""The chat REPL's logic without a terminal: the history window, the transcript, the input."""

from __future__ import annotations

import pytest

from broker.errors import ConfigError
from broker.schemas import ChatMessage
from controller.cli.chat_input import ROUTES_HOW, Command, Prompt, help_text, parse_line
from controller.cli.conversation import Conversation, answer_summary
from controller.client import make_spec, with_history

T0 = 1_796_184_000.0  # 2026-12-02 04:00:00 UTC


def user(text: str) -> ChatMessage:
    return ChatMessage(role="user", content=text)


def assistant(text: str) -> ChatMessage:
    return ChatMessage(role="assistant", content=text)


def chatted(exchanges: int, **kwargs: object) -> Conversation:
    conv = Conversation(started_at=T0, **kwargs)  # type: ignore[arg-type]
    for i in range(exchanges):
        conv.add_answer(f"q{i}", f"a{i}", node="alpha", model="sim-small", at=T0 + i)
    return conv


# --- the history window ----------------------------------------------------------------------


def test_a_new_conversation_sends_the_system_prompt_and_the_question_alone() -> None:
    conv = Conversation(system="be brief")
    assert conv.messages_for("hi") == (ChatMessage(role="system", content="be brief"), user("hi"))


def test_the_last_ten_messages_go_with_a_prompt_after_the_system_prompt() -> None:
    conv = chatted(7, system="be brief")  # 14 messages: the first two exchanges fall out
    sent = conv.messages_for("next")
    assert sent[0] == ChatMessage(role="system", content="be brief")
    assert sent[1:-1] == tuple(m for i in range(2, 7) for m in (user(f"q{i}"), assistant(f"a{i}")))
    assert sent[-1] == user("next")
    assert len(sent) == 12


def test_the_window_can_be_narrowed_or_shut() -> None:
    assert chatted(3, window=2).context() == (user("q2"), assistant("a2"))
    assert chatted(3, window=0).context() == ()


def test_the_spec_sent_carries_the_window_in_order_with_the_new_system_prompt_first() -> None:
    conv = chatted(2, system="old")
    conv.set_system("new")
    spec = with_history(conv.context(), make_spec("q2", system=conv.system, node="beta"))
    assert spec.messages == conv.messages_for("q2")
    assert spec.messages[0].content == "new" and spec.node == "beta"


def test_a_cancelled_answer_with_text_stays_in_the_context_one_without_text_does_not() -> None:
    conv = chatted(1)
    conv.add_unfinished("long one", "It began", "cancelled after 2 words", node="beta")
    assert conv.context()[-2:] == (user("long one"), assistant("It began"))
    conv.add_unfinished("another", "", "failed: no node named 'pi9'")
    assert conv.context()[-1] == assistant("It began")  # no unanswered question dangles


def test_clear_stops_sending_the_history_but_the_transcript_keeps_it() -> None:
    conv = chatted(2)
    assert conv.clear(at=T0 + 9) == 4
    assert conv.messages_for("fresh") == (user("fresh"),)
    assert "q1" in conv.transcript() and "history cleared" in conv.transcript()


def test_history_lines_mark_what_the_next_prompt_sends() -> None:
    lines = chatted(3, window=2).history_lines()
    assert lines[0].startswith("  you: q0")
    assert lines[-3:-1] == ["* you: q2", "* alpha · sim-small: a2"]
    assert lines[-1] == "(the next prompt sends the 2 marked * of 6)"
    assert Conversation().history_lines() == ["(no history: the next prompt goes alone)"]


def test_history_lines_shorten_long_messages_to_the_width() -> None:
    conv = Conversation()
    conv.add_answer("x " * 200, "y", node="n", model="m")
    first = conv.history_lines(width=40)[0]
    assert len(first) == 40 and first.endswith("…")


# --- the transcript --------------------------------------------------------------------------


def test_the_transcript_is_markdown_with_who_answered_and_what_went_wrong() -> None:
    conv = Conversation(started_at=T0)
    conv.set_system("be brief", at=T0)
    conv.add_answer("why is the sky blue", "Rayleigh.\n", node="beta", model="sim-small", at=T0)
    conv.add_unfinished(
        "tell me more", "It scatters", "cancelled after 2 words", node="alpha", at=T0 + 65
    )
    assert conv.transcript() == (
        "# corral chat, 2026-12-02 04:00 UTC\n"
        "\n"
        "*04:00:00 · system prompt set: be brief*\n"
        "\n"
        "## you (04:00:00)\n"
        "\n"
        "why is the sky blue\n"
        "\n"
        "## beta · sim-small (04:00:00)\n"
        "\n"
        "Rayleigh.\n"
        "\n"
        "## you (04:01:05)\n"
        "\n"
        "tell me more\n"
        "\n"
        "## alpha (04:01:05)\n"
        "\n"
        "It scatters\n"
        "\n"
        "*(cancelled after 2 words)*\n"
    )


def test_the_summary_line_names_node_model_first_token_and_tokens() -> None:
    line = answer_summary("beta", "sim-small", 12.4, 23, 57, 3)
    assert line == (
        "beta · sim-small · first token 12 ms · 23 tokens · prompt 57 tokens · 3 messages sent"
    )
    assert answer_summary("beta", "m", None, 0, None, None) == (
        "beta · m · first token - · 0 tokens"
    )


# --- what a typed line means -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        ("why is the sky blue", Prompt("why is the sky blue")),
        ("  @beta  and in winter? ", Prompt("and in winter?", "beta")),
        ("/model sim-large", Command("model", "sim-large")),
        ("/model", Command("model")),
        ("/SYSTEM You are terse. ", Command("system", "You are terse.")),
        ("/save ~/notes/chat.md", Command("save", "~/notes/chat.md")),
        ("/route add coder @gpu1", Command("route", "add coder @gpu1")),
        ("/quit", Command("exit")),
        ("//etc/hosts explained", Prompt("/etc/hosts explained")),
        ("   ", None),
    ],
)
def test_lines_parse_into_prompts_and_commands(line: str, parsed: object) -> None:
    assert parse_line(line) == parsed


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("/frobnicate", r"unknown command /frobnicate \(/help lists them\)"),
        ("@beta", "nothing to ask after @beta"),
        ("@be/ta hi", "is not a node name"),
    ],
)
def test_bad_lines_say_what_is_wrong(line: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse_line(line)


def test_help_lists_every_command_and_the_route_stub_says_routes_are_not_there_yet() -> None:
    text = help_text()
    for name in ("/model", "/system", "/history", "/save", "/clear", "/help", "/nodes", "/route"):
        assert name in text
    assert "corral route add NAME URL" in ROUTES_HOW
