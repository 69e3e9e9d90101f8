"""Rebuild a non-streamed OpenAI response from the streamed chunks of the same request."""

from __future__ import annotations

from typing import Any


class Reassembler:
    """Accumulates ``chat.completion.chunk`` or ``text_completion`` chunks into one response."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}  # id, created, model, object of the first chunk
        self.choices: dict[int, dict[str, Any]] = {}
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None  # an error the engine sent mid-stream

    @property
    def prompt_tokens(self) -> int:
        return int((self.usage or {}).get("prompt_tokens") or 0)

    def add(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            self.error = chunk["error"]
            return
        if not self.head:
            self.head = {key: chunk.get(key) for key in ("id", "created", "model", "object")}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            self._add_choice(choice)

    def _add_choice(self, piece: dict[str, Any]) -> None:
        choice = self.choices.setdefault(piece["index"], {"index": piece["index"], "finish_reason": None})
        if piece.get("finish_reason"):
            choice["finish_reason"] = piece["finish_reason"]
            choice["stop_reason"] = piece.get("stop_reason")
        if "delta" in piece:
            _merge_delta(choice.setdefault("message", {"role": "assistant"}), piece["delta"] or {})
        else:
            choice["text"] = choice.get("text", "") + (piece.get("text") or "")
        if piece.get("logprobs"):
            _merge_logprobs(choice, piece["logprobs"])

    def response(self) -> dict[str, Any]:
        chat = self.head.get("object") == "chat.completion.chunk"
        choices = [self.choices[index] for index in sorted(self.choices)]
        if chat:
            for choice in choices:
                message = choice.setdefault("message", {"role": "assistant"})
                message.setdefault("content", None)
                if message.get("tool_calls"):
                    message["tool_calls"] = [message["tool_calls"][i] for i in sorted(message["tool_calls"])]
        return {
            **self.head,
            "object": "chat.completion" if chat else "text_completion",
            "choices": choices,
            "usage": self.usage,
        }


def _merge_delta(message: dict[str, Any], delta: dict[str, Any]) -> None:
    for key in ("content", "reasoning_content", "reasoning"):
        if delta.get(key):
            message[key] = (message.get(key) or "") + delta[key]
    for call in delta.get("tool_calls") or []:
        calls = message.setdefault("tool_calls", {})
        merged = calls.setdefault(
            call.get("index", len(calls)),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if call.get("id"):
            merged["id"] = call["id"]
        function = call.get("function") or {}
        merged["function"]["name"] += function.get("name") or ""
        merged["function"]["arguments"] += function.get("arguments") or ""


def _merge_logprobs(choice: dict[str, Any], logprobs: dict[str, Any]) -> None:
    merged = choice.setdefault("logprobs", {})
    for key, value in logprobs.items():
        if isinstance(value, list):
            merged[key] = merged.get(key, []) + value
        else:
            merged.setdefault(key, value)
