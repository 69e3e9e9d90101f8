"""Reasoning: a thinking stage that must stream fast, then a relaxed final answer."""

from sloserve import App, stage

app = App("reasoning")


@stage(ttft="3x", tpot="150ms", max_tokens=96)
async def think(llm, question: str) -> str:
    """Thinking streams to the user as it is produced: tight decode SLO."""
    prompt = f"Think step by step, briefly, about this question: {question}"
    return await llm.chat([{"role": "user", "content": prompt}], temperature=0)


@stage(ttft="2s", tpot="300ms", max_tokens=64)
async def answer(llm, question: str, notes: str) -> str:
    """The answer comes after the thinking: a looser SLO."""
    prompt = f"Question: {question}\nNotes: {notes}\nGive a one-sentence answer."
    return await llm.chat([{"role": "user", "content": prompt}], temperature=0)


@app.program(
    examples=["What is the capital of France?", "Why do we have seasons on Earth?"],
    graph={think: [], answer: [think]},
)
async def solve(question: str) -> str:
    notes = await think(question)
    return await answer(question, notes)
