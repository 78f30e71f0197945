"""The promotion decision: a pure function of two per-question score tables and the gate policy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from loraops.core.config import GatePolicy
from loraops.core.results import Decision
from loraops.judge.report import paired_bootstrap

KEY = ["question", "reference"]
__all__ = ["Decision", "decide", "quality"]


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
    floors = quality(candidate, policy)
    slices = tuple(c for c in dict.fromkeys(("category", *slices)) if c in candidate.columns)
    merged = candidate[KEY + list(slices) + ["score", "degenerate"]].merge(
        reference[KEY + ["score", "degenerate"]], on=KEY, suffixes=("_candidate", "_reference"))
    merged = merged.drop_duplicates(subset=KEY).dropna(subset=["score_candidate", "score_reference"])  # unparsed judge replies
    deltas = (merged["score_candidate"] - merged["score_reference"]).to_numpy(dtype=float)
    figures: dict[str, Any] = {"metric": policy.metric, "shared_questions": int(len(merged))}
    reasons: list[str] = []
    failures: list[str] = []
    if len(merged) < policy.min_test_size:
        _fail(reasons, failures, f"only {len(merged)} shared test questions; the gate needs at least {policy.min_test_size}")
        return Decision(False, reasons, against, figures, failures)
    gain = float(deltas.mean())
    low, high = paired_bootstrap(deltas, samples, seed)
    figures.update(candidate=round(float(merged["score_candidate"].mean()), 6),
                   reference=round(float(merged["score_reference"].mean()), 6),
                   gain=round(gain, 6), ci95=[round(low, 6), round(high, 6)],
                   wins=int((deltas > 1e-9).sum()), losses=int((deltas < -1e-9).sum()))
    ok = not floors.breaches
    figures["floors"] = floors.to_dict()
    failures.extend(floors.breaches)  # the floors refuse first: a broken model is not compared any further
    if policy.require_significance:
        if low <= policy.min_gain:
            ok = False
            _fail(reasons, failures, f"mean {policy.metric} gain {gain:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}]: its lower end "
                           f"does not exceed the minimum {policy.min_gain:+.4f} (not measurably better)")
        else:
            reasons.append(f"mean {policy.metric} gain {gain:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}] > minimum "
                           f"{policy.min_gain:+.4f}")
    elif gain <= policy.min_gain:
        ok = False
        _fail(reasons, failures, f"mean {policy.metric} gain {gain:+.4f} is not above the minimum {policy.min_gain:+.4f}")
    else:
        reasons.append(f"mean {policy.metric} gain {gain:+.4f} > minimum {policy.min_gain:+.4f} (significance not required)")
    reasons.extend(floors.breaches + floors.passes)
    rates = (float(merged["degenerate_candidate"].mean()), float(merged["degenerate_reference"].mean()))
    figures["degenerate_rate"] = {"candidate": round(rates[0], 6), "reference": round(rates[1], 6)}
    if rates[0] > rates[1] + policy.max_degenerate_increase + 1e-12:
        ok = False
        _fail(reasons, failures, f"degenerate answers {rates[0]:.1%} vs {rates[1]:.1%} for {against} (allowed increase "
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
                _fail(reasons, failures, f"{column} {value!s} regresses by {-change:.4f} (> {policy.max_category_regression}) "
                               f"on {len(part)} questions")
        figures["categories" if column == "category" else f"slices/{column}"] = changes
    if policy.min_rubric_mean is not None:
        if rubric is None:
            reasons.append("no rubric reviews for the candidate; the rubric check does not apply")
        elif rubric < policy.min_rubric_mean:
            ok = False
            _fail(reasons, failures, f"rubric mean {rubric:.2f} is below the minimum {policy.min_rubric_mean:.2f}")
        else:
            reasons.append(f"rubric mean {rubric:.2f} ≥ minimum {policy.min_rubric_mean:.2f}")
    return Decision(ok, reasons, against, figures, failures)


@dataclass
class Quality:
    """The candidate's absolute floors, whatever it is compared with: how often it degenerates, how many distinct
    answers it gives (a collapsed model answers every question with the same few lines)."""

    degenerate_rate: float
    distinct_share: float | None  # distinct answers / distinct questions; None without the answer text
    reference_distinct_share: float | None
    breaches: list[str] = field(default_factory=list)
    passes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def quality(candidate: pd.DataFrame, policy: GatePolicy) -> Quality:
    """Measure the floors ``registry.gate.max_degenerate_rate`` and ``min_distinct_share`` on a candidate table
    (``question``, ``reference``, ``degenerate``, and ``answer`` when the answers are known)."""
    table = _with_flags(candidate)
    rate = float(table["degenerate"].mean()) if len(table) else 0.0
    share = ref_share = None
    if "answer" in table.columns and len(table):
        per_question = table.drop_duplicates("question")
        share = _distinct(per_question["answer"]) / len(per_question)
        ref_share = _distinct(per_question["reference"]) / len(per_question)
    out = Quality(round(rate, 6), None if share is None else round(share, 6),
                  None if ref_share is None else round(ref_share, 6))
    floor = f"registry.gate.max_degenerate_rate {policy.max_degenerate_rate:.0%}"
    if rate > policy.max_degenerate_rate + 1e-12:
        out.breaches.append(f"mostly broken: {rate:.1%} of the answers are degenerate, above the floor {floor}")
    else:
        out.passes.append(f"{rate:.1%} degenerate answers, within the floor {floor}")
    if share is not None and ref_share is not None:
        needed = policy.min_distinct_share * ref_share
        n = int(table["question"].nunique())
        line = (f"distinct answers {share:.0%} of {n} questions (references {ref_share:.0%}; floor "
                f"registry.gate.min_distinct_share {policy.min_distinct_share:.0%} of theirs = {needed:.0%})")
        if share + 1e-12 < needed:
            out.breaches.append("collapsed answers: " + line)
        else:
            out.passes.append(line)
    return out


def _distinct(texts: pd.Series) -> int:
    return int(texts.astype(str).str.split().str.join(" ").str.strip().nunique())


def _fail(reasons: list[str], failures: list[str], reason: str) -> None:
    reasons.append(reason)
    failures.append(reason)


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
    answers = f"{column.split('_', 1)[0]}_answer"
    text = {"answer": table[answers].astype(str)} if answers in table.columns else {}
    return pd.DataFrame({"question": table["question"], "reference": table["reference"],
                         "category": table["category"], "score": table[column].astype(float), "degenerate": degenerate,
                         **text,
                         **{a: table[a].astype(str) for a in attributes if a in table.columns}})
