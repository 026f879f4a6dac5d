"""What a front door refuses before anything reaches Redis."""

from __future__ import annotations

from broker.errors import RequestTooLarge
from broker.schemas import JobSpec


def prompt_bytes(spec: JobSpec) -> int:
    """The prompt's size as it travels: every message's (or embed input's) text, UTF-8
    encoded, and its images (base64)."""
    return sum(
        len(m.content.encode()) + sum(len(i) for i in m.images) for m in spec.messages
    ) + sum(len(text.encode()) for text in spec.inputs)


LIMIT_SETTING = "CORRAL_MAX_PROMPT_BYTES or max_prompt_bytes in corral.yaml"


def human_bytes(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MiB" if n >= 1024 * 1024 else f"{n / 1024:.0f} KiB"


def check_prompt_size(spec: JobSpec, limit: int) -> None:
    """Raise ``RequestTooLarge`` naming the size, the limit and the setting that raises it."""
    size = prompt_bytes(spec)
    if size > limit:
        raise RequestTooLarge(
            f"the prompt is {human_bytes(size)}, over the limit of {human_bytes(limit)}"
            f" ({LIMIT_SETTING})"
        )
