"""Which loraops modules a DVC stage runs: the import closure, read from the source, not kept by hand.

``dvc.yaml`` must list exactly these files as the stage's code dependencies (a test checks it), so a
change to any module a stage imports reruns the stage, and the lineage card never names code that did
not produce the adapter. Imports inside functions count: they run when the stage runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1]
CLI_MODULE = "cli.stages"
"""The CLI module holding the stages' commands (``cmd: loraops <stage>`` in dvc.yaml)."""


def _file(module: str) -> Path:
    """``cli.stages`` → ``cli/stages.py``; a package → its ``__init__.py``."""
    path = PACKAGE.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _with_parents(module: str) -> set[str]:
    """Importing ``cli.stages`` runs ``cli/__init__.py`` first."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _imports(tree: ast.AST) -> set[str]:
    """loraops modules named by the import statements anywhere under ``tree`` (dotted, relative to the package)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "loraops":
            inner = node.module.split(".", 1)[1] if "." in node.module else ""
            if inner:
                found |= _with_parents(inner)
            for alias in node.names:  # from loraops import prepare / from loraops.cli import stages
                candidate = f"{inner}.{alias.name}" if inner else alias.name
                if _file(candidate).exists():
                    found |= _with_parents(candidate)
        elif isinstance(node, ast.Import):
            found |= {m for a in node.names if a.name.startswith("loraops.") for m in _with_parents(a.name.split(".", 1)[1])}
    return found


def _parse(module: str) -> ast.Module:
    return ast.parse(_file(module).read_text(encoding="utf-8"))


def _top_imports(module: str) -> set[str]:
    return {m for node in _parse(module).body if isinstance(node, (ast.Import, ast.ImportFrom)) for m in _imports(node)}


def closure(roots: set[str]) -> set[str]:
    """``roots`` and every loraops module they import, directly or not.

    In the CLI package only module-level imports count: a command's body runs only for that command.
    """
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        found = _top_imports(module) if module.split(".")[0] == "cli" else _imports(_parse(module))
        todo += sorted(found - seen)
    return seen


def stage_modules(stage: str) -> set[str]:
    """What ``loraops <stage>`` imports: the CLI package and the module of the stage commands (``loraops.cli.main``
    imports only the module of the command it runs), the stage command's body, the stage module (``stages/<stage>.py``)."""
    command = next(n for n in _parse(CLI_MODULE).body if isinstance(n, ast.FunctionDef) and n.name == stage)
    return closure({"cli", CLI_MODULE, f"stages.{stage}"} | _imports(command)) | {"__init__"}


def stage_files(stage: str, prefix: str = "src/loraops") -> list[str]:
    """The stage's code dependencies as ``dvc.yaml`` lists them."""
    return sorted(f"{prefix}/{_file(m).relative_to(PACKAGE).as_posix()}" if m != "__init__" else f"{prefix}/__init__.py"
                  for m in stage_modules(stage))
