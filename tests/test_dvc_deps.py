"""Every stage of ``dvc.yaml`` depends on every cxrgaze module its script can import.

A stage whose code changed must rerun (``dvc status`` must say so): each stage lists the
cxrgaze source its script imports, as whole packages or files. The import closure is found
from the source itself (every ``import cxrgaze...`` / ``from cxrgaze... import`` anywhere
in a module, function-local imports included, plus the packages' ``__init__`` files), so a
new import of a module the stage does not list fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _module_file(name: str) -> Path | None:
    """The source file of module ``cxrgaze...`` (a package's ``__init__.py``), if any."""
    base = SRC.joinpath(*name.split("."))
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


def _imports(path: Path) -> set[str]:
    """The cxrgaze modules ``path`` imports (``from pkg import sub`` counts ``pkg.sub`` when it is a module)."""
    found: set[str] = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for block in ast.walk(tree)  # `if TYPE_CHECKING:` imports never run
                   if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING" for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "cxrgaze"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "cxrgaze":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    return found


def import_closure(script: Path) -> set[Path]:
    """Every cxrgaze source file that running ``script`` may import (parents' ``__init__`` included)."""
    todo, seen, files = list(_imports(script)), set(), set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            module = ".".join(parts[:k])
            path = _module_file(module)
            if module in seen or path is None:
                continue
            seen.add(module)
            files.add(path)
            todo += _imports(path)
    return files


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_depends_on_all_the_code_it_runs(stage):
    spec = STAGES[stage].get("do", STAGES[stage])
    script = ROOT / spec["cmd"].split()[1]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec["deps"]]
    covered = [ROOT / d for d in deps]
    needed = import_closure(script) | {script, ROOT / "pipelines" / "_common.py"}
    missing = sorted(str(p.relative_to(ROOT)) for p in needed
                     if not any(p == c or c in p.parents for c in covered))
    assert not missing, f"dvc.yaml stage {stage} runs code it does not depend on: {missing}"


def test_the_closure_follows_function_local_and_submodule_imports(tmp_path):
    """The checker itself: a function-local ``from cxrgaze.pkg import submodule`` is followed."""
    script = tmp_path / "stage.py"
    script.write_text("def main():\n    from cxrgaze.train import loop\n")
    closure = {p.relative_to(SRC).as_posix() for p in import_closure(script)}
    assert {"cxrgaze/__init__.py", "cxrgaze/train/__init__.py", "cxrgaze/train/loop.py",
            "cxrgaze/train/step.py", "cxrgaze/checkpoint.py"} <= closure
