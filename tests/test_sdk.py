"""The SDK surface without the engine: stages, programs, graphs, tools."""

from __future__ import annotations

import json

import pytest

from sloserve import App, ProgramGraphError, SLOError, StageCallError, stage
from sloserve.slo import SLO
from sloserve.tools import Tool


@stage(ttft="3x", tpot="50ms", max_tokens=32)
async def think(llm, question: str) -> str:
    return question


@stage(ttft="1s", tpot="100ms")
async def answer(llm, question: str, notes: str) -> str:
    return notes


def test_stage_carries_its_slo():
    assert think.slo == SLO(ttft_slowdown=3.0, tpot_ms=50.0)
    assert think.max_tokens == 32
    assert think.name == "think"


def test_bad_slo_in_a_decorator_fails_at_definition():
    with pytest.raises(SLOError, match="ttft"):

        @stage(ttft="soon")
        async def broken(llm):
            return ""


def test_stage_must_be_async_and_take_the_llm():
    with pytest.raises(TypeError, match="async"):
        stage(lambda llm: None)
    with pytest.raises(TypeError, match="LLM handle"):

        @stage(ttft="1s")
        async def no_llm():
            return ""


async def test_stage_called_outside_a_program_says_how_to_run_it():
    with pytest.raises(StageCallError, match="sloserve run"):
        await think("why?")


def test_program_graph_is_a_validated_dag():
    app = App("t")

    @app.program(graph={think: [], answer: [think]})
    async def solve(question: str) -> str:
        return question

    assert list(solve.graph.edges) == [("think", "answer")]
    assert set(solve.stages) == {"think", "answer"}


def test_graph_with_unknown_stage_names_it():
    app = App("t")
    with pytest.raises(ProgramGraphError, match="unknown stage\\(s\\) anser; known stages: answer, think"):
        app.program(graph={think: [], answer: [think], "anser": [think]})(_noop)


def test_graph_with_a_cycle_is_refused():
    app = App("t")
    with pytest.raises(ProgramGraphError, match="cycle: (think -> answer -> think|answer -> think -> answer)"):
        app.program(graph={think: [answer], answer: [think]})(_noop)


async def _noop() -> None:
    return None


def calculate(expression: str, precision: int = 2) -> str:
    """Evaluate an arithmetic expression."""
    return f"{round(eval(expression, {}), precision)}"  # noqa: S307 - test-only


def test_tool_schema_follows_the_signature():
    schema = Tool.from_function(calculate).openai_schema()
    assert schema["type"] == "function"
    function = schema["function"]
    assert function["name"] == "calculate"
    assert function["description"] == "Evaluate an arithmetic expression."
    assert function["parameters"]["required"] == ["expression"]
    assert function["parameters"]["properties"]["precision"]["type"] == "integer"


async def test_tool_call_validates_arguments_and_reports_errors_to_the_model():
    tool = Tool.from_function(calculate)
    assert await tool.call(json.dumps({"expression": "1/3", "precision": 3})) == "0.333"
    assert (await tool.call("{not json")).startswith("error: JSONDecodeError")
    assert "validation error" in await tool.call({"expression": "1", "precision": "many"})


def test_app_registers_tools_by_name():
    app = App("t")
    app.tool(calculate)
    assert list(app.tools) == ["calculate"]


def test_a_tool_turns_calls_stream_as_text_held_to_the_tools_schemas():
    from sloserve.tools import calls_schema, parse_calls

    def search(query: str) -> str:
        """Search."""
        return query

    def calculate(expression: str) -> str:
        """Calculate."""
        return expression

    tools = [Tool.from_function(search), Tool.from_function(calculate)]
    schema = calls_schema(tools)
    assert schema["type"] == "array" and schema["minItems"] == 1
    names = [choice["properties"]["name"]["enum"] for choice in schema["items"]["anyOf"]]
    assert names == [["search"], ["calculate"]]
    reply = '[{"name": "search", "parameters": {"query": "moon"}}, {"name": "calculate", "parameters": {}}]'
    calls = parse_calls(reply)
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_0", "search", '{"query": "moon"}'), ("call_1", "calculate", "{}"),
    ]  # fmt: skip
    assert parse_calls("not json") == [] and parse_calls('{"name": "search"}') == []
    cut_short = '[{"name": "calculate", "parameters": {"expression": "1000000'  # max_tokens reached
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parse_calls(cut_short)] == [
        ("calculate", "{}")
    ]
