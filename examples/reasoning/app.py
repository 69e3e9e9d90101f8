"""Reasoning: one generation that thinks, streamed and kept at a fast pace, then answers at a relaxed one.

A reasoning model (DeepSeek-R1, Qwen3) thinks inside ``<think>...</think>`` by itself; the
server moves the generation from its thinking tier to its answer's when the thinking ends (the
served model's reasoning parser, or the ``</think>`` in its text, tells). The embedded default
model is a small instruct model that does not reason: a structured-output pattern makes it
write a short thinking span in those tags before its answer, so the switch happens all the same.
"""

from sloserve import App, stage

app = App("reasoning")

# What the default model is held to: a thinking span in tags, then a one-sentence answer.
THINK_THEN_ANSWER = r"<think>[A-Za-z0-9 ,.']{40,240}</think>[A-Za-z0-9 ,.']{8,160}"


@stage(ttft="2s", thinking_tpot="150ms", tpot="300ms", max_tokens=160)
async def reason(llm, question: str) -> str:
    """Thinking streams to the user as it is produced (tight TPOT); the answer after it may be slower."""
    messages = [
        {"role": "system", "content": "Think briefly inside <think></think>, then answer in one sentence."},
        {"role": "user", "content": question},
    ]
    text = await llm.chat(messages, temperature=0, extra_body={"structured_outputs": {"regex": THINK_THEN_ANSWER}})
    return text.split("</think>")[-1].strip()


@app.program(examples=["What is the capital of France?", "Why do we have seasons on Earth?"], graph={reason: []})
async def solve(question: str) -> str:
    return await reason(question)
