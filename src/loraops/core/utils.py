"""Small helpers shared by the stages: atomic outputs, hashing, device choice."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target`` that replaces it only if the block succeeds.

    A failure leaves the previous ``target`` (or nothing) in place, never a half-written one.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the folder it becomes gets the usual mode
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask would, for every thread)."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    """Write pretty UTF-8 JSON atomically."""
    atomic_write(path, json.dumps(data, ensure_ascii=False, indent=2) + "\n")


_LINE_BREAKS = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def jsonl_line(obj: Any) -> str:
    """One JSON Lines line (with its ``\\n``), readable as UTF-8 text: the characters other tools also take for line
    breaks (U+0085, U+2028, U+2029; JSON escapes the control ones itself) are written as escapes, so no reader that
    splits lines the Unicode way (Python's ``str.splitlines``, editors) cuts a record in two."""
    text = json.dumps(obj, ensure_ascii=False)
    for char, escaped in _LINE_BREAKS.items():
        text = text.replace(char, escaped)
    return text + "\n"


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSON Lines text, split on ``\\n`` only (as the format defines), without a trailing ``\\r``."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def sha256_files(paths: list[Path]) -> str:
    """One sha256 over the names and bytes of ``paths`` (sorted), for content identity of a directory."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with path.open("rb") as fh:  # streamed: a base's weight files can be larger than memory
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def sha256_dir(directory: Path, pattern: str = "*") -> str:
    """Content hash of the files in ``directory`` matching ``pattern`` (recursive)."""
    return sha256_files([p for p in directory.rglob(pattern) if p.is_file()])


def pick_device(requested: str) -> str:
    """Resolve ``base.device`` (auto|cpu|cuda) to a torch device name.

    Raises:
        RuntimeError: when CUDA is requested and absent.
    """
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device=cuda, but no CUDA device is available; set base.device=auto or cpu")
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def progress_lines() -> bool:
    """Report progress as plain lines (a DVC stage under a flow, a pipe, a log) rather than redrawn bars."""
    import sys

    return os.environ.get("LORAOPS_PROGRESS") == "lines" or not sys.stderr.isatty()


def say(message: str) -> None:
    """One progress line on stdout, flushed (a flow streams it into the Prefect run log)."""
    print(message, flush=True)
