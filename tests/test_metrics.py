"""The metric pack on Korean text: identity, NFC/NFD, empty and degenerate answers, morphemes, a broken encoder."""

from __future__ import annotations

import unicodedata

import numpy as np
import pandas as pd
import pytest

from loraops.core.config import EvalSection
from loraops.judge.metrics import MetricError, MetricPack, exact_match, lcs_length, morph_f1, token_f1
from loraops.judge.report import compare, paired_bootstrap, summarize


@pytest.fixture(scope="module")
def pack():
    return MetricPack(EvalSection())


KO = "벽지가 들뜨는 원인은 습기 때문입니다."


def test_identical_korean_scores_one_on_every_metric(pack):
    scores = pack.score([KO], [KO])
    for column, values in scores.items():
        assert values[0] == pytest.approx(1.0, abs=1e-4), column


def test_nfd_equals_nfc(pack):
    nfd = pack.score([unicodedata.normalize("NFD", KO)], [KO])
    assert all(v[0] == pytest.approx(1.0, abs=1e-4) for v in nfd.values())


def test_paraphrase_beats_unrelated(pack):
    ref = "결로를 막으려면 단열을 보강하고 자주 환기하세요."
    scores = pack.score(["단열을 보강하고 환기를 자주 하면 결로를 막습니다.", "가구 다리에 패드를 붙이세요."], [ref, ref])
    for column in ("bertscore_f1", "cosine", "chrf", "rouge_l"):
        assert scores[column][0] > scores[column][1], column


def test_empty_answers_score_zero_without_crashing(pack):
    scores = pack.score(["", "   ", KO], [KO, KO, ""])
    assert all(values == [0.0, 0.0, 0.0] for values in scores.values())


def test_judge_scores_degenerate_answers_zero_and_says_why(pack):
    loop = "벽지가 들뜨는 " * 8
    scores, reasons = pack.judge([loop, "습기 때문에 벽지가 들뜹니다.", "\ufffd다 벽체\ufffd\ufffd 물을"], [KO, KO, KO])
    assert reasons[0].startswith("repetition loop") and reasons[1] is None and reasons[2].startswith("undecodable")
    assert pack.score([loop], [KO])["cosine"][0] > 0.5  # the bare metric rewards the loop ...
    for column, values in scores.items():  # ... the judged score does not
        assert values[0] == 0.0 and values[2] == 0.0, column
    assert scores["morph_f1"][1] > 0.5


def test_morphemes_drop_particles_and_endings(pack):
    """Particles and endings differ between the two forms; the content morphemes are the same."""
    assert pack._morph("벽지가 들뜹니다") == pack._morph("벽지는 들뜨고") == ["벽지", "들뜨"]
    assert morph_f1(["a", "b", "b"], ["b", "c"]) == pytest.approx(2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    assert lcs_length(list("abcbdab"), list("bdcaba")) == 4


def test_exact_match_and_token_f1():
    assert exact_match("습기 때문입니다.", "습기  때문입니다") == 1.0
    assert token_f1("습기 때문입니다", "풀칠 부족 때문입니다") == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))


def test_missing_encoder_names_the_key(tmp_path):
    with pytest.raises(MetricError, match="eval.cosine_model: cannot load encoder"):
        MetricPack(EvalSection(metrics=["cosine"], cosine_model=str(tmp_path / "nope")))


def test_broken_encoder_is_not_valid_and_names_the_key():
    """A BERTScore layer the encoder lacks must never feed the gate: validity measures it blind."""
    from loraops.judge.validity import measure, require_valid

    cfg = EvalSection(metrics=["bertscore"], bertscore_layer=40)
    with pytest.raises(MetricError, match="eval.bertscore_model"):
        require_valid(measure(MetricPack(cfg), cfg), "bertscore_f1", cfg)


def test_paired_bootstrap_fixed_seed():
    deltas = np.array([0.1, 0.2, -0.05, 0.3, 0.0, 0.15])
    first = paired_bootstrap(deltas, 1000, seed=3)
    assert first == paired_bootstrap(deltas, 1000, seed=3)
    assert first[0] < deltas.mean() < first[1]
    assert first == pytest.approx((0.0083333, 0.2083333), abs=0.03)


def test_compare_and_slices_flag_small_groups():
    table = pd.DataFrame({"category": ["a"] * 6 + ["b"] * 2, "base_answer": ["x"] * 8, "tuned_answer": ["y"] * 8,
                          "base_cosine": [0.1] * 8, "tuned_cosine": [0.3] * 6 + [0.0] * 2})
    summary = summarize(table, ["cosine"], ["category"], 200, 0, min_slice=5)
    assert summary.metrics["cosine"].wins == 6 and summary.metrics["cosine"].losses == 2
    assert summary.slices["category"]["a"].small is False
    assert summary.slices["category"]["b"].model_dump() == {"n": 2, "small": True,
                                                             "cosine": {"base": 0.1, "tuned": 0.0, "delta": -0.1}}
    assert compare(table["base_cosine"], table["tuned_cosine"], 200, 0).delta == pytest.approx(0.125)
