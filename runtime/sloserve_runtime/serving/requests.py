"""What a completion request asks of the server: its SLO and admission mode, from headers, body
and the server's defaults, validated with errors that name the field."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from sloserve.slo import SLO, SLOError, parse_tpot, parse_ttft
from sloserve_runtime.core.programs import ProgramCall
from sloserve_runtime.core.slo_state import ADMISSION_MODES, BEST_EFFORT

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
HEADER_TTFT = "x-slo-ttft-ms"
HEADER_TPOT = "x-slo-tpot-ms"
HEADER_THINKING_TPOT = "x-slo-thinking-tpot-ms"  # a reasoning generation's TPOT while it thinks
HEADER_ADMISSION = "x-slo-admission"
# llm-d's names for the same two targets (its inference scheduler reads these; it keeps the
# ``x-slo-*`` names as deprecated aliases). Either name works; two that disagree are a 400.
HEADER_LLMD_TTFT = "x-llm-d-slo-ttft-ms"
HEADER_LLMD_TPOT = "x-llm-d-slo-tpot-ms"
# The program run a stage call belongs to (``request_program``); the body field is ``slo.program``.
HEADER_PROGRAM = "x-slo-program"  # the run's id (a replicated endpoint also keeps a run on one replica)
HEADER_PROGRAM_NAME = "x-slo-program-name"
HEADER_STAGE = "x-slo-stage"
HEADER_PROGRAM_ARRIVAL = "x-slo-program-arrival"  # Unix time in seconds
HEADER_PROGRAM_DEADLINE = "x-slo-program-deadline-ms"  # after the run's arrival
HEADER_PROGRAM_REMAINING = "x-slo-program-remaining"  # comma-separated stage names; empty: none
_PROGRAM_FIELDS = {"id", "name", "stage", "arrival", "deadline_ms", "remaining"}
_MAX_NAME = 256
# Server-wide defaults, set by `sloserve serve --slo-ttft-ms/--slo-tpot-ms` for this process.
ENV_DEFAULT_TTFT = "SLOSERVE_SLO_TTFT_MS"
ENV_DEFAULT_TPOT = "SLOSERVE_SLO_TPOT_MS"
ENV_PROFILE = "SLOSERVE_PROFILE"
ENV_ADMISSION = "SLOSERVE_ADMISSION"  # `sloserve serve --admission`: best-effort or reject
ENV_NOTICES = "SLOSERVE_NOTICES"  # where the scheduler pushes admission notices (unset: none come)
_BODY_FIELDS = {"ttft_ms", "tpot_ms", "thinking_tpot_ms", "admission", "program"}


class BodyError(ValueError):
    """A request body we cannot read as JSON; the message says what was wrong and what to do."""


def parse_body(raw: bytes) -> Any:
    """The request body as JSON; None if it is not JSON at all (vLLM answers that itself).

    Raises ``BodyError`` for a body nested too deeply to parse: Python's parser gives up with
    ``RecursionError``, which unguarded became an HTTP 500 and a reset connection.
    """
    try:
        return json.loads(raw)
    except ValueError:
        return None
    except RecursionError:
        raise BodyError(
            "the request body is nested too deeply to parse as JSON; send a body whose objects and "
            "arrays nest at most a few hundred levels"
        ) from None


def server_default_slo() -> SLO:
    return SLO.parse(os.environ.get(ENV_DEFAULT_TTFT), os.environ.get(ENV_DEFAULT_TPOT))


def request_slo(headers: dict[str, str], body: dict[str, Any]) -> SLO:
    """The SLO a request asks for (headers, then the body field); raises SLOError."""
    ttft_ms, ttft_slowdown = _aliased(headers, (HEADER_TTFT, HEADER_LLMD_TTFT), parse_ttft)
    tpot_ms = _aliased(headers, (HEADER_TPOT, HEADER_LLMD_TPOT), parse_tpot)
    thinking_tpot_ms = parse_tpot(headers.get(HEADER_THINKING_TPOT), f"header {HEADER_THINKING_TPOT}")
    field = body.get("slo")
    if field is not None:
        _checked_object(field, "slo", _BODY_FIELDS, '{"ttft_ms": 300, "tpot_ms": 50}')
        if field.get("ttft_ms") is not None:
            ttft_ms, ttft_slowdown = parse_ttft(field["ttft_ms"], "slo.ttft_ms")
        if field.get("tpot_ms") is not None:
            tpot_ms = parse_tpot(field["tpot_ms"], "slo.tpot_ms")
        if field.get("thinking_tpot_ms") is not None:
            thinking_tpot_ms = parse_tpot(field["thinking_tpot_ms"], "slo.thinking_tpot_ms")
    return SLO(ttft_ms=ttft_ms, ttft_slowdown=ttft_slowdown, tpot_ms=tpot_ms, thinking_tpot_ms=thinking_tpot_ms)


def _aliased(headers: dict[str, str], names: tuple[str, ...], parse: Any) -> Any:
    """One field sent under any of its header ``names``: parsed, and the same under each."""
    sent = [(name, parse(headers[name], f"header {name}")) for name in names if headers.get(name) is not None]
    if not sent:
        return parse(None, f"header {names[0]}")
    (first, value), *others = sent
    for name, other in others:
        if other != value:
            raise SLOError(
                f"headers {first} and {name}",
                f"{headers[first]} and {headers[name]}",
                "two names for one target disagree; send one of them, or the same value in both",
            )
    return value


def request_admission(headers: dict[str, str], body: dict[str, Any], default: str) -> str:
    """The admission mode a request asks for (header, then ``slo.admission``) over ``default``."""
    mode = default
    field = body.get("slo") if isinstance(body.get("slo"), dict) else {}
    for value, where in (
        (headers.get(HEADER_ADMISSION), f"header {HEADER_ADMISSION}"),
        (field.get("admission"), "slo.admission"),
    ):
        if value is None:
            continue
        if not isinstance(value, str) or value.strip().lower() not in ADMISSION_MODES:
            raise SLOError(where, value, f"unknown admission mode; use one of {', '.join(ADMISSION_MODES)}")
        mode = value.strip().lower()
    return mode


def server_admission() -> str:
    mode = os.environ.get(ENV_ADMISSION) or BEST_EFFORT
    return mode if mode in ADMISSION_MODES else BEST_EFFORT


def request_program(headers: dict[str, str], body: dict[str, Any]) -> ProgramCall | None:
    """The program run a stage call says it belongs to, from the headers and then the body field
    ``slo.program`` (which wins field by field); None if it names no run. Raises SLOError.

    Body: ``{"slo": {"program": {"id": "run-7", "name": "agent", "stage": "act", "arrival":
    1765000000.5, "deadline_ms": 20000, "remaining": ["act", "respond"]}}``; headers
    ``x-slo-program``, ``x-slo-program-name``, ``x-slo-stage``, ``x-slo-program-arrival``,
    ``x-slo-program-deadline-ms`` and ``x-slo-program-remaining`` (comma-separated).
    """
    fields: dict[str, tuple[Any, str]] = {}
    for name, header in (
        ("id", HEADER_PROGRAM), ("name", HEADER_PROGRAM_NAME), ("stage", HEADER_STAGE),
        ("arrival", HEADER_PROGRAM_ARRIVAL), ("deadline_ms", HEADER_PROGRAM_DEADLINE),
        ("remaining", HEADER_PROGRAM_REMAINING),
    ):  # fmt: skip
        if header in headers:
            value: Any = headers[header]
            if name == "remaining":
                value = [item.strip() for item in value.split(",") if item.strip()]
            fields[name] = (value, f"header {header}")
    slo = body.get("slo") if isinstance(body.get("slo"), dict) else {}
    program = slo.get("program")
    if program is not None:
        _checked_object(program, "slo.program", _PROGRAM_FIELDS, '{"id": "run-7", "stage": "act"}')
        fields.update({name: (value, f"slo.program.{name}") for name, value in program.items() if value is not None})
    if not fields:
        return None
    if "id" not in fields:
        value, where = next(iter(fields.values()))
        raise SLOError(where, value, f"program fields need the run's id ({HEADER_PROGRAM} or slo.program.id)")
    return ProgramCall(
        run_id=_name(*fields["id"]),
        name=_name(*fields["name"]) if "name" in fields else None,
        stage=_name(*fields["stage"]) if "stage" in fields else None,
        arrival=_positive(*fields["arrival"], "Unix time in seconds") if "arrival" in fields else None,
        deadline_s=_positive(*fields["deadline_ms"], "milliseconds") / 1000.0 if "deadline_ms" in fields else None,
        remaining=_names(*fields["remaining"]) if "remaining" in fields else None,
    )


def _checked_object(value: Any, where: str, allowed: set[str], example: str) -> None:
    """Raise SLOError unless ``value`` is an object whose keys are all ``allowed``."""
    if not isinstance(value, dict):
        raise SLOError(where, value, f"expected an object like {example}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise SLOError(f"{where}.{unknown[0]}", value[unknown[0]], f"unknown field; use {', '.join(sorted(allowed))}")


def _name(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > _MAX_NAME:
        raise SLOError(where, value, f"expected a non-empty string of at most {_MAX_NAME} characters")
    return value.strip()


def _names(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise SLOError(where, value, 'expected a list of stage names, e.g. ["act", "respond"] ([] for none)')
    return tuple(_name(item, where) for item in value)


def _positive(value: Any, where: str, unit: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number <= 0:
        raise SLOError(where, value, f"expected a positive number ({unit})")
    return number
