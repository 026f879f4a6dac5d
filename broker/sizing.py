"""How much memory a model needs once loaded: one estimate for the controller and the node."""

from __future__ import annotations

# A loaded model takes its weights plus the KV cache for its context and the runtime's
# buffers. For the quantised GGUF models a home lab runs, Ollama's own estimates come out at
# roughly a fifth above the file size at default context lengths.
LOAD_OVERHEAD = 1.2


def estimate_load_bytes(size_on_disk: int) -> int:
    return int(size_on_disk * LOAD_OVERHEAD)


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def fit_problem(model: str, size_on_disk: int, free_bytes: int) -> str | None:
    """Why ``model`` would not fit in ``free_bytes``, or None if it would."""
    needed = estimate_load_bytes(size_on_disk)
    if needed <= free_bytes:
        return None
    return (
        f"{model} needs about {gigabytes(needed)} loaded ({gigabytes(size_on_disk)} on disk "
        f"x {LOAD_OVERHEAD}) but the node has {gigabytes(free_bytes)} free; --force to try anyway"
    )
