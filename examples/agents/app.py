"""Agents: a tool-calling loop with a tight TTFT, then a final answer that may be slower.

Each ``act`` turn's tool call streams as text held to the tools' schemas, so its TTFT and TPOT
are those of the call the agent waits for (``LLM.tool_turn``). Every call tells the server its
run: the run is admitted as a whole at its first turn, its later turns by right, and its
context stays cached between turns.
"""

from sloserve import App, stage
from tools import calculate, search

app = App("agents")
app.tool(calculate)
app.tool(search)

MAX_TOOL_TURNS = 2
SYSTEM = (
    "You answer questions. Use the search tool to look facts up and the calculate tool for arithmetic, then answer."
)


@stage(ttft="1s", tpot="150ms", max_tokens=64)
async def act(llm, messages: list[dict]) -> list:
    """One loop turn: the model picks tools and their arguments; the tools run locally."""
    return await llm.tool_turn(messages, temperature=0)


@stage(ttft="5x", tpot="300ms", max_tokens=64)
async def respond(llm, messages: list[dict]) -> str:
    """The final answer, written from the tool results."""
    results = "\n".join(m["content"] for m in messages if m["role"] == "tool")
    question = messages[1]["content"]
    prompt = f"Facts:\n{results}\n\nUsing these facts, answer in one sentence: {question}"
    return await llm.chat([{"role": "user", "content": prompt}], temperature=0)


@app.program(
    examples=["How tall is the Eiffel Tower, doubled?", "How far away is the Moon?"],
    graph={act: [], respond: [act]},
    deadline="15s",  # the whole run, end to end
)
async def agent(question: str) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    for _ in range(MAX_TOOL_TURNS):
        await act(messages)
    return await respond(messages)
