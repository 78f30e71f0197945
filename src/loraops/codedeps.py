"""Which loraops modules a DVC stage runs: the import closure, read from the source, not kept by hand.

``dvc.yaml`` must list exactly these files as the stage's code dependencies (a test checks it), so a
change to any module a stage imports reruns the stage, and the lineage card never names code that did
not produce the adapter. Imports inside functions count: they run when the stage runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent
STAGE_MODULES = {"prepare": "data", "train": "train", "evaluate": "evaluate"}
"""The module holding each DVC stage's logic (``cmd: loraops <stage>`` calls the CLI command of that name)."""


def _imports(tree: ast.AST) -> set[str]:
    """loraops modules named by the import statements anywhere under ``tree``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "loraops":
            if node.module == "loraops":  # from loraops import data, train
                found |= {alias.name for alias in node.names if (PACKAGE / f"{alias.name}.py").exists()}
            else:
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("loraops.")}
    return found


def _parse(module: str) -> ast.Module:
    return ast.parse((PACKAGE / f"{module}.py").read_text(encoding="utf-8"))


def closure(roots: set[str]) -> set[str]:
    """``roots`` and every loraops module they import, directly or not."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += sorted(_imports(_parse(module)) - seen)
    return seen


def stage_modules(stage: str) -> set[str]:
    """What ``loraops <stage>`` imports: the CLI's module-level imports, its command, the stage module."""
    cli = _parse("cli")
    top = {n for n in cli.body if isinstance(n, (ast.Import, ast.ImportFrom))}
    command = next(n for n in cli.body if isinstance(n, ast.FunctionDef) and n.name == stage)
    roots = {"__init__", STAGE_MODULES[stage]} | _imports(command)
    for node in top:
        roots |= _imports(node)
    return closure(roots) | {"cli"}  # cli's other commands' imports do not run for this stage


def stage_files(stage: str, prefix: str = "src/loraops") -> list[str]:
    """The stage's code dependencies as ``dvc.yaml`` lists them."""
    return sorted(f"{prefix}/{m}.py" for m in stage_modules(stage))
