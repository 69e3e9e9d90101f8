"""Two real local tools for the agent example: a calculator and a search over a small corpus."""

from __future__ import annotations

import ast
import json
import operator
import re
from pathlib import Path

CORPUS = json.loads((Path(__file__).parent / "corpus.json").read_text())
_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
    ast.Mod: operator.mod,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression such as '330 * 2 + 5' and return the result."""
    tree = ast.parse(expression.replace("^", "**").replace(",", ""), mode="eval")
    return f"{_evaluate(tree.body):g}"


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](_evaluate(node.operand))
    raise ValueError(f"not an arithmetic expression: {ast.unparse(node)}")


def search(query: str) -> str:
    """Search a small encyclopedia; returns the passages that best match the query."""
    words = set(re.findall(r"[a-z0-9]+", query.lower()))
    scored = []
    for entry in CORPUS:
        text = f"{entry['title']} {entry['text']}".lower()
        score = sum(word in text for word in words)
        if score:
            scored.append((score, entry))
    scored.sort(key=lambda item: -item[0])
    return "\n".join(f"{entry['title']}: {entry['text']}" for _, entry in scored[:2]) or "no results"
