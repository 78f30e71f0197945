"""loraops: domain Q&A data → a gated, traceable LoRA adapter (Prefect + DVC + MLflow + peft).

The package is layered (docs/where-to-change.md): ``core`` → ``judge`` · ``modeling`` · ``retrieval`` → ``stages`` →
``registry`` → ``review`` · ``serving`` · ``orchestration`` → ``cli`` and ``flows``.

A version registered before the layers existed carries a ``python_model`` file that imports ``loraops.serve``. When
such a version loads in a process where this package is already imported, its old flat module names resolve to the
modules that hold those definitions now (:data:`MOVED`), so registered models keep loading.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from typing import Any

__version__ = "0.1.0"

MOVED = {
    "api": "serving.api", "approval": "review.approval", "augment": "stages.augment", "codedeps": "core.codedeps",
    "concurrency": "core.concurrency", "config": "core.config", "datainit": "stages.datainit",
    "degenerate": "judge.degenerate", "demo": "serving.demo", "errors": "core.errors", "evaluate": "stages.evaluate",
    "export": "serving.export", "form": "orchestration.form", "gate": "judge.gate", "index": "stages.index",
    "korean": "core.korean", "lineage": "registry.lineage", "metrics": "judge.metrics", "model": "modeling.model",
    "modelspec": "registry.modelspec", "outcomes": "core.outcomes", "packing": "modeling.packing",
    "paths": "core.paths", "prepare": "stages.prepare", "preview": "stages.preview",
    "prompting": "modeling.prompting", "pyfunc_model": "serving.pyfunc_model", "readers": "core.readers",
    "remote": "core.remote", "report": "judge.report", "reproduce": "registry.reproduce", "results": "core.results",
    "score": "judge.score", "secrets": "core.secrets", "serve": "serving.pyfunc", "sweep": "orchestration.sweep",
    "tone": "judge.tone", "tracking": "registry.tracking", "train": "stages.train", "utils": "core.utils",
    "validity": "judge.validity", "workspace": "orchestration.workspace",
}
"""Flat module name (before the layers) → its module now, relative to ``loraops``. ``registry`` and ``review`` are
packages now (their modules are ``registry.versions`` and ``review.rubric``)."""


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return importlib.import_module(self.target)

    def exec_module(self, module: Any) -> None:
        """The target module has run already."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        prefix, _, name = fullname.partition(".")
        if prefix != __name__ or name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, _Alias(f"{__name__}.{MOVED[name]}"))


if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
    sys.meta_path.append(_MovedFinder())
