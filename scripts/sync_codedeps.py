"""Rewrite each dvc.yaml stage's code dependencies (the ``src/loraops/...`` lines) from loraops.core.codedeps.

    python scripts/sync_codedeps.py          # after adding or moving an import a stage runs
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from loraops.core.codedeps import stage_files  # noqa: E402 - after the path is set
from loraops.core.paths import STAGES  # noqa: E402


def sync(text: str) -> str:
    """``text`` (dvc.yaml) with every stage's ``src/loraops`` deps replaced by the derived list, in place."""
    for stage in STAGES:
        block = re.search(rf"(?ms)^  {stage}:\n.*?(?=^  \w|^\S|\Z)", text)
        if block is None:
            raise SystemExit(f"dvc.yaml has no stage {stage!r}")
        body = block.group(0)
        lines = body.splitlines(keepends=True)
        first = next(i for i, line in enumerate(lines) if line.strip().startswith("- src/loraops/"))
        kept = [line for line in lines if not line.strip().startswith("- src/loraops/")]
        indent = re.match(r"\s*", lines[first]).group(0)
        derived = [f"{indent}- {path}\n" for path in stage_files(stage)]
        text = text.replace(body, "".join(kept[:first] + derived + kept[first:]))
    return text


if __name__ == "__main__":
    path = ROOT / "dvc.yaml"
    path.write_text(sync(path.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"synced the code deps of {', '.join(STAGES)} in {path}")
