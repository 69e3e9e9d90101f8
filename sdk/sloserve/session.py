"""A session runs programs against an endpoint; each stage call's requests carry its SLO.

Every LLM request is streamed so that the SDK measures TTFT and the gaps between tokens as the
client sees them, and reads the server's own outcome from the final chunk.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from openai import AsyncOpenAI

from sloserve._context import StageCallError, current_run
from sloserve._reassemble import Reassembler
from sloserve.app import Program
from sloserve.slo import SLO, Outcome, ThinkingSpan, judge, program_field
from sloserve.stage import Stage
from sloserve.tools import Tool, ToolCall, calls_schema, parse_calls

PROGRAM_HEADER = "x-slo-program"  # which program run a stage call belongs to


@dataclass
class RequestRecord:
    """One LLM request of a stage call, as measured by the client."""

    stage: str
    program: str
    run_id: int  # which program run it belongs to
    slo: SLO
    ttft_target_ms: float | None  # resolved by the server for slowdown targets
    outcome: Outcome  # judged on the client's token timeline
    server_outcome: dict[str, Any] | None  # the server's own "slo" field
    prompt_tokens: int
    completion_tokens: int
    tool_calls: list[str] = field(default_factory=list)  # names of the tools the model called
    run_arrival: float = 0.0  # when its program run started (Unix seconds)
    end: float = 0.0  # when its last chunk came (Unix seconds)
    deadline_ms: float | None = None  # its program's end-to-end deadline


@dataclass
class _ProgramRun:
    program: Program
    run_id: int
    session: Session
    called: list[str] = field(default_factory=list)  # stage names, in call order
    arrival: float = field(default_factory=time.time)  # when the run started (Unix seconds)

    @property
    def key(self) -> str:
        """Names this run to the server (header ``x-slo-program``): a replicated endpoint keeps its
        stages on one replica, which holds their shared prefix."""
        return f"{self.session.session_id}-{self.run_id}"

    def llm_for(self, stage: Stage) -> LLM:
        graph = self.program.graph
        if graph is not None and stage.name not in graph:
            raise StageCallError(
                f"program {self.program.name!r} called stage {stage.name!r}, which its declared graph "
                f"does not contain ({', '.join(graph.nodes)})"
            )
        self.called.append(stage.name)
        return LLM(self.session, self, stage)

    def program_field(self, stage: Stage) -> dict[str, Any]:
        """The call's ``slo.program`` body field: its run, program and stage, the run's arrival and
        deadline, and the stages the declared graph expects after this one (the server learns
        the rest, such as a loop's turns, from earlier runs)."""
        program = self.program
        return program_field(
            self.key, program.name, stage.name, self.arrival, program.deadline_ms, program.remaining_after(stage.name)
        )


class LLM:
    """The handle a stage receives; every call is one request tagged with the stage's SLO."""

    def __init__(self, session: Session, run: _ProgramRun, stage: Stage) -> None:
        self.session = session
        self.run = run
        self.stage = stage

    async def chat(self, messages: list[dict[str, Any]], **params: Any) -> str:
        """Send a chat request and return the reply's text."""
        message = await self.complete(messages, **params)
        return message.get("content") or ""

    async def tool_turn(
        self, messages: list[dict[str, Any]], tools: list[Tool] | None = None, **params: Any
    ) -> list[ToolCall]:
        """One turn of a tool-calling loop: the model must call tools, which then run locally.

        The assistant's calls and the tools' results are appended to ``messages``.
        """
        tools = list(self.session.tools.values()) if tools is None else tools
        if not tools:
            raise StageCallError(f"stage {self.stage.name!r} asked for a tool turn, but the app has no tools")
        by_name = {tool.name: tool for tool in tools}
        # The call streams as text, held to the calls' schema, and is parsed here: its first token
        # is seen when the engine makes it, and the turn is judged on the tokens of the whole call,
        # which is what the agent waits for. (With vLLM's required tool choice nothing streams
        # until its parser has the function's name, and the client would judge a later token.)
        extra_body = {**(params.pop("extra_body", None) or {}), "structured_outputs": {"json": calls_schema(tools)}}
        params = {**params, "tools": [tool.openai_schema() for tool in tools], "tool_choice": "none"}
        message = await self._send(messages, {**params, "extra_body": extra_body}, calls=True)
        calls = message.get("tool_calls") or []
        messages.append({"role": "assistant", "content": message.get("content") or "", "tool_calls": calls})
        results = []
        for call in calls:
            name, arguments = call["function"]["name"], call["function"]["arguments"]
            tool = by_name.get(name)
            result = await tool.call(arguments) if tool else f"error: no tool named {name!r}"
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
            results.append(ToolCall(name, arguments, result))
        return results

    async def complete(self, messages: list[dict[str, Any]], **params: Any) -> dict[str, Any]:
        """Send one streamed chat request; return the assembled assistant message as a dict."""
        return await self._send(messages, params)

    async def _send(
        self, messages: list[dict[str, Any]], params: dict[str, Any], calls: bool = False
    ) -> dict[str, Any]:
        """One streamed request, measured and recorded. ``calls``: the reply is a tool turn's calls
        written as text (``tool_turn``), returned as the message's ``tool_calls``."""
        if self.stage.max_tokens is not None:
            params.setdefault("max_tokens", self.stage.max_tokens)
        # The caller's own extra fields (a structured-output pattern, say) go beside the SLO's.
        extra_body = {
            **(params.pop("extra_body", None) or {}),
            "slo": {**self.stage.slo.to_json(), "program": self.run.program_field(self.stage)},
        }
        arrival = time.time()
        stream = await self.session.client.chat.completions.create(
            model=self.session.model,
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra_body,
            extra_headers={PROGRAM_HEADER: self.run.key},
            **params,
        )
        assembled, token_times, server_outcome, span = Reassembler(), [], None, ThinkingSpan()
        async for chunk in stream:
            data = chunk.model_dump(exclude_unset=True)
            if any(_has_output(choice) for choice in data.get("choices") or []):
                token_times.append(time.time())
                span.add_chunk(data)
            assembled.add(data)
            server_outcome = (chunk.model_extra or {}).get("slo", server_outcome)
        choices = assembled.response()["choices"]
        message = choices[0]["message"] if choices else {"role": "assistant", "content": ""}
        if calls:
            message = {**message, "content": "", "tool_calls": parse_calls(message.get("content") or "")}
        self._record(arrival, token_times, assembled, server_outcome, message, span.end)
        return message

    def _record(
        self,
        arrival: float,
        token_times: list[float],
        assembled: Reassembler,
        server: dict | None,
        message: dict[str, Any],
        thinking_tokens: int | None = None,
    ) -> None:
        slo = self.stage.slo
        ttft_target = (server or {}).get("ttft_target_ms", slo.ttft_ms)
        usage = assembled.usage or {}
        self.session.records.append(
            RequestRecord(
                stage=self.stage.name,
                program=self.run.program.name,
                run_id=self.run.run_id,
                slo=slo,
                ttft_target_ms=ttft_target,
                outcome=judge(
                    arrival,
                    token_times,
                    ttft_target,
                    slo.tpot_ms,
                    thinking_tpot_ms=slo.thinking_tpot_ms,
                    thinking_tokens=thinking_tokens,
                ),  # fmt: skip
                server_outcome=server,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
                tool_calls=[call["function"]["name"] for call in message.get("tool_calls") or []],
                run_arrival=self.run.arrival,
                end=time.time(),
                deadline_ms=self.run.program.deadline_ms,
            )
        )


def _has_output(choice: dict[str, Any]) -> bool:
    delta = choice.get("delta") or {}
    return bool(delta.get("content") or delta.get("tool_calls") or delta.get("reasoning_content"))


class Session:
    """Runs an app's programs against an OpenAI-compatible endpoint and records every request.

    Example::

        async with Session("http://127.0.0.1:8011/v1", tools=app.tools) as session:
            answer = await session.run(app.programs["solve"], "Why is the sky blue?")
        print(session.records)
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key: str | None = None,
        tools: dict[str, Tool] | None = None,
    ) -> None:
        self.client = AsyncOpenAI(base_url=base_url, api_key=api_key or "EMPTY", max_retries=0)
        self.model = model or ""
        self.tools = tools or {}
        self.records: list[RequestRecord] = []
        self.failures: dict[int, str] = {}  # run id -> the error that ended the run
        self._run_ids = itertools.count()
        self.session_id = uuid.uuid4().hex[:12]

    async def __aenter__(self) -> Session:
        if not self.model:
            models = await self.client.models.list()
            self.model = models.data[0].id
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.client.close()

    async def run(self, program: Program, *args: Any, **kwargs: Any) -> Any:
        """Run one program; its stage calls are recorded under a fresh run id (and the error that
        ended it, if one did, in ``failures``)."""
        run = _ProgramRun(program, next(self._run_ids), self)
        token = current_run.set(run)
        try:
            return await program(*args, **kwargs)
        except Exception as exc:
            self.failures[run.run_id] = type(exc).__name__
            raise
        finally:
            current_run.reset(token)
