"""The promotion decision: a pure function of two per-question score tables and the gate policy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from loraops.config import GatePolicy
from loraops.report import paired_bootstrap

KEY = ["question", "reference"]


@dataclass
class Decision:
    """Promote or refuse, with the reasons and the figures behind them."""

    promote: bool
    reasons: list[str]
    against: str
    figures: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decide(candidate: pd.DataFrame, reference: pd.DataFrame, policy: GatePolicy, against: str,
           samples: int = 1000, seed: int = 0, min_slice: int = 5, rubric: float | None = None) -> Decision:
    """Compare candidate and reference scores question by question.

    Both tables have columns ``question``, ``reference``, ``category`` and ``score`` (the primary metric).
    Rows are matched on (question, reference). The candidate passes when there are at least
    ``min_test_size`` shared questions, the mean gain is at least ``min_gain``, no category of at least
    ``min_slice`` questions drops by more than ``max_category_regression``, and — when required — the
    bootstrap 95% interval of the gain excludes zero; when ``min_rubric_mean`` is set and the candidate
    has human reviews (``rubric``, the tuned answers' mean 1–5), that mean must reach it.
    """
    merged = candidate[KEY + ["category", "score"]].merge(
        reference[KEY + ["score"]], on=KEY, suffixes=("_candidate", "_reference"))
    merged = merged.drop_duplicates(subset=KEY)
    deltas = (merged["score_candidate"] - merged["score_reference"]).to_numpy(dtype=float)
    figures: dict[str, Any] = {"metric": policy.metric, "shared_questions": int(len(merged))}
    reasons: list[str] = []
    if len(merged) < policy.min_test_size:
        reasons.append(f"only {len(merged)} shared test questions; the gate needs at least {policy.min_test_size}")
        return Decision(False, reasons, against, figures)
    gain = float(deltas.mean())
    low, high = paired_bootstrap(deltas, samples, seed)
    figures.update(candidate=round(float(merged["score_candidate"].mean()), 6),
                   reference=round(float(merged["score_reference"].mean()), 6),
                   gain=round(gain, 6), ci95=[round(low, 6), round(high, 6)],
                   wins=int((deltas > 1e-9).sum()), losses=int((deltas < -1e-9).sum()))
    ok = True
    if gain < policy.min_gain:
        ok = False
        reasons.append(f"mean {policy.metric} gain {gain:+.4f} is below the minimum {policy.min_gain:+.4f}")
    else:
        reasons.append(f"mean {policy.metric} gain {gain:+.4f} ≥ minimum {policy.min_gain:+.4f}")
    slices = {}
    for category, part in merged.groupby("category", sort=True):
        change = float((part["score_candidate"] - part["score_reference"]).mean())
        slices[str(category)] = {"n": int(len(part)), "change": round(change, 6)}
        if len(part) >= min_slice and change < -policy.max_category_regression:
            ok = False
            reasons.append(f"category {category!s} regresses by {-change:.4f} (> {policy.max_category_regression}) "
                           f"on {len(part)} questions")
    figures["categories"] = slices
    if policy.require_significance:
        if low <= 0:
            ok = False
            reasons.append(f"95% interval of the gain [{low:+.4f}, {high:+.4f}] includes 0 (require_significance)")
        else:
            reasons.append(f"95% interval of the gain [{low:+.4f}, {high:+.4f}] excludes 0")
    if policy.min_rubric_mean is not None:
        if rubric is None:
            reasons.append("no rubric reviews for the candidate; the rubric check does not apply")
        elif rubric < policy.min_rubric_mean:
            ok = False
            reasons.append(f"rubric mean {rubric:.2f} is below the minimum {policy.min_rubric_mean:.2f}")
        else:
            reasons.append(f"rubric mean {rubric:.2f} ≥ minimum {policy.min_rubric_mean:.2f}")
    return Decision(ok, reasons, against, figures)


def scores_from_table(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """Reduce an eval table to the gate's columns using ``column`` as the score."""
    if column not in table.columns:
        raise KeyError(column)
    return pd.DataFrame({"question": table["question"], "reference": table["reference"],
                         "category": table["category"], "score": table[column].astype(float)})
