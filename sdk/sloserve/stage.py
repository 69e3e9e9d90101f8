"""``@stage``: an async function whose LLM calls carry the stage's latency objective."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from sloserve._context import current_session
from sloserve.slo import SLO

StageFn = Callable[..., Awaitable[Any]]


class Stage:
    """A stage of a program. Call it like the function it wraps, minus the ``llm`` argument.

    Example::

        @stage(ttft="3x", tpot="50ms", max_tokens=256)
        async def think(llm, question: str) -> str:
            return await llm.chat([{"role": "user", "content": question}])

        notes = await think("Why is the sky blue?")   # inside a program
    """

    def __init__(self, fn: StageFn, slo: SLO, max_tokens: int | None, name: str | None) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(f"@stage needs an async function; {fn.__qualname__} is not `async def`")
        parameters = list(inspect.signature(fn).parameters)
        if not parameters:
            raise TypeError(f"stage {fn.__qualname__} must take the LLM handle as its first argument")
        self.fn = fn
        self.slo = slo
        self.max_tokens = max_tokens
        self.name = name or fn.__name__
        functools.update_wrapper(self, fn)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        llm = current_session(self.name).llm_for(self)
        return await self.fn(llm, *args, **kwargs)

    def __repr__(self) -> str:
        return f"Stage({self.name!r}, {self.slo.describe()}, max_tokens={self.max_tokens})"


def stage(
    fn: StageFn | None = None,
    *,
    ttft: str | float | None = None,
    tpot: str | float | None = None,
    max_tokens: int | None = None,
    name: str | None = None,
    thinking_tpot: str | float | None = None,
) -> Stage | Callable[[StageFn], Stage]:
    """Declare a stage with its SLO: ``ttft`` ("300ms", "2s", "3x" slowdown) and ``tpot`` ("50ms").

    A reasoning stage may set ``thinking_tpot`` too: its one generation keeps that pace until the
    model ends its thinking (``</think>``), and ``tpot`` for the answer after; both are judged.
    Raises ``SLOError`` at decoration time for a value that is not a valid SLO.
    """
    slo = SLO.parse(ttft, tpot, thinking_tpot)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens <= 0):
        raise ValueError(f"invalid max_tokens={max_tokens!r}: must be a positive integer")

    def decorate(function: StageFn) -> Stage:
        return Stage(function, slo, max_tokens, name)

    return decorate if fn is None else decorate(fn)
