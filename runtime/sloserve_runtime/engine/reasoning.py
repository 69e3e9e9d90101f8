"""When a reasoning generation ends its thinking, as the engine sees its output tokens.

With a reasoning parser configured for the served model (vLLM's ``--reasoning-parser``), that
parser decides, as it does for vLLM's structured outputs. Otherwise the tail of the output is
decoded and searched for ``</think>`` (``sloserve.slo.THINKING_END``): a model that thinks in
those tags without a parser, or one made to (a structured-output pattern), switches all the same.
"""

from __future__ import annotations

from typing import Any

from sloserve.slo import THINKING_END

# Output tokens decoded from the end each step: enough to hold the marker however it is split
# into tokens, and the tokens of a step that verified several drafts.
_TAIL_TOKENS = 16


class ThinkingEnd:
    """Tells whether a request's output so far has ended its thinking."""

    def __init__(self, structured_output_manager: Any) -> None:
        self.tokenizer = getattr(structured_output_manager, "tokenizer", None)
        parser_cls = getattr(structured_output_manager, "reasoner_cls", None)
        self.parser = None
        if parser_cls is not None and self.tokenizer is not None:
            self.parser = parser_cls(tokenizer=self.tokenizer)

    def ended(self, output_token_ids: list[int]) -> bool:
        if self.parser is not None:
            return bool(self.parser.is_reasoning_end(output_token_ids))
        if self.tokenizer is None or not output_token_ids:
            return False
        return THINKING_END in self.tokenizer.decode(list(output_token_ids[-_TAIL_TOKENS:]))
