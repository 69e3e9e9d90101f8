"""Reading the recorded runs these scripts take: bench JSONs and step logs, as written or gzipped."""

from __future__ import annotations

import gzip
from pathlib import Path


def read_text(path: Path) -> str:
    """The file's text; a ``.gz`` file (the larger records under docs/data) is decompressed."""
    return gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
