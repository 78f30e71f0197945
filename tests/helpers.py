"""Helpers the tests import (constants and builders); fixtures live in conftest.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Settings that keep a whole train + evaluate in seconds on two CPU cores, and still learn: 150 steps
# take ~4 s and lift morph_f1 from 0 (the untrained base answers garbage) to ~0.12 with a 95% interval
# above 0, so the default gate (significance required) promotes it; a run that learns nothing is refused.
TINY = [
    "model.tiny.layers=1", "model.tiny.vocab_size=1000", "model.max_length=96", "lora.r=8", "lora.alpha=16",
    "train.max_steps=150", "train.eval_steps=50", "train.learning_rate=0.005", "train.logging_steps=10",
    "eval.max_samples=30", "eval.max_new_tokens=32", "eval.bootstrap_samples=200",
    "registry.gate.min_test_size=5",
]


def tiny_overrides(*extra: str) -> list[str]:
    return [*TINY, *extra]


def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def make_workspace(dest: Path, overrides: list[str] | None = None) -> Path:
    """A git + DVC copy of the project's tracked files, with the sample data pulled and params set."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        src = REPO / name
        if src.is_file() and not name.startswith(("mlruns/", "dvc-remote/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    _run(["git", "init", "-q", "-b", "main"], dest)
    _run(["git", "config", "user.email", "ci@loraops.invalid"], dest)
    _run(["git", "config", "user.name", "loraops-ci"], dest)
    dvc = str(Path(sys.executable).parent / "dvc")
    _run([dvc, "remote", "modify", "sample", "url", str(REPO / "dvc-remote")], dest)
    _run([dvc, "pull", "-q", "data/raw/interior_qa.csv.dvc"], dest)
    if overrides:
        from loraops.workspace import write_params

        write_params("params.yaml", overrides, dest)
    _run(["git", "add", "-A"], dest)
    _run(["git", "commit", "-qm", "workspace"], dest)
    return dest
