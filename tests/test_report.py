"""What the report, the Prefect artifacts and the CLI headline show of an evaluation."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd

from loraops.core.results import Decision, EvalSummary, Promotion, Signoff
from loraops.judge.report import exit_code, outcome, top_losses


def test_biggest_losses_are_real_losses_one_row_per_question_and_readable(tmp_path):
    rows = [("q1", 0.9, 0.2), ("q1", 0.8, 0.1), ("q2", 0.1, 0.7), ("q3", 0.5, 0.4)]
    table = pd.DataFrame({"question": [q for q, *_ in rows], "reference": ["r"] * 4,
                          "base_answer": ["벽지 " * 80] * 4, "tuned_answer": ["t"] * 4,
                          "base_morph_f1": [b for _, b, _ in rows], "tuned_morph_f1": [t for *_, t in rows]})
    (tmp_path / "reports").mkdir()
    table.to_csv(tmp_path / "reports/eval_questions.csv", index=False)
    losses = top_losses(tmp_path, "morph_f1")
    assert [(r["question"], r["delta"]) for r in losses] == [("q1", -0.7), ("q3", -0.1)]
    assert list(losses[0]) == ["delta", "question", "base", "tuned"] and len(losses[0]["base"]) == 120


def _summary(tuned: float, delta: float, ci95: tuple[float, float], tuned_degenerate: float = 0.0) -> EvalSummary:
    degenerate = {"count": 0, "rate": 0.0, "reasons": {}}
    return EvalSummary.model_validate({
        "n": 40, "empty_answers": {"base": 0, "tuned": 0}, "slices": {},
        "metrics": {"m": {"base": 0.3, "tuned": tuned, "delta": delta, "ci95": ci95, "wins": 1, "ties": 0, "losses": 1}},
        "degenerate": {"base": degenerate, "tuned": {**degenerate, "rate": tuned_degenerate}}})


def test_outcome_names_what_happened():
    summary = _summary(0.2, -0.1, (-0.15, -0.05))
    assert outcome(summary, "m", None)[0] == "Worse than base"
    summary = _summary(0.299, -0.001, (-0.02, 0.018))  # noise, not measurably worse
    assert outcome(summary, "m", None)[0] == "Registered"
    summary = _summary(0.5, 0.2, (0.1, 0.3))
    decision = Decision(False, ["mean m gain +0.0005 …", "category a regresses by 0.1"], "production v2",
                        {"metric": "m", "reference": 0.4995, "candidate": 0.5, "gain": 0.0005, "ci95": [-0.0052, 0.0081]},
                        ["category a regresses by 0.1"])
    refused = Promotion("m", "3", "2", promoted=False, decision=decision)
    name, message = outcome(summary, "m", refused)
    # the headline quotes what decided (production, not the base's +0.2) and the reason that refused
    assert name == "Refused" and exit_code(name) == 3
    assert "m production v2 0.4995 → v3 0.5000 (+0.0005, 95% CI [-0.0052, +0.0081])" in message, message
    assert message.endswith("category a regresses by 0.1") and "+0.2000" not in message
    assert outcome(summary, "m", replace(refused, promoted=True))[0] == "Promoted"
    assert outcome(summary, "m", None)[0] == "Registered"
    assert outcome(summary, "m", replace(refused, promoted=True, previous="3"))[0] == "Unchanged"
    summary = _summary(0.5, 0.2, (0.1, 0.3), tuned_degenerate=0.1)  # better mean, but more garbage than its base
    assert outcome(summary, "m", None)[0] == "Worse than base"
    assert [exit_code(n) for n in ("Promoted", "Registered", "Unchanged", "Refused", "Worse than base")] == [0, 0, 0, 3, 4]


def test_outcomes_that_are_no_success_and_the_promote_flows_names():
    from loraops.core.outcomes import NOT_SUCCESS, promotion_outcome

    base = Promotion("m", "2", "1", promoted=False)
    assert promotion_outcome(replace(base, promoted=True)) == "Promoted"
    assert promotion_outcome(replace(base, promoted=True, approval=Signoff("김", approved=True))) == "Approved"
    assert promotion_outcome(base) == "Refused"
    assert promotion_outcome(replace(base, approval=Signoff("박", "no"))) == "Rejected"
    assert promotion_outcome(replace(base, approval=Signoff("(nobody)"))) == "Timed out"
    assert promotion_outcome(replace(base, previous="2", promoted=True)) == "Unchanged"
    assert Promotion.from_dict(replace(base, approval=Signoff("박")).to_dict()) == replace(base, approval=Signoff("박"))
    assert set(NOT_SUCCESS) == {"Refused", "Worse than base", "Rejected", "Timed out"}
