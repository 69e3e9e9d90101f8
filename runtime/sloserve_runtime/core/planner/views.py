"""Views of the requests in an engine, as the planner reads them, and the fast passes over them.

The planner walks every live request several times a call, so the passes here are written for
speed (list comprehensions, C-level ``itemgetter`` maps) and exist once: the rest of the planner
calls them instead of spelling its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import NamedTuple

from sloserve_runtime.core.slo_state import SLORequestState


class LiveRequest(NamedTuple):
    """What the planner needs of one request in the engine (admitted or not yet scheduled)."""

    state: SLORequestState
    to_compute: int  # tokens to compute before its next output token (1 while decoding)
    context: int  # tokens whose KV exists

    @property
    def decoding(self) -> bool:
        """It computes one token a step: its prompt is done. ``decodes_of`` is the same test, inlined."""
        return self.to_compute <= 1 and self.context > 0

    @classmethod
    def of(cls, state: SLORequestState, num_tokens: int, computed_tokens: int) -> LiveRequest:
        """A request with ``num_tokens`` to have computed, ``computed_tokens`` of them done; one that
        has not started is planned from the prefix the engine's cache is expected to hold for it."""
        computed = computed_tokens or state.cached_tokens
        return cls(state, num_tokens - computed, computed)


# Sums over every live request read their fields through these: a C-level ``map`` is faster than
# a comprehension. (Not ``attrgetter("state.tpot_seconds")``: that is slower than one.)
TO_COMPUTE = itemgetter(1)  # LiveRequest.to_compute
CONTEXT = itemgetter(2)  # LiveRequest.context


# ``LiveRequest.decoding`` is spelled out inline in the passes below: a property call per request
# is most of the time of a pass over every request in the engine.


def decodes_of(live: Sequence[LiveRequest]) -> list[LiveRequest]:
    """The requests that decode (``LiveRequest.decoding``)."""
    return [r for r in live if r.to_compute <= 1 and r.context > 0]


def prefills_of(live: Sequence[LiveRequest]) -> list[LiveRequest]:
    """The requests still computing their prompt (not ``LiveRequest.decoding``)."""
    return [r for r in live if not (r.to_compute <= 1 and r.context > 0)]


def admitted_decodes_of(live: Sequence[LiveRequest]) -> list[LiveRequest]:
    """The admitted requests that decode."""
    return [r for r in live if r.to_compute <= 1 and r.context > 0 and not r.state.best_effort]


def best_effort_of(live: Sequence[LiveRequest]) -> list[LiveRequest]:
    return [r for r in live if r.state.best_effort]


def prefill_order(r: LiveRequest) -> tuple[bool, float, float]:
    """The forward simulation's prefill order: those under way first (vLLM serves running requests
    before waiting ones), then by first-token deadline. A waiting request whose prefix the cache
    holds has that much context, but is not under way."""
    return (r.context <= r.state.cached_tokens, r.state.first_token_deadline, r.state.arrival)


class Running(NamedTuple):
    """The running requests of one step, sorted in one pass: ``held_back`` makes it, ``token_budget`` uses it."""

    of: Sequence[LiveRequest]  # the list sorted (both engines hand the same one to both calls)
    decodes: list[LiveRequest]  # the admitted decodes
    best_effort: list[LiveRequest]
    tiers: set[float]  # the admitted decodes' TPOTs (seconds)

    @classmethod
    def of_step(cls, running: Sequence[LiveRequest]) -> Running:
        decodes = admitted_decodes_of(running)
        return cls(running, decodes, best_effort_of(running), {r.state.tpot_seconds for r in decodes})


@dataclass(frozen=True)
class Decision:
    """An admission decision and why, as responses and metrics report it."""

    admitted: bool
    reason: str


ADMITTED = Decision(True, "admitted")
