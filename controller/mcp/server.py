"""The MCP server: corral's cluster as tools and resources for an agent (mcp SDK, MCPServer).

Every tool is a thin translation onto ``AsyncCorralClient``. A failure corral foresaw (an
unknown model or node, nothing up, a backend that failed) becomes a tool error the agent can
read and act on (``isError``); the server itself never stops for one.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Annotated, Any

from mcp.server import NotificationOptions
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.subscriptions import InMemorySubscriptionBus
from mcp.types import CallToolResult, TextContent, ToolAnnotations
from mcp.types import Tool as MCPTool
from pydantic import Field

from broker.errors import CorralError
from broker.schemas import GenerationOptions
from controller.aclient import AsyncCorralClient
from controller.breaker import BreakerPhase
from controller.client import make_spec
from controller.fanout import fanout_candidates
from controller.mcp.changes import RememberListers, ToolListNotifier
from controller.mcp.describe import cluster_summary, model_rows, node_rows, status_text
from controller.mcp.embed_tool import add_embed_tool
from controller.mcp.jobs import JobBook, JobProgress, follow
from controller.mcp.targets import resolve_target
from controller.router import NodeState

_SUMMARY_MAX_AGE_S = 2.0
_READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)

INSTRUCTIONS = (
    "corral routes prompts to the LLMs of a home lab (Ollama, llama.cpp, cloud keys held by "
    "nodes). Delegate to it work a local or cheaper model can do (drafts, summaries, "
    "classification, code in a tagged node's speciality) or ask several models at once with "
    "fanout to compare answers. list_models and list_nodes say what is there now."
)

Prompt = Annotated[str, Field(description="The prompt (the user message).", min_length=1)]
Model = Annotated[
    str | None, Field(description="A model or alias (see list_models); default: router's pick.")
]
Node = Annotated[
    str | None,
    Field(description="Run on this named route (its node and model) or node (see list_nodes)."),
]
Tags = Annotated[
    list[str] | None, Field(description="Capability tags the node must have, e.g. ['code'].")
]
System = Annotated[str | None, Field(description="An optional system prompt.")]
MaxTokens = Annotated[int | None, Field(description="Stop after this many tokens.", ge=1)]
Temperature = Annotated[
    float | None,
    Field(description="Sampling temperature, 0 to 2 (low: focused; high: varied).", ge=0, le=2),
]
RetryPartial = Annotated[
    bool,
    Field(
        description="If the node fails after the answer began, start over on another node "
        "(the text restarts) instead of returning an error."
    ),
]


_ASK = (
    "Ask one model of the home-lab cluster and get its answer. The router picks the node "
    "(model already loaded, spare capacity) unless you pin a node or model. Returns the answer "
    "text, with routing {node, model, tier, reason} as structured content. With wait=false it "
    "returns a job_id at once: poll job_status and job_result (useful for long answers)."
)
_FANOUT = (
    "Send one prompt to several models or several nodes at once and get one answer each, side "
    "by side: compare models, or get a second opinion. Give models, nodes, or count (the best "
    "COUNT nodes, optionally for one model)."
)
_WITH_CLUSTER = {"ask": _ASK, "fanout": _FANOUT}


class CorralServer(MCPServer[Any]):
    """An MCPServer whose ``ask`` and ``fanout`` descriptions list the cluster as it is when
    the agent lists the tools (a node that joined since start-up is in them)."""

    def __init__(self, client: AsyncCorralClient, nodes_at_start: Sequence[NodeState]) -> None:
        self._client = client
        self._summary = cluster_summary(nodes_at_start, client.settings.aliases)
        bus = InMemorySubscriptionBus()
        listers = RememberListers()
        super().__init__(
            "corral",
            instructions=INSTRUCTIONS + "\n" + self._summary,
            log_level="WARNING",
            subscriptions=bus,
            middleware=[listers],
        )
        self.changes = ToolListNotifier(client, bus, listers, self._summary)
        # MCPServer runs its transports with default notification options, which would not
        # declare tools.listChanged to handshake-era clients; this server does send it.
        lowlevel = self._lowlevel_server
        declare = lowlevel.create_initialization_options

        def with_list_changed(
            notification_options: NotificationOptions | None = None, *args: Any, **kwargs: Any
        ) -> Any:
            return declare(NotificationOptions(tools_changed=True), *args, **kwargs)

        lowlevel.create_initialization_options = with_list_changed  # type: ignore[method-assign]

    async def list_tools(self) -> list[MCPTool]:
        try:
            nodes = await self._client.nodes(max_age_s=_SUMMARY_MAX_AGE_S)
            self._summary = cluster_summary(nodes, self._client.settings.aliases)
        except CorralError:
            pass  # Redis is away for now: the last summary read stands
        return [
            tool.model_copy(update={"description": f"{_WITH_CLUSTER[tool.name]}\n{self._summary}"})
            if tool.name in _WITH_CLUSTER
            else tool
            for tool in await super().list_tools()
        ]


def build_server(
    client: AsyncCorralClient, book: JobBook, nodes_at_start: Sequence[NodeState]
) -> CorralServer:
    """The server: every tool and resource over ``client``."""
    server = CorralServer(client, nodes_at_start)

    @server.tool(description=_ASK)
    async def ask(
        prompt: Prompt,
        ctx: Context,
        model: Model = None,
        node: Node = None,
        tags: Tags = None,
        system: System = None,
        max_tokens: MaxTokens = None,
        temperature: Temperature = None,
        retry_partial: RetryPartial = False,
        session: Annotated[
            str | None,
            Field(
                description="Continue this conversation: its history is sent along and the "
                "node that holds it answers again. Any id of your choosing.",
                max_length=128,
            ),
        ] = None,
        wait: Annotated[
            bool, Field(description="false: return the job id at once and poll.")
        ] = True,
    ) -> CallToolResult:
        try:
            target = await resolve_target(client, node, model)
            spec = make_spec(
                prompt,
                node=target.node,
                model=target.model,
                route=target.route,
                route_url=target.route_url,
                tags=frozenset(tags or ()),
                system=system,
                options=GenerationOptions(max_tokens=max_tokens, temperature=temperature),
                session=session,
                retry_partial=retry_partial,
                max_attempts=client.settings.max_attempts,
                first_token_timeout_s=client.settings.first_token_timeout_s,
            )
            run = await client.submit(spec)
        except CorralError as exc:
            raise ToolError(str(exc)) from None
        if not wait:
            progress = book.start(run, pinned=node is not None)
            return _result(
                f"job {run.job_id} started on {run.candidate.node}; "
                "poll job_status or job_result with this job_id",
                progress.summary(),
            )
        progress = await follow(
            client,
            run,
            pinned=node is not None,
            on_token=_progress_reporter(ctx, max_tokens),
        )
        return _answer(progress)

    @server.tool(description=_FANOUT)
    async def fanout(
        prompt: Prompt,
        ctx: Context,
        models: Annotated[
            list[str] | None, Field(description="Models or aliases, one answer each.")
        ] = None,
        nodes: Annotated[list[str] | None, Field(description="Nodes, one answer each.")] = None,
        count: Annotated[
            int | None,
            Field(description="Instead of a list: the best COUNT nodes, one answer each.", ge=1),
        ] = None,
        model: Model = None,
        max_tokens: MaxTokens = None,
        temperature: Temperature = None,
    ) -> CallToolResult:
        if sum(1 for given in (models, nodes, count) if given) != 1:
            raise ToolError("give one of models, nodes (a list of one or more) or count")
        if model is not None and count is None:
            raise ToolError("model goes with count (with models, list the models instead)")
        if count is not None:
            nodes = await _best_nodes(client, prompt, model, count)
        targets = [("model", m) for m in models or ()] + [("node", n) for n in nodes or ()]
        report = _progress_reporter(ctx, max_tokens and max_tokens * len(targets))
        tokens = [0] * len(targets)

        async def one(index: int, kind: str, target: str) -> dict[str, Any]:
            async def counted(progress: JobProgress) -> None:
                tokens[index] = progress.tokens
                await report(progress, sum(tokens), target)

            try:
                spec = make_spec(
                    prompt,
                    model=target if kind == "model" else model,
                    node=target if kind == "node" else None,
                    options=GenerationOptions(max_tokens=max_tokens, temperature=temperature),
                    max_attempts=client.settings.max_attempts,
                    first_token_timeout_s=client.settings.first_token_timeout_s,
                )
                run = await client.submit(spec)
            except CorralError as exc:
                return {kind: target, "error": str(exc), "answer": ""}
            progress = await follow(client, run, pinned=kind == "node", on_token=counted)
            return {
                kind: target,
                "job_id": progress.job_id,
                "answer": progress.text,
                "routing": progress.routing(),
                "error": progress.error,
            }

        results = await asyncio.gather(*(one(i, k, t) for i, (k, t) in enumerate(targets)))
        if all(r["error"] for r in results):
            raise ToolError("every job failed: " + "; ".join(_fanout_heading(r) for r in results))
        text = "\n\n".join(f"## {_fanout_heading(r)}\n{r['answer']}" for r in results)
        return _result(text, {"results": results})

    _add_lookups(server, client, book)
    add_embed_tool(server, client)
    return server


def _add_lookups(server: MCPServer[Any], client: AsyncCorralClient, book: JobBook) -> None:
    """The read-only tools and the status resources (the aliases in force at each call)."""

    @server.tool(
        description="The models the cluster can run now, which nodes hold each and where "
        "it is loaded (no swap needed), and the configured aliases.",
        annotations=_READ_ONLY,
    )
    async def list_models() -> CallToolResult:
        rows = model_rows(await _nodes(client), client.settings.aliases)
        return _result(json.dumps(rows, indent=1), {"models": rows})

    @server.tool(
        description="The cluster's nodes: up or down, tags (what each is good for), "
        "backends, models, load and capacity.",
        annotations=_READ_ONLY,
    )
    async def list_nodes() -> CallToolResult:
        rows = node_rows(await _nodes(client))
        return _result(json.dumps(rows, indent=1), {"nodes": rows})

    @server.tool(
        description="A job's state (queued, running, done, failed, cancelled), tokens so "
        "far and routing; any job id corral knows, from ask with wait=false or elsewhere.",
        annotations=_READ_ONLY,
    )
    async def job_status(job_id: Annotated[str, Field(min_length=1)]) -> CallToolResult:
        try:
            progress = await book.status(job_id)
        except CorralError as exc:
            raise ToolError(str(exc)) from None
        return _result(
            f"job {job_id}: {progress.status}, {progress.tokens} tokens", progress.summary()
        )

    @server.tool(
        description="A job's answer: waits up to timeout_s for it to finish, then returns "
        "the text (the text so far, with status running, if it has not finished).",
        annotations=_READ_ONLY,
    )
    async def job_result(
        job_id: Annotated[str, Field(min_length=1)],
        timeout_s: Annotated[float, Field(gt=0, le=3600)] = 60.0,
    ) -> CallToolResult:
        try:
            progress = await book.result(job_id, timeout_s)
        except CorralError as exc:
            raise ToolError(str(exc)) from None
        return _answer(progress)

    @server.tool(
        description="Stop a job (one started with wait=false, say); a no-op once it is over.",
        annotations=ToolAnnotations(destructive_hint=True, idempotent_hint=True),
    )
    async def job_cancel(job_id: Annotated[str, Field(min_length=1)]) -> CallToolResult:
        try:
            known = await client.cancel(job_id)
        except CorralError as exc:
            raise ToolError(str(exc)) from None
        if not known:
            raise ToolError(f"no job {job_id} (unknown, or older than the replay window)")
        return _result(f"cancel sent to job {job_id}", {"job_id": job_id, "cancel_sent": True})

    @server.resource(
        "corral://status", name="status", mime_type="text/plain", description="Nodes and aliases."
    )
    async def status() -> str:
        try:
            return status_text(await client.nodes(), client.settings.aliases)
        except CorralError as exc:
            return f"corral cannot read the cluster: {exc}"

    @server.resource(
        "corral://status.json",
        name="status.json",
        mime_type="application/json",
        description="Nodes (as list_nodes) and aliases, as JSON; config_problem says why the "
        "last edit of corral.yaml was refused, if it was.",
    )
    async def status_json() -> str:
        try:
            document: dict[str, Any] = {"nodes": node_rows(await client.nodes())}
        except CorralError as exc:
            document = {"error": str(exc), "nodes": []}
        document["aliases"] = {a: list(t) for a, t in client.settings.aliases.items()}
        document["config_problem"] = client.config.problem if client.config else None
        return json.dumps(document)


async def _best_nodes(
    client: AsyncCorralClient, prompt: str, model: str | None, count: int
) -> list[str]:
    """The ``count`` best distinct nodes for the prompt, as ``corral ask --fanout`` picks
    them (controller.fanout's planning); a tool error when none can serve it."""
    try:
        spec = make_spec(prompt, model=model)
        view = await client.cluster()
        blocked = {
            target
            for target, phase in client.breaker_phases(view).items()
            if phase is BreakerPhase.OPEN
        }
        chosen = fanout_candidates(
            spec, view.nodes, count, blocked, aliases=client.settings.aliases
        )
    except CorralError as exc:
        raise ToolError(str(exc)) from None
    return [candidate.node for candidate in chosen]


async def _nodes(client: AsyncCorralClient) -> list[NodeState]:
    try:
        return await client.nodes()
    except CorralError as exc:
        raise ToolError(str(exc)) from None


def _progress_reporter(ctx: Context, total: int | None) -> _Reporter:
    return _Reporter(ctx, total)


class _Reporter:
    """Sends a progress notification per token (a no-op when the caller gave no token)."""

    def __init__(self, ctx: Context, total: int | None) -> None:
        self._ctx = ctx
        self._total = total

    async def __call__(
        self, progress: JobProgress, count: int | None = None, label: str | None = None
    ) -> None:
        """``count``: tokens of every job so far (fanout); ``label``: whose token this is."""
        text = progress.parts[-1] if progress.parts else ""
        await self._ctx.report_progress(
            count if count is not None else progress.tokens,
            self._total,
            f"[{label}] {text}" if label else text,
        )


def _answer(progress: JobProgress) -> CallToolResult:
    if progress.status in ("failed", "cancelled"):
        partial = f"\n(partial answer: {progress.text})" if progress.text else ""
        raise ToolError(f"job {progress.job_id} {progress.status}: {progress.error}{partial}")
    text = progress.text if progress.finished else f"(still running) {progress.text}"
    return _result(
        text,
        {
            "job_id": progress.job_id,
            "status": progress.status,
            "routing": progress.routing(),
            "tokens": progress.tokens,
        },
    )


def _fanout_heading(result: dict[str, Any]) -> str:
    target = result.get("model") or result.get("node")
    routing = result.get("routing")
    where = f" on {routing['node']} ({routing['model']})" if routing else ""
    error = f" - failed: {result['error']}" if result["error"] else ""
    return f"{target}{where}{error}"


def _result(text: str, structured: dict[str, Any]) -> CallToolResult:
    return CallToolResult(
        content=[TextContent(type="text", text=text)], structured_content=structured
    )


__all__ = ["INSTRUCTIONS", "CorralServer", "build_server"]
