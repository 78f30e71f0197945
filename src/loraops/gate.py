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
           samples: int = 1000, seed: int = 0, min_slice: int = 5, rubric: float | None = None,
           slices: tuple[str, ...] = ("category",)) -> Decision:
    """Compare candidate and reference scores question by question.

    Both tables have columns ``question``, ``reference``, ``category``, ``score`` (the primary metric)
    and optionally ``degenerate``. Rows are matched on (question, reference). The candidate passes when
    there are at least ``min_test_size`` shared questions; the gain exceeds ``min_gain`` — its bootstrap
    95% lower bound when ``require_significance`` (the default), else its mean, so a tie never passes;
    no slice of at least ``min_slice`` questions — per category and per value of every other column in
    ``slices`` the candidate table has (the data's attribute columns) — drops by more than
    ``max_category_regression``; its
    share of degenerate answers is not higher than the reference's by more than
    ``max_degenerate_increase``; and, when ``min_rubric_mean`` is set and the candidate has human reviews
    (``rubric``, the tuned answers' mean 1–5), that mean reaches it.
    """
    candidate, reference = _with_flags(candidate), _with_flags(reference)
    slices = tuple(c for c in dict.fromkeys(("category", *slices)) if c in candidate.columns)
    merged = candidate[KEY + list(slices) + ["score", "degenerate"]].merge(
        reference[KEY + ["score", "degenerate"]], on=KEY, suffixes=("_candidate", "_reference"))
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
    if policy.require_significance:
        if low <= policy.min_gain:
            ok = False
            reasons.append(f"mean {policy.metric} gain {gain:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}]: its lower end "
                           f"does not exceed the minimum {policy.min_gain:+.4f} (not measurably better)")
        else:
            reasons.append(f"mean {policy.metric} gain {gain:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}] > minimum "
                           f"{policy.min_gain:+.4f}")
    elif gain <= policy.min_gain:
        ok = False
        reasons.append(f"mean {policy.metric} gain {gain:+.4f} is not above the minimum {policy.min_gain:+.4f}")
    else:
        reasons.append(f"mean {policy.metric} gain {gain:+.4f} > minimum {policy.min_gain:+.4f} (significance not required)")
    rates = (float(merged["degenerate_candidate"].mean()), float(merged["degenerate_reference"].mean()))
    figures["degenerate_rate"] = {"candidate": round(rates[0], 6), "reference": round(rates[1], 6)}
    if rates[0] > rates[1] + policy.max_degenerate_increase + 1e-12:
        ok = False
        reasons.append(f"degenerate answers {rates[0]:.1%} vs {rates[1]:.1%} for {against} (allowed increase "
                       f"{policy.max_degenerate_increase:.1%})")
    else:
        reasons.append(f"degenerate answers {rates[0]:.1%} vs {rates[1]:.1%} for {against}")
    for column in slices:
        changes = {}
        for value, part in merged.groupby(column, sort=True):
            change = float((part["score_candidate"] - part["score_reference"]).mean())
            changes[str(value)] = {"n": int(len(part)), "change": round(change, 6)}
            if len(part) >= min_slice and change < -policy.max_category_regression:
                ok = False
                reasons.append(f"{column} {value!s} regresses by {-change:.4f} (> {policy.max_category_regression}) "
                               f"on {len(part)} questions")
        figures["categories" if column == "category" else f"slices/{column}"] = changes
    if policy.min_rubric_mean is not None:
        if rubric is None:
            reasons.append("no rubric reviews for the candidate; the rubric check does not apply")
        elif rubric < policy.min_rubric_mean:
            ok = False
            reasons.append(f"rubric mean {rubric:.2f} is below the minimum {policy.min_rubric_mean:.2f}")
        else:
            reasons.append(f"rubric mean {rubric:.2f} ≥ minimum {policy.min_rubric_mean:.2f}")
    return Decision(ok, reasons, against, figures)


def _with_flags(table: pd.DataFrame) -> pd.DataFrame:
    return table if "degenerate" in table.columns else table.assign(degenerate=False)


def scores_from_table(table: pd.DataFrame, column: str, attributes: list[str] | tuple[str, ...] = ()) -> pd.DataFrame:
    """Reduce an eval table to the gate's columns using ``column`` (``base_<m>`` or ``tuned_<m>``) as the score,
    with the ``attributes`` columns it has (slices for the no-regression check).

    The model's degenerate flags come along when the table has them (tables older than the check have none).
    """
    if column not in table.columns:
        raise KeyError(column)
    flags = f"{column.split('_', 1)[0]}_degenerate"
    degenerate = table[flags].astype(str).str.lower().eq("true") if flags in table.columns else False
    return pd.DataFrame({"question": table["question"], "reference": table["reference"],
                         "category": table["category"], "score": table[column].astype(float), "degenerate": degenerate,
                         **{a: table[a].astype(str) for a in attributes if a in table.columns}})
