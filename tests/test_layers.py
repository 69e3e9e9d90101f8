"""The runtime's packages depend one way, and no module imports another that imports it back."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"sloserve": ROOT / "sdk" / "sloserve", "sloserve_runtime": ROOT / "runtime" / "sloserve_runtime"}

# Which packages of the runtime each may import (the SDK, ``sloserve``, any of them may).
LAYERS = {
    "core": set(),
    "workload": {"core"},
    "engine": {"core"},
    "serving": {"core", "engine"},
    "sim": {"core", "workload"},
    "cluster": {"core", "engine", "serving"},
    "measure": {"core", "workload", "sim", "engine", "serving"},
    "cli": {"core", "workload", "sim", "engine", "serving", "cluster", "measure"},
}
# What the core must run without: the simulator, the router and the unit tests use it alone.
NOT_IN_CORE = ("vllm", "ray", "starlette", "httpx", "fastapi", "uvicorn", "zmq", "prometheus_client", "torch")


def _module_name(path: Path) -> str:
    for package, folder in PACKAGES.items():
        if path.is_relative_to(folder):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    raise ValueError(path)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for folder in PACKAGES.values() for path in folder.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Our modules that ``path`` imports anywhere in it: at the top, in a function or for type checking."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from package import module`` imports the module; ``from module import name`` the module.
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if name in modules else node.module for name in names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def _graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        graph.add_edges_from((name, imported) for imported in _imports(path, modules) if imported != name)
    return graph


def _layer(module: str) -> str | None:
    """The runtime package ``module`` belongs to (None: the SDK, or the runtime's entry points)."""
    parts = module.split(".")
    return parts[1] if parts[0] == "sloserve_runtime" and len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_cycles():
    cycles = list(nx.simple_cycles(_graph()))
    assert cycles == []


def test_runtime_is_layered():
    graph = _graph()
    unlayered = {name for name in graph if name.startswith("sloserve_runtime") and _layer(name) is None}
    assert unlayered == {"sloserve_runtime", "sloserve_runtime.__main__"}
    wrong = [
        (module, imported)
        for module, imported in graph.edges
        if (layer := _layer(module)) is not None
        and (other := _layer(imported)) is not None
        and other != layer
        and other not in LAYERS[layer]
    ]
    assert wrong == []


@pytest.mark.parametrize("library", NOT_IN_CORE)
def test_core_imports_no_engine_or_http_library(library):
    graph = _graph()
    core = [name for name in graph if _layer(name) == "core"]
    assert core
    program = "import sys\n" + "".join(f"import {name}\n" for name in core) + f"print({library!r} in sys.modules)"
    loaded = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "False"
