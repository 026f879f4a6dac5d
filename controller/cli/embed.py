"""``corral embed [--model M] TEXT...``: one vector per text, printed as JSON."""

from __future__ import annotations

import sys

import click

from broker.errors import ConfigError, CorralError
from controller.cli.common import fail, print_json, settings_from
from controller.client import CorralClient
from controller.prompt import parse_tags


@click.command("embed")
@click.argument("texts", nargs=-1, required=True)
@click.option("--model", help="Embedding model (or alias), e.g. nomic-embed-text.")
@click.option("--node", help="Run on this node.")
@click.option("--tag", "tags", multiple=True, help="Required capability tag (repeatable, or a,b).")
@click.pass_context
def embed_command(
    ctx: click.Context,
    texts: tuple[str, ...],
    model: str | None,
    node: str | None,
    tags: tuple[str, ...],
) -> None:
    """Embed each TEXT (one batch, one job) on a node with an embedding model and print
    {"model", "node", "job_id", "prompt_tokens", "embeddings": [[...], ...]}. A TEXT of `-`
    reads the texts from standard input, one per line."""
    inputs = [line for line in sys.stdin.read().splitlines() if line] if texts == ("-",) else texts
    try:
        if not inputs:
            raise ConfigError("nothing to embed: give one or more TEXTs")
        with CorralClient(settings_from(ctx)) as client:
            result = client.embed(inputs, model=model, node=node, tags=parse_tags(tags))
    except CorralError as exc:
        fail(exc)
    print_json(
        {
            "model": result.model,
            "node": result.node,
            "job_id": result.job_id,
            "prompt_tokens": result.usage.prompt_tokens,
            "embeddings": [list(v) for v in result.embeddings],
        }
    )
