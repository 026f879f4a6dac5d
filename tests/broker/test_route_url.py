"""Route URLs read into a backend kind and the base URL an adapter calls."""

from __future__ import annotations

import pytest

from broker.errors import ConfigError
from broker.route_url import parse_route_url


@pytest.mark.parametrize(
    ("url", "kind", "base_url", "cloud"),
    [
        ("ollama://pi2", "ollama", "http://pi2:11434", False),
        ("ollama://pi2:11500", "ollama", "http://pi2:11500", False),
        ("http://gpu1.lan", "ollama", "http://gpu1.lan:11434", False),
        ("https://gpu1.lan:443", "ollama", "https://gpu1.lan:443", False),
        ("llamafile://127.0.0.1", "openai", "http://127.0.0.1:8080", False),
        ("llamacpp://gpu1:9000", "openai", "http://gpu1:9000", False),
        ("anthropic://", "anthropic", "https://api.anthropic.com", True),
        ("gemini://", "google", "https://generativelanguage.googleapis.com", True),
        ("openai://", "openai-cloud", "https://api.openai.com/v1", True),
        ("mistral://", "mistral", "https://api.mistral.ai/v1", True),
        ("deepseek://", "deepseek", "https://api.deepseek.com/v1", True),
        ("anthropic://proxy.lan/anthropic", "anthropic", "https://proxy.lan/anthropic", True),
        ("anthropic+http://127.0.0.1:8787", "anthropic", "http://127.0.0.1:8787", True),
        ("openai+http://127.0.0.1:4000/v1", "openai-cloud", "http://127.0.0.1:4000/v1", True),
    ],
)
def test_each_scheme_reads_as_its_backend(url: str, kind: str, base_url: str, cloud: bool) -> None:
    target = parse_route_url(url)
    assert (target.kind, target.base_url, target.cloud) == (kind, base_url, cloud)


def test_a_cloud_route_names_the_key_a_worker_needs() -> None:
    assert parse_route_url("gemini://").key_variables == ("GEMINI_API_KEY", "GOOGLE_API_KEY")
    assert parse_route_url("ollama://pi2").key_variables == ()


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://pi2", "unknown route scheme"),
        ("pi2:11434", "unknown route scheme"),
        ("ollama://", "names no host"),
        ("anthropic+http://", "needs HOST:PORT"),
        ("anthropic+ftp://x", r"did you mean anthropic\+http://"),
        ("openai://user:sk-secret@proxy.lan", "no credentials"),
        ("ollama://pi2?key=sk-secret", "no query string"),
        ("ollama://pi2:notaport", "malformed"),
    ],
)
def test_a_bad_url_is_a_clear_error_that_never_echoes_a_secret(url: str, says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        parse_route_url(url)
    assert "sk-secret" not in str(caught.value)
