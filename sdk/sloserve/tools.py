"""Tools: plain Python functions offered to the model in the OpenAI tools format."""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pydantic


@dataclass(frozen=True)
class Tool:
    """A registered tool: the function, and its OpenAI tool description."""

    name: str
    description: str
    fn: Callable[..., Any]
    arguments: type[pydantic.BaseModel]  # validates the model's arguments

    @classmethod
    def from_function(cls, fn: Callable[..., Any], name: str | None = None) -> Tool:
        fields: dict[str, Any] = {}
        for parameter in inspect.signature(fn).parameters.values():
            annotation = parameter.annotation if parameter.annotation is not inspect.Parameter.empty else str
            default = parameter.default if parameter.default is not inspect.Parameter.empty else ...
            fields[parameter.name] = (annotation, default)
        tool_name = name or fn.__name__
        arguments = pydantic.create_model(f"{tool_name}_arguments", **fields)
        description = inspect.getdoc(fn) or tool_name
        return cls(tool_name, description, fn, arguments)

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.arguments.model_json_schema(),
            },
        }

    async def call(self, raw_arguments: str | dict[str, Any]) -> str:
        """Run the tool on the model's arguments; a bad call becomes an error message for the model."""
        try:
            parsed = json.loads(raw_arguments) if isinstance(raw_arguments, str) else raw_arguments
            arguments = self.arguments.model_validate(parsed)
            result = self.fn(**arguments.model_dump())
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:  # noqa: BLE001 - the model sees what went wrong and may retry
            return f"error: {type(exc).__name__}: {exc}"
        return result if isinstance(result, str) else json.dumps(result)


def calls_schema(tools: list[Tool]) -> dict[str, Any]:
    """JSON schema of one or more calls of ``tools``: what a tool turn's reply must be (the shape
    vLLM holds a required tool choice to, written out so the call streams as text)."""
    choices = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [tool.name]},
                "parameters": tool.arguments.model_json_schema(),
            },
            "required": ["name", "parameters"],
        }
        for tool in tools
    ]
    return {"type": "array", "minItems": 1, "items": {"anyOf": choices}}


_CALL_NAME = re.compile(r'"name"\s*:\s*"([^"]+)"')


def parse_calls(text: str) -> list[dict[str, Any]]:
    """The calls in a tool turn's reply (``calls_schema``), in the OpenAI ``tool_calls`` format.

    A reply cut short by ``max_tokens`` still names its calls: each named call is kept, with the
    arguments that parse (none otherwise: the tool then answers with the error, as it would to a
    bad call), as vLLM's tool parser keeps the calls of a reply it cannot finish.
    """
    try:
        items = json.loads(text)
    except ValueError:
        items = [{"name": name, "parameters": {}} for name in _CALL_NAME.findall(text)]
    calls = []
    for index, item in enumerate(items if isinstance(items, list) else []):
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            arguments = json.dumps(item.get("parameters") or {})
            call = {"name": item["name"], "arguments": arguments}
            calls.append({"id": f"call_{index}", "type": "function", "function": call})
    return calls


@dataclass(frozen=True)
class ToolCall:
    """One tool call the model made, and what the tool returned."""

    name: str
    arguments: str
    result: str
