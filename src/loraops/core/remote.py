"""DVC-tracked inputs that are not in the workspace (a fresh clone), fetched from the DVC remote.

Kept apart from :mod:`loraops.orchestration.workspace` so a stage command (`loraops index`) can pull its documents without
depending on the code that drives whole runs.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from loraops.core.errors import StageError

__all__ = ["pull_inputs", "pull_stage_inputs"]


def pull_inputs(root: Path, data_path: str, say: Callable[[str], Any] = print) -> None:
    """Fetch a DVC-tracked input (``data.path``, ``rag.docs_path``) that is not in the workspace (a fresh clone)
    from the DVC remote.

    Raises:
        StageError: the file is tracked but `dvc pull` could not bring it.
    """
    if (root / data_path).exists() or not (root / f"{data_path}.dvc").exists():
        return
    say(f"{data_path} is tracked by DVC but not here: dvc pull {data_path}.dvc")
    dvc = str(Path(sys.executable).parent / "dvc")
    out = subprocess.run([dvc, "pull", "-q", f"{data_path}.dvc"], cwd=root, capture_output=True, text=True)
    if out.returncode != 0 or not (root / data_path).exists():
        raise StageError(f"{data_path}: tracked by DVC but `dvc pull` failed: {out.stderr.strip()[-400:]}")


def pull_stage_inputs(root: Path, say: Callable[[str], Any] = print) -> list[str]:
    """Fetch every DVC-tracked input the pipeline's stages read that is not in the workspace (a fresh clone, a
    ``data.path`` or ``rag.docs_path`` tracked by its own ``.dvc`` file) from the DVC remote, as ``dvc repro --pull``
    would for them; stage outputs are left to the stages. Returns the ``.dvc`` files pulled.

    Raises:
        StageError: an input is tracked but `dvc pull` could not bring it.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with contextlib.chdir(root), Repo(".") as repo:
            stages = list(repo.index.stages)
            sources = {Path(out.fs_path): stage.addressing for stage in stages if stage.is_data_source
                       for out in stage.outs}
            needed = sorted({dvcfile for stage in stages if not stage.is_data_source for dep in stage.deps
                             for out, dvcfile in sources.items()
                             if not out.exists() and _overlap(Path(dep.fs_path), out)})
    except DvcException:  # a broken dvc.yaml: the stage itself will say what is wrong
        return []
    if needed:
        say(f"not in the workspace, tracked by DVC: dvc pull {' '.join(needed)}")
        dvc = str(Path(sys.executable).parent / "dvc")
        out = subprocess.run([dvc, "pull", "-q", *needed], cwd=root, capture_output=True, text=True)
        if out.returncode != 0:
            raise StageError(f"{', '.join(needed)}: tracked by DVC but `dvc pull` failed: {out.stderr.strip()[-400:]}")
    return needed


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents
