"""The architecture holds: no private names across modules, no import cycles, GPU code only on demand.

The layer contracts themselves are import-linter's (``lint-imports`` in the test command, configured in
pyproject.toml); these are the rules it cannot express.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import grimp

SRC = Path(__file__).resolve().parents[1] / "src" / "sparsetrace"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_names(path: Path):
    """(line, module imported from, name) of every ``from sparsetrace... import name`` in ``path``."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "sparsetrace":
                for alias in node.names:
                    yield node.lineno, module, alias.name


def test_no_module_imports_a_private_name_of_another():
    offenders = [f"{path.relative_to(SRC.parent)}:{line} imports {name} from {module}"
                 for path in SRC.rglob("*.py") for line, module, name in _imported_names(path)
                 if name.startswith("_") and not name.startswith("__")]
    assert not offenders, "\n".join(offenders)


def test_no_import_cycles():
    graph = grimp.build_graph("sparsetrace")
    modules = sorted(graph.modules)
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(other) == 1:
                cycles.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, path + [other])
        state[module] = 2

    for module in modules:
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cpu_modules_never_load_triton_or_the_kernels():
    """Importing every module outside ``sparsetrace.kernels`` (and running the public ops on CPU tensors)
    loads neither Triton nor the kernels: they are imported lazily, by ``sparsetrace.ops``, on CUDA only."""
    modules = sorted(_module_name(p) for p in SRC.rglob("*.py") if "kernels" not in p.parts)
    code = f"""
import importlib, json, sys, torch
for name in {modules!r}:
    importlib.import_module(name)
import sparsetrace as st
q, k = torch.randn(1, 2, 40, 16), torch.randn(1, 1, 40, 16)
st.sparse_attention(q, k, k, st.stream_mask(q, k, block_q=8, block_k=8, top_k=3))
print(json.dumps(sorted(m for m in sys.modules if m == "triton" or m.startswith("sparsetrace.kernels"))))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == [], f"CPU code loaded {loaded}"
    assert len(modules) > 40  # the walk found the package
