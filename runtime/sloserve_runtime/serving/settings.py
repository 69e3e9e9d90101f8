"""Environment knobs of the runtime, all prefixed ``SLOSERVE_``."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """Where sloserve keeps converted models and other caches (``$SLOSERVE_HOME``)."""
    return Path(os.environ.get("SLOSERVE_HOME", Path.home() / ".cache" / "sloserve"))


def kv_cache_gib() -> str:
    """KV cache size for the CPU engine, in GiB (``$SLOSERVE_KV_CACHE_GIB``)."""
    return os.environ.get("SLOSERVE_KV_CACHE_GIB", "2")
