"""The architecture's rules, checked on the source so that they stay true (issue 14).

One home per concept: only the MLflow modules import MLflow, only the checkpoint module
reads a checkpoint's variant, only :mod:`cxrgaze.layout` names the DVC layout; layers
import downwards (evaluation and serving never import training); no import cycles; no
module over 400 lines and no function over 60.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "cxrgaze"
FILES = sorted(PACKAGE.rglob("*.py"))
MLFLOW_HOMES = ("cxrgaze/tracking.py", "cxrgaze/experiment/", "cxrgaze/registry.py", "cxrgaze/serving/")


def _name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


MODULES = {_name(p): p for p in FILES}


def _top_level_imports(path: Path) -> set[str]:
    """cxrgaze modules imported when ``path`` is imported (module level; not TYPE_CHECKING blocks)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cxrgaze")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cxrgaze"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES}
    full = set()
    for name in found:
        parts = name.split(".")
        full |= {".".join(parts[:k]) for k in range(1, len(parts) + 1) if ".".join(parts[:k]) in MODULES}
    return full


def _all_imports(path: Path) -> set[str]:
    """Every cxrgaze module named in an import anywhere in ``path`` (function-local included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cxrgaze"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("cxrgaze")}
    return found


def test_only_the_tracking_registry_and_serving_modules_import_mlflow():
    offenders = [str(p.relative_to(SRC)) for p in FILES
                 if re.search(r"^\s*(import mlflow|from mlflow)", p.read_text(), re.M)
                 and not str(p.relative_to(SRC)).startswith(MLFLOW_HOMES)]
    assert offenders == []


def test_only_the_checkpoint_module_reads_a_checkpoints_variant():
    offenders = [str(p.relative_to(SRC)) for p in FILES
                 if '["train"]["variant"]' in p.read_text() and p.name != "checkpoint.py"]
    assert offenders == []


def test_only_the_layout_module_knows_the_dvc_layout():
    offenders = [str(p.relative_to(SRC)) for p in FILES
                 if re.search(r"outputs/|data\.dvc", p.read_text()) and p.name != "layout.py"]
    assert offenders == []


@pytest.mark.parametrize("lower", ["cxrgaze.evaluate", "cxrgaze.evaluation", "cxrgaze.predict", "cxrgaze.serving",
                                   "cxrgaze.models", "cxrgaze.losses", "cxrgaze.explain", "cxrgaze.data",
                                   "cxrgaze.config", "cxrgaze.checkpoint"])
def test_lower_layers_never_import_training_tuning_or_the_cli(lower):
    higher = ("cxrgaze.train", "cxrgaze.tune", "cxrgaze.cli", "cxrgaze.experiment")
    offenders = {str(p.relative_to(SRC)): sorted(m for m in _all_imports(p) if m.startswith(higher))
                 for name, p in MODULES.items() if name == lower or name.startswith(lower + ".")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_cycles():
    graph = {name: {d for d in _top_level_imports(p) if d != name and not name.startswith(d + ".")}
             for name, p in MODULES.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_modules_and_functions_stay_small():
    long_modules = {str(p.relative_to(SRC)): n for p in FILES if (n := len(p.read_text().splitlines())) > 400}
    long_functions = [f"{p.relative_to(SRC)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
                      for p in FILES for node in ast.walk(ast.parse(p.read_text()))
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.end_lineno - node.lineno + 1 > 60]
    assert (long_modules, long_functions) == ({}, [])
