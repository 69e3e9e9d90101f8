"""``App``: the programs and tools of one application."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from sloserve.slo import parse_duration
from sloserve.stage import Stage
from sloserve.tools import Tool


class ProgramGraphError(ValueError):
    """A declared stage graph that cannot run: unknown stages or a cycle."""


@dataclass
class Program:
    """An entry point of an app: an async function that calls stages."""

    fn: Callable[..., Any]
    name: str
    examples: list[tuple[Any, ...]]  # inputs `sloserve run` uses when given none
    graph: nx.DiGraph | None = None  # stage dependencies, when known ahead (edge: before -> after)
    stages: dict[str, Stage] = field(default_factory=dict)  # the stages named in the graph
    deadline_ms: float | None = None  # the whole run is due this long after it starts (None: no deadline)

    def remaining_after(self, stage: str) -> tuple[str, ...] | None:
        """The stages the declared graph still expects after ``stage``, in a topological order, each
        once (a loop's further turns it cannot know: the server learns them); None without a graph."""
        if self.graph is None or stage not in self.graph:
            return None
        after = nx.descendants(self.graph, stage)
        return tuple(name for name in nx.topological_sort(self.graph) if name in after)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return await self.fn(*args, **kwargs)


class App:
    """An application: programs made of stages, and tools the model may call.

    Example::

        app = App("reasoning")

        @app.program(examples=["Why is the sky blue?"], deadline="20s")
        async def solve(question: str) -> str:
            return await answer(question, await think(question))
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.programs: dict[str, Program] = {}
        self.tools: dict[str, Tool] = {}

    def program(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        examples: Sequence[Any] = (),
        graph: Mapping[Stage, Sequence[Stage]] | None = None,
        deadline: str | float | None = None,
    ) -> Any:
        """Register an entry program. ``graph`` maps each stage to the stages it depends on;
        ``deadline`` ("20s", "1500ms") is an end-to-end objective for each run, beside its stages'.

        Raises ``SLOError`` for a deadline that is not a positive duration.
        """
        deadline_ms = parse_duration(deadline, "deadline")

        def register(function: Callable[..., Any]) -> Program:
            if not inspect.iscoroutinefunction(function):
                raise TypeError(f"@app.program needs an async function; {function.__qualname__} is not")
            program = Program(
                fn=function,
                name=name or function.__name__,
                examples=[item if isinstance(item, tuple) else (item,) for item in examples],
                deadline_ms=deadline_ms,
            )
            if graph is not None:
                program.graph, program.stages = build_graph(program.name, graph)
            self.programs[program.name] = program
            return program

        return register if fn is None else register(fn)

    def tool(self, fn: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
        """Register a plain Python function as a tool offered to the model (OpenAI tools format)."""

        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            tool = Tool.from_function(function, name)
            self.tools[tool.name] = tool
            return function

        return register if fn is None else register(fn)


def build_graph(program: str, graph: Mapping[Any, Sequence[Any]]) -> tuple[nx.DiGraph, dict[str, Stage]]:
    """Build and validate a program's stage DAG; edges run from a dependency to its dependant.

    Nodes are ``@stage`` objects, or names of stages that appear elsewhere in the graph.
    """
    items = [(node, list(dependencies)) for node, dependencies in graph.items()]
    named = [item for node, dependencies in items for item in (node, *dependencies)]
    known = {item.name: item for item in named if isinstance(item, Stage)}
    unknown = sorted({_name(item) for item in named if _name(item) not in known})
    if unknown:
        raise ProgramGraphError(
            f"program {program!r}: graph names unknown stage(s) {', '.join(unknown)}; "
            f"known stages: {', '.join(sorted(known)) or 'none'} (use the @stage functions themselves)"
        )
    dag = nx.DiGraph()
    for node, dependencies in items:
        dag.add_node(_name(node))
        dag.add_edges_from((_name(dependency), _name(node)) for dependency in dependencies)
    try:
        cycle = nx.find_cycle(dag)
    except nx.NetworkXNoCycle:
        return dag, known
    path = " -> ".join([edge[0] for edge in cycle] + [cycle[0][0]])
    raise ProgramGraphError(f"program {program!r}: stage graph has a cycle: {path}")


def _name(node: Any) -> str:
    if isinstance(node, Stage):
        return node.name
    return node if isinstance(node, str) else str(getattr(node, "__name__", node))
