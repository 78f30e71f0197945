"""The type checker over src/ (settings in pyproject.toml's [tool.mypy]): no errors, and every ignore says why."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from helpers import REPO


@pytest.mark.slow
def test_mypy_finds_no_errors_in_src():
    done = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary"], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-2000:]


def test_every_type_ignore_and_noqa_names_its_code_and_reason():
    """`# type: ignore[code]  # why` and `# noqa: CODE - why`: a bare ignore hides the next error too."""
    bare = []
    for path in [*(REPO / "src").rglob("*.py"), *(REPO / "flows").rglob("*.py")]:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            ignore = re.search(r"# type: ignore(\[[a-z-, ]+\])?(.*)", line)
            if ignore and (not ignore.group(1) or not re.search(r"#\s*\S", ignore.group(2))) and \
                    not _reason_above(path, number):
                bare.append(f"{path.relative_to(REPO)}:{number}")
            noqa = re.search(r"# noqa(: [A-Z0-9, ]+)?(.*)", line)
            if noqa and (not noqa.group(1) or not re.search(r"\S", noqa.group(2).lstrip(" -"))):
                bare.append(f"{path.relative_to(REPO)}:{number}")
    assert not bare, "ignores without a code or a reason: " + ", ".join(bare)


def _reason_above(path, number: int) -> bool:
    """A block of same-kind ignores may share one comment above it that names them ("The valid-type ignores below")."""
    lines = path.read_text(encoding="utf-8").splitlines()[: number - 1]
    for line in reversed(lines[-12:]):
        if "ignores below" in line:
            return True
    return False
