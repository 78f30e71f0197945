"""The promotion decision is a pure function of two score tables and the policy."""

from __future__ import annotations

import pandas as pd

from loraops.core.config import GatePolicy
from loraops.judge.gate import decide


def _table(scores, categories=None):
    n = len(scores)
    return pd.DataFrame({"question": [f"q{i}" for i in range(n)], "reference": [f"r{i}" for i in range(n)],
                         "category": categories or ["a"] * n, "score": scores})


POLICY = GatePolicy(metric="cosine", min_gain=0.01, max_category_regression=0.05, min_test_size=4)


def test_gain_promotes_with_reasons():
    d = decide(_table([0.8] * 6), _table([0.6] * 6), POLICY, "production v1")
    assert d.promote and d.figures["gain"] == 0.2 and "> minimum +0.0100" in d.reasons[0]


def test_too_small_gain_is_refused():
    d = decide(_table([0.605] * 6), _table([0.6] * 6), POLICY, "production v1")
    assert not d.promote and "does not exceed the minimum" in d.reasons[0]
    plain = POLICY.model_copy(update={"require_significance": False})
    assert "is not above the minimum" in decide(_table([0.605] * 6), _table([0.6] * 6), plain, "p").reasons[0]


def test_slice_regression_is_refused_even_with_overall_gain():
    cats = ["a"] * 5 + ["b"] * 5
    cand = _table([0.9] * 5 + [0.5] * 5, cats)
    ref = _table([0.5] * 5 + [0.6] * 5, cats)
    d = decide(cand, ref, POLICY, "production v1", min_slice=5)
    assert not d.promote
    assert any("category b regresses by 0.1000" in r for r in d.reasons)


def test_too_few_questions_is_refused():
    d = decide(_table([0.9] * 3), _table([0.1] * 3), POLICY, "production v1")
    assert not d.promote and "only 3 shared test questions" in d.reasons[0]


def test_only_shared_questions_count():
    cand, ref = _table([0.9] * 6), _table([0.1] * 6)
    ref["question"] = [f"other{i}" for i in range(6)]
    assert decide(cand, ref, POLICY, "production v1").figures["shared_questions"] == 0


def test_no_production_compares_with_base_and_significance():
    policy = POLICY.model_copy(update={"require_significance": True})
    noisy = decide(_table([0.7, 0.5, 0.7, 0.5, 0.62, 0.58]), _table([0.6] * 6), policy, "base model (no production yet)")
    assert not noisy.promote and any("not measurably better" in r for r in noisy.reasons)
    clear = decide(_table([0.8, 0.82, 0.79, 0.81, 0.8, 0.83]), _table([0.6] * 6), policy, "base model (no production yet)")
    assert clear.promote and clear.against.startswith("base model")


def test_rubric_minimum_applies_only_when_reviews_exist():
    policy = POLICY.model_copy(update={"min_rubric_mean": 3.5})
    cand, ref = _table([0.8] * 6), _table([0.6] * 6)
    assert decide(cand, ref, policy, "production v1", rubric=None).promote
    low = decide(cand, ref, policy, "production v1", rubric=3.1)
    assert not low.promote and "rubric mean 3.10 is below the minimum 3.50" in low.reasons[-1]
    assert decide(cand, ref, policy, "production v1", rubric=4.0).promote


DEFAULT = GatePolicy(metric="morph_f1", min_test_size=4)


def test_default_gate_refuses_a_tie():
    """A training that did nothing scores like its reference: the default gate must not promote it."""
    d = decide(_table([0.5] * 30), _table([0.5] * 30), DEFAULT, "base model (no production yet)")
    assert not d.promote and any("not measurably better" in r for r in d.reasons)


def test_default_gate_refuses_noise_but_promotes_a_clear_gain():
    import numpy as np

    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.2, 30)
    assert not decide(_table(list(0.5 + noise)), _table([0.5] * 30), DEFAULT, "p").promote
    assert decide(_table(list(0.7 + noise / 4)), _table([0.5] * 30), DEFAULT, "p").promote


def test_more_degenerate_answers_are_refused_even_with_a_gain():
    cand = _table([0.9] * 10).assign(degenerate=[True] * 2 + [False] * 8)
    ref = _table([0.5] * 10).assign(degenerate=False)
    d = decide(cand, ref, DEFAULT, "production v1")
    assert not d.promote and any(r.startswith("degenerate answers 20.0% vs 0.0%") for r in d.reasons)
    assert d.figures["degenerate_rate"] == {"candidate": 0.2, "reference": 0.0}
    assert decide(cand, ref.assign(degenerate=cand["degenerate"]), DEFAULT, "p").promote


def test_a_target_age_that_regresses_refuses_even_when_every_category_gains():
    """Slices by every attribute column the data has, not only by category (the copy domain's target ages)."""
    ages = ["20대", "50대 이상"] * 5
    cand, ref = _table([0.9, 0.5] * 5), _table([0.5, 0.6] * 5)
    cand["target_age"] = ages
    policy = POLICY.model_copy(update={"require_significance": False})  # half the questions lose: no interval clears 0
    d = decide(cand, ref, policy, "production v1", min_slice=5, slices=("target_age",))
    assert not d.promote and any("target_age 50대 이상 regresses by 0.1000 (> 0.05) on 5 questions" in r for r in d.reasons)
    assert d.figures["slices/target_age"]["20대"] == {"n": 5, "change": 0.4}
    assert decide(cand, ref, policy, "production v1", min_slice=5).promote  # without the slice: only category a


def _answered(scores, answers, degenerate):
    return _table(scores).assign(answer=answers, degenerate=degenerate)


def test_floors_refuse_a_mostly_broken_or_collapsed_candidate_whatever_the_reference():
    """The wallpaper and FAQ trials: a reference that is broken too (the base, 100% degenerate) must not let a
    candidate through that loops on most answers or gives one canned line to every question."""
    n = 20
    broken_base = _answered([0.0] * n, ["반복 반복 반복"] * n, [True] * n)
    loops = _answered([0.05] * n, [f"답변 {i}" for i in range(n)], [i < 15 for i in range(n)])  # 75% degenerate
    d = decide(loops, broken_base, POLICY.model_copy(update={"min_gain": 0.0}), "base model (no production yet)")
    assert not d.promote and d.failures[0].startswith("mostly broken: 75.0% of the answers are degenerate")
    assert "registry.gate.max_degenerate_rate 50%" in d.failures[0] and d.figures["floors"]["degenerate_rate"] == 0.75

    canned = _answered([0.3] * n, ["고객센터로 문의해 주세요."] * 10 + [f"답변 {i}" for i in range(10)], [False] * n)
    d = decide(canned, broken_base, POLICY.model_copy(update={"min_gain": 0.0}), "base model (no production yet)")
    assert not d.promote and d.failures == [d.failures[0]] and d.failures[0].startswith("collapsed answers")
    assert "distinct answers 55% of 20 questions" in d.failures[0] and "min_distinct_share" in d.failures[0]


def test_floors_pass_healthy_answers_and_follow_the_references_own_repetition():
    n = 20
    healthy = _answered([0.5] * n, [f"답변 {i}" for i in range(n)], [False] * n)
    d = decide(healthy, _table([0.1] * n), POLICY, "production v1")
    assert d.promote and not d.failures and any("within the floor" in r for r in d.reasons)
    # an FAQ whose references repeat one canned answer for half the questions: the same repetition is not a collapse
    faq = _answered([0.5] * n, ["고객센터로 문의해 주세요."] * 10 + [f"답변 {i}" for i in range(10)], [False] * n)
    faq["reference"] = ["고객센터로 문의해 주세요."] * 10 + [f"r{i}" for i in range(10)]
    assert decide(faq, faq.assign(score=0.1), POLICY, "production v1").promote
