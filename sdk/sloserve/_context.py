"""The program run a stage call belongs to: set by ``Session.run``, read by each ``Stage`` call."""

from __future__ import annotations

import contextvars
from typing import Any, Protocol


class StageCallError(RuntimeError):
    """A stage was called where it cannot run (outside a program, or outside its declared graph)."""


class ProgramRun(Protocol):
    """What a stage call asks of the run it belongs to: the LLM handle for that stage."""

    def llm_for(self, stage: Any) -> Any: ...


current_run: contextvars.ContextVar[ProgramRun] = contextvars.ContextVar("sloserve_program_run")


def current_session(stage_name: str) -> ProgramRun:
    """The program run in progress; ``StageCallError`` if a stage is called outside one."""
    try:
        return current_run.get()
    except LookupError:
        raise StageCallError(
            f"stage {stage_name!r} was called outside a running program; call it from an "
            "@app.program function run by `sloserve run app.py` or Session.run()"
        ) from None
