"""What a completion request asks of the server: its SLO and admission mode, from headers, body
and the server's defaults, validated with errors that name the field."""

from __future__ import annotations

import json
import os
from typing import Any

from sloserve.slo import SLO, SLOError, parse_tpot, parse_ttft
from sloserve_runtime.core.slo_state import ADMISSION_MODES, BEST_EFFORT

COMPLETION_PATHS = ("/v1/chat/completions", "/v1/completions")
HEADER_TTFT = "x-slo-ttft-ms"
HEADER_TPOT = "x-slo-tpot-ms"
HEADER_ADMISSION = "x-slo-admission"
# Server-wide defaults, set by `sloserve serve --slo-ttft-ms/--slo-tpot-ms` for this process.
ENV_DEFAULT_TTFT = "SLOSERVE_SLO_TTFT_MS"
ENV_DEFAULT_TPOT = "SLOSERVE_SLO_TPOT_MS"
ENV_PROFILE = "SLOSERVE_PROFILE"
ENV_ADMISSION = "SLOSERVE_ADMISSION"  # `sloserve serve --admission`: best-effort or reject
ENV_NOTICES = "SLOSERVE_NOTICES"  # where the scheduler pushes admission notices (unset: none come)
_BODY_FIELDS = {"ttft_ms", "tpot_ms", "admission"}


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
    ttft_ms, ttft_slowdown = parse_ttft(headers.get(HEADER_TTFT), f"header {HEADER_TTFT}")
    tpot_ms = parse_tpot(headers.get(HEADER_TPOT), f"header {HEADER_TPOT}")
    field = body.get("slo")
    if field is not None:
        if not isinstance(field, dict):
            raise SLOError("slo", field, 'expected an object like {"ttft_ms": 300, "tpot_ms": 50}')
        unknown = sorted(set(field) - _BODY_FIELDS)
        if unknown:
            raise SLOError(f"slo.{unknown[0]}", field[unknown[0]], "unknown field; use ttft_ms and tpot_ms")
        if field.get("ttft_ms") is not None:
            ttft_ms, ttft_slowdown = parse_ttft(field["ttft_ms"], "slo.ttft_ms")
        if field.get("tpot_ms") is not None:
            tpot_ms = parse_tpot(field["tpot_ms"], "slo.tpot_ms")
    return SLO(ttft_ms=ttft_ms, ttft_slowdown=ttft_slowdown, tpot_ms=tpot_ms)


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
