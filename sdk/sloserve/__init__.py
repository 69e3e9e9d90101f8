"""sloserve: declare multi-stage LLM programs whose stages carry latency objectives.

Example::

    from sloserve import App, stage

    app = App("reasoning")

    @stage(ttft="3x", tpot="50ms", max_tokens=256)
    async def think(llm, question: str) -> str:
        return await llm.chat([{"role": "user", "content": f"Think step by step: {question}"}])

    @app.program(examples=["Why is the sky blue?"])
    async def solve(question: str) -> str:
        return await think(question)

Run it with ``sloserve run app.py``.
"""

from sloserve.app import App, Program, ProgramGraphError
from sloserve.session import LLM, RequestRecord, Session, StageCallError
from sloserve.slo import SLO, Outcome, SLOError
from sloserve.stage import Stage, stage
from sloserve.tools import Tool, ToolCall

__all__ = [
    "App",
    "LLM",
    "Outcome",
    "Program",
    "ProgramGraphError",
    "RequestRecord",
    "SLO",
    "SLOError",
    "Session",
    "Stage",
    "StageCallError",
    "Tool",
    "ToolCall",
    "stage",
]
