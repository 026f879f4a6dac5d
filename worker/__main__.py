"""``corral worker``: run a node worker (``python -m worker`` is the same)."""

from __future__ import annotations

import logging
import sys

import click

from broker.errors import CorralError
from broker.settings import build_settings, config_path, load_yaml_config
from worker.config import backend_spec, build_worker_config, require_keys
from worker.node import serve


def _split_tags(value: str | None) -> frozenset[str] | None:
    if not value:
        return None
    return frozenset(t.strip() for t in value.split(",") if t.strip())


@click.command(name="worker", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--name", help="Node name (default: the host name). Jobs reach it as @NAME.")
@click.option("--tags", help="Comma-separated capability tags, e.g. code,gpu.")
@click.option(
    "--ollama",
    "ollama_urls",
    multiple=True,
    metavar="URL",
    help="Front an Ollama server (repeatable).",
)
@click.option(
    "--openai-compat",
    "openai_urls",
    multiple=True,
    metavar="URL",
    help="Front an OpenAI-compatible server: llama.cpp, llamafile, vLLM, LM Studio.",
)
@click.option(
    "--anthropic",
    "providers",
    flag_value="anthropic",
    multiple=True,
    help="Front Anthropic's API with the key in ANTHROPIC_API_KEY.",
)
@click.option(
    "--google",
    "providers",
    flag_value="google",
    multiple=True,
    help="Front Google's Gemini API with the key in GEMINI_API_KEY (or GOOGLE_API_KEY).",
)
@click.option(
    "--openai-cloud",
    "providers",
    flag_value="openai-cloud",
    multiple=True,
    help="Front OpenAI's API with the key in OPENAI_API_KEY.",
)
@click.option(
    "--mistral",
    "providers",
    flag_value="mistral",
    multiple=True,
    help="Front Mistral's API with the key in MISTRAL_API_KEY.",
)
@click.option(
    "--deepseek",
    "providers",
    flag_value="deepseek",
    multiple=True,
    help="Front DeepSeek's API with the key in DEEPSEEK_API_KEY.",
)
@click.option(
    "--cloud",
    is_flag=True,
    help="Serve any cloud route (anthropic://, openai://...) whose provider key "
    "(ANTHROPIC_API_KEY, OPENAI_API_KEY...) is in this worker's environment.",
)
@click.option("--simulate", is_flag=True, help="Front the built-in simulated backend.")
@click.option(
    "--sim-first-token-ms",
    type=click.FloatRange(min=0),
    default=50.0,
    show_default=True,
    help="Simulated backend: time to first token.",
)
@click.option(
    "--sim-token-ms",
    type=click.FloatRange(min=0),
    default=20.0,
    show_default=True,
    help="Simulated backend: time between tokens.",
)
@click.option(
    "--sim-crash-on",
    metavar="TEXT",
    help="Simulated backend, chaos testing: kill the worker on a prompt containing TEXT.",
)
@click.option(
    "--sim-models",
    metavar="NAMES",
    help="Simulated backend: its models, comma-separated (sim-embed is an embedding model).",
)
@click.option(
    "--openai-embed-model",
    "openai_embed_models",
    multiple=True,
    metavar="MODEL",
    help="OpenAI-compatible backends: MODEL serves embeddings only (llama.cpp --embedding).",
)
@click.option(
    "--capacity",
    type=click.IntRange(1, 256),
    help="Parallel requests per backend (OLLAMA_NUM_PARALLEL and the like).",
)
@click.option("--broker", help="Redis URL (default: CORRAL_BROKER_URL).")
@click.option("--heartbeat", type=float, help="Seconds between heartbeats.")
@click.option(
    "--loglevel",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
def worker_command(
    name: str | None,
    tags: str | None,
    ollama_urls: tuple[str, ...],
    openai_urls: tuple[str, ...],
    providers: tuple[str, ...],
    cloud: bool,
    simulate: bool,
    sim_first_token_ms: float,
    sim_token_ms: float,
    sim_crash_on: str | None,
    sim_models: str | None,
    openai_embed_models: tuple[str, ...],
    capacity: int | None,
    broker: str | None,
    heartbeat: float | None,
    loglevel: str,
) -> None:
    """Run a node worker that consumes its own queue and fronts local LLM backends."""
    logging.basicConfig(
        level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = build_settings(broker_url=broker, heartbeat_interval_s=heartbeat)
        extra = {} if capacity is None else {"capacity": capacity}
        flag_backends = [backend_spec(kind="ollama", url=u, **extra) for u in ollama_urls]
        embedders = {"embed_models": openai_embed_models} if openai_embed_models else {}
        flag_backends += [
            backend_spec(kind="openai", url=u, **extra, **embedders) for u in openai_urls
        ]
        # A provider's base URL and key are its own (overridable in corral.yaml); only the
        # kind is a flag. The key is read from the environment when the backend is built.
        flag_backends += [backend_spec(kind=kind, **extra) for kind in dict.fromkeys(providers)]
        if simulate:
            flag_backends.append(
                backend_spec(
                    kind="simulated",
                    first_token_s=sim_first_token_ms / 1000,
                    token_s=sim_token_ms / 1000,
                    crash_on=sim_crash_on,
                    models=_split_models(sim_models),
                    **extra,
                )
            )
        yaml_section = load_yaml_config(config_path()).get("worker")
        config = build_worker_config(
            yaml_section if isinstance(yaml_section, dict) else None,
            name=name,
            tags=_split_tags(tags),
            backends=tuple(flag_backends) or None,
            cloud=True if cloud else None,
        )
        require_keys(config)
        code = serve(settings, config, loglevel=loglevel.upper())
    except CorralError as exc:
        click.echo(f"corral worker: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)


def _split_models(names: str | None) -> tuple[str, ...] | None:
    if names is None:
        return None
    return tuple(n.strip() for n in names.split(",") if n.strip()) or None


def main() -> None:
    worker_command(prog_name="corral worker")


if __name__ == "__main__":
    main()
