"""Step-time model: predicts one engine step's duration as a max over linear pieces.

Profiles are JSON files (see ``profiles/``); the scheduler, the middleware and later the
simulator read them. Imports no vLLM.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path

from sloserve_runtime.core.hardware import cpu_dtype

PROFILES_DIR = Path(__file__).parent / "profiles"
# The default model on the CPU engine, one profile per dtype it runs in (``hardware.cpu_dtype``).
DEFAULT_PROFILE = PROFILES_DIR / "cpu-smollm2-135m.json"  # bfloat16, a CPU with AVX512-BF16
FLOAT32_PROFILE = PROFILES_DIR / "cpu-smollm2-135m-fp32.json"  # float32, an AVX2-only CPU


def engine_profile(dtype: str | None = None) -> Path:
    """The bundled profile of the default model in ``dtype`` (default: the one this CPU runs it in).

    The two were measured on different machines; on an AVX2-only CPU the bfloat16 profile is
    four to six times too fast, past what online calibration corrects.
    """
    if dtype is None:
        dtype = cpu_dtype()
    return FLOAT32_PROFILE if dtype in ("float32", "float") else DEFAULT_PROFILE


def resolve_profile(name: str | Path, option: str = "--profile") -> Path:
    """A profile JSON path, or a bundled profile's name (``a100-opt13b-slos-serve``)."""
    candidate = Path(name)
    if candidate.is_file():
        return candidate
    bundled = PROFILES_DIR / f"{name}.json"
    if bundled.is_file():
        return bundled
    names = ", ".join(sorted(path.stem for path in PROFILES_DIR.glob("*.json")))
    raise ValueError(f"{option} {str(name)!r}: no such file or bundled profile; bundled: {names}")


@dataclass(frozen=True)
class LinearPiece:
    """One linear piece of the step-time model, in seconds."""

    per_token: float = 0.0  # per scheduled token (prefill chunk tokens + one per decode)
    per_request: float = 0.0  # per request in the batch
    per_context_token: float = 0.0  # per token of KV context in the batch
    constant: float = 0.0  # fixed cost of a step
    per_attended_pair: float = 0.0  # per (query token, key token) pair of attention; see ``attended_pairs``

    def seconds(self, tokens: int, requests: int, context_tokens: int, attended: int = 0) -> float:
        return (
            self.per_token * tokens
            + self.per_request * requests
            + self.per_context_token * context_tokens
            + self.per_attended_pair * attended
            + self.constant
        )


def attended_pairs(tokens: int, context_after: int) -> int:
    """Causal attention work of computing ``tokens`` new tokens that end at ``context_after``.

    Each new token attends to every earlier token and itself: a decode (1 token) to its whole
    context, a prefill chunk of c tokens ending at n to c·n − c(c−1)/2 keys in all. A chunk late in a
    long prompt costs far more than the first one; a per-context-token term alone cannot see that.
    """
    return tokens * context_after - tokens * (tokens - 1) // 2


@dataclass(frozen=True)
class StepTimeModel:
    """A calibrated step-time predictor for one model on one machine."""

    name: str
    pieces: tuple[LinearPiece, ...]
    max_num_batched_tokens: int = 2048  # prefill chunk size the profile was taken with
    source: str = ""  # where the coefficients come from and how they were obtained

    def step_seconds(self, tokens: int, requests: int, context_tokens: int = 0, attended: int = 0) -> float:
        # A loop, not max() over a generator: the planner's forward simulation calls this per chunk.
        pieces = self.pieces
        seconds = pieces[0].seconds(tokens, requests, context_tokens, attended)
        for piece in pieces[1:]:
            seconds = max(seconds, piece.seconds(tokens, requests, context_tokens, attended))
        return seconds

    def prefill_seconds(self, prompt_tokens: int) -> float:
        """Zero-load prefill time of a prompt: its chunks run alone, one step each."""
        chunk = self.max_num_batched_tokens
        total, done = 0.0, 0
        while done < prompt_tokens:
            tokens = min(chunk, prompt_tokens - done)
            done += tokens
            total += self.step_seconds(tokens, 1, done, attended_pairs(tokens, done))
        return total

    def chunk_budget(
        self, step_seconds_bound: float, tokens: int, requests: int, context_tokens: int, attended: int, prefix: int
    ) -> int:
        """The longest prefill chunk that joins a step (of these features) within the bound.

        The chunk continues a prompt whose first ``prefix`` tokens are computed: it adds its tokens,
        its KV context (``prefix`` + its length) and its causal attention (``attended_pairs``),
        which grows with the square of its length. ``requests`` already counts the chunk's request.
        """
        best = math.inf
        for piece in self.pieces:
            room = step_seconds_bound - piece.seconds(tokens, requests, context_tokens + prefix, attended)
            if room < 0:
                return 0
            # seconds(c) - seconds(0) = linear * c + quadratic * c**2, from attended_pairs(c, prefix + c).
            quadratic = piece.per_attended_pair / 2
            linear = piece.per_token + piece.per_context_token + piece.per_attended_pair * (prefix + 0.5)
            if quadratic > 0:
                best = min(best, (math.sqrt(linear * linear + 4 * quadratic * room) - linear) / (2 * quadratic))
            elif linear > 0:
                best = min(best, room / linear)
        return int(best) if math.isfinite(best) else 1 << 30

    @functools.cached_property
    def context_aware(self) -> bool:
        """Whether a step's time depends on the KV context it reads (not only on its tokens and requests)."""
        return any(piece.per_context_token or piece.per_attended_pair for piece in self.pieces)

    def calibrated(self, scale: float, offset: float) -> StepTimeModel:
        """This model with every prediction mapped to ``scale * seconds + offset`` (``scale`` > 0).

        A max of linear pieces stays one: each piece is scaled, and the offset joins its constant.
        """
        pieces = tuple(
            LinearPiece(
                per_token=piece.per_token * scale,
                per_request=piece.per_request * scale,
                per_context_token=piece.per_context_token * scale,
                constant=piece.constant * scale + offset,
                per_attended_pair=piece.per_attended_pair * scale,
            )
            for piece in self.pieces
        )  # fmt: skip
        return dataclasses.replace(self, pieces=pieces)

    def to_json(self, **metadata: object) -> dict[str, object]:
        """The profile file's content; ``metadata`` adds descriptive fields (model, hardware, ...)."""
        return {
            "name": self.name,
            **metadata,
            "source": self.source,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "pieces": [dataclasses.asdict(piece) for piece in self.pieces],
        }

    @classmethod
    def load(cls, path: str | Path = DEFAULT_PROFILE) -> StepTimeModel:
        data = json.loads(Path(path).read_text())
        return cls(
            name=data["name"],
            pieces=tuple(LinearPiece(**piece) for piece in data["pieces"]),
            max_num_batched_tokens=data.get("max_num_batched_tokens", 2048),
            source=data.get("source", ""),
        )
