"""Which cloud provider a bare model name belongs to (``claude-sonnet-4-5`` -> anthropic).

Used only after the fleet's own models: a job naming a model no node holds, no route and no
alias goes to that provider's endpoint through a ``--cloud`` worker (or a node fronting the
provider). Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from broker.errors import ConfigError
from broker.route_url import CLOUD_SCHEMES, parse_route_url

# Each provider's own naming, as its model list shows it. OpenAI's reasoning models are
# ``o`` and a digit (o1, o3-mini, o4-mini): a bare ``o*`` would also take local models such as
# ``orca-mini``, which a fleet may simply not hold right now.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(gpt-|chatgpt-|o[0-9])"), "openai"),
    (re.compile(r"^claude-"), "anthropic"),
    (re.compile(r"^gemini-"), "gemini"),
    (re.compile(r"^(mistral-|codestral-|magistral-|ministral-|pixtral-)"), "mistral"),
    (re.compile(r"^deepseek-(chat|reasoner)"), "deepseek"),
)


def provider_scheme(model: str) -> str | None:
    """The route URL scheme of the provider whose naming ``model`` follows, if any.

    ``deepseek-chat`` and ``deepseek-reasoner`` are DeepSeek's API models; other ``deepseek-*``
    names (``deepseek-r1:7b``, ``deepseek-coder``) are open weights people run locally."""
    name = model.strip().lower()
    return next((scheme for pattern, scheme in _PATTERNS if pattern.match(name)), None)


def provider_url(model: str, overrides: Mapping[str, str]) -> str | None:
    """Where a bare ``model`` goes: the provider's official endpoint (``anthropic://``), or the
    URL configured for that scheme in ``provider_urls`` (a proxy, or a test's fake)."""
    scheme = provider_scheme(model)
    if scheme is None:
        return None
    return overrides.get(scheme, f"{scheme}://")


def check_provider_urls(urls: Mapping[str, str]) -> dict[str, str]:
    """``provider_urls`` as configured: each key a cloud scheme, each URL that provider's."""
    checked: dict[str, str] = {}
    for scheme, url in urls.items():
        if scheme not in CLOUD_SCHEMES:
            raise ConfigError(
                f"provider_urls: {scheme!r} is not a cloud provider "
                f"({', '.join(sorted(CLOUD_SCHEMES))})"
            )
        target = parse_route_url(url)
        if target.kind != CLOUD_SCHEMES[scheme]:
            raise ConfigError(f"provider_urls: {scheme} needs a {scheme}:// URL, got {url!r}")
        checked[scheme] = url
    return checked
