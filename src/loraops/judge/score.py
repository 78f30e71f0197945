"""`loraops score`: score a team's own (reference, candidate) pairs with the configured metric pack.

This is how a team checks a metric against its own judgements: the output keeps every input row and
adds one column per metric (the names used in ``metrics/eval.json``) plus ``degenerate`` and
``degenerate_reason``; a degenerate candidate scores 0 everywhere, exactly as in `evaluate`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from loraops.core.config import Params
from loraops.core.errors import DataError
from loraops.core.utils import atomic_write, pick_device
from loraops.judge.metrics import MetricPack

REQUIRED = ("reference", "candidate")


def read_pairs(path: Path) -> pd.DataFrame:
    """The pairs CSV, every cell as text.

    Raises:
        DataError: a missing or unreadable file, a missing column, or a row without a reference.
    """
    if not path.is_file():
        raise DataError(f"{path}: not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable UTF-8 CSV file: {exc}") from None
    missing = [c for c in REQUIRED if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, frame.columns)) or 'none'}")
    blank = frame.index[frame["reference"].str.strip() == ""]
    if len(blank):
        raise DataError(f"{path}: row {blank[0] + 2}: empty reference (a pair needs something to compare with)")
    return frame


def score_pairs(frame: pd.DataFrame, pack: MetricPack) -> pd.DataFrame:
    """The input rows with one column per metric, ``degenerate`` and ``degenerate_reason``."""
    scores, reasons = pack.judge(list(frame["candidate"]), list(frame["reference"]))
    out = frame.copy()
    for column, values in scores.items():
        out[column] = [round(v, 6) for v in values]
    out["degenerate"] = [reason is not None for reason in reasons]
    out["degenerate_reason"] = [reason or "" for reason in reasons]
    return out


def means(scored: pd.DataFrame, columns: list[str]) -> dict[str, Any]:
    """Mean per metric, how many pairs and how many were degenerate (per category when present)."""
    out: dict[str, Any] = {"n": int(len(scored)), "degenerate": int(scored["degenerate"].sum()),
                           "metrics": {c: round(float(scored[c].mean()), 6) if len(scored) else 0.0 for c in columns}}
    if "category" in scored.columns:
        out["categories"] = {str(k): {c: round(float(g[c].mean()), 6) for c in columns}
                             for k, g in scored.groupby("category", sort=True)}
    return out


def run(params: Params, path: Path, out: Path) -> dict[str, Any]:
    """Read ``path``, score it and write ``out`` (atomically); return the means."""
    frame = read_pairs(path)
    pack = MetricPack(params.eval, device=pick_device(params.base.device))
    scored = score_pairs(frame, pack)
    atomic_write(out, scored.to_csv(index=False))
    return means(scored, pack.columns)
