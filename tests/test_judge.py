"""The LLM rubric judge: the real OpenAI client against a judge server on loopback whose rule is known
(tests/judge_server.py); calibration figures against scipy; a judge gates only after a valid calibration."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from judge_server import JudgeServer, rule_score

REFERENCE = "벽지 곰팡이는 결로와 환기 부족 때문에 생기므로 자주 환기하고 제습기를 쓰세요."
ANSWERS = [
    "곰팡이는 결로와 환기 부족 때문에 생깁니다. 자주 환기하고 제습기를 쓰세요.",  # most syllables
    "결로 때문에 생기니 환기하세요.",
    "도배는 이틀 정도 걸립니다.",
    "배송은 사흘 걸립니다.",
]


def _cfg(url: str, tmp_path, **extra):
    from loraops.core.config import JudgeSection

    return JudgeSection(**{"enabled": True, "base_url": url, "model": "rule-judge", "cache_dir": str(tmp_path / "judge-cache"),
                           "requests_per_minute": 6000, **extra})


def _ratings(n: int, seed: int, noise: float = 0.6) -> list[dict]:
    """n rated answers whose raters score by the judge server's rule, give or take ``noise`` points (seeded)."""
    rng = random.Random(seed)
    words = "벽지 곰팡이 결로 환기 부족 때문 생기므로 자주 제습기 쓰세요 도배 이틀 배송 사흘 색상 시공 장판 접착 들뜸".split()
    items = []
    for i in range(n):
        answer = " ".join(rng.sample(words, rng.randint(1, 10)))
        true = rule_score(answer, REFERENCE)
        score = min(5, max(1, round(true + rng.gauss(0, noise))))
        items.append({"question": f"질문 {i}: 곰팡이가 생기는 이유는?", "reference": REFERENCE, "answer": answer,
                      "rater": "kim", "scores": {"relevance": score, "accuracy": score, "completeness": score},
                      "source": "test"})
    return items


def _loraops(args: list, cwd) -> subprocess.CompletedProcess:
    """`loraops run` in a process of its own (Prefect's logging and temporary server belong to a process)."""

    return subprocess.run([sys.executable, "-m", "loraops.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "LORAOPS_JUDGE_API_KEY": "sk-judge-secret-e2e"})


def test_replies_parse_only_with_every_criterion_scored_1_to_5():
    from loraops.judge.llm import parse, parse_preference

    criteria = ["relevance", "accuracy"]
    fenced = '```json\n{"relevance": {"score": 4, "reason": "질문에 맞음"}, "accuracy": {"score": "5", "reason": "정확"}}\n```'
    assert parse(fenced, criteria) == ({"relevance": 4, "accuracy": 5}, {"relevance": "질문에 맞음", "accuracy": "정확"})
    assert parse('점수: {"relevance": 3, "accuracy": 2, "reason": "짧음"}', criteria)[0] == {"relevance": 3, "accuracy": 2}
    for bad in ('{"relevance": {"score": 4}}', '{"relevance": 6, "accuracy": 3}', '{"relevance": 3.5, "accuracy": 3}',
                '{"relevance": true, "accuracy": 3}', "4점입니다", "", "{not json}", "[1, 2]"):
        assert parse(bad, criteria) is None, bad
    assert parse_preference('{"better": "b", "reason": "…"}') == "B"
    assert parse_preference('{"better": "tie"}') == "tie" and parse_preference("A가 낫다") is None


def test_agreement_figures_equal_scipy_and_the_intervals_a_bootstrap_of_them():
    from scipy import stats

    from loraops.judge.agreement import agreement, kendall_tau_b, spearman

    rng = np.random.default_rng(3)
    human = rng.integers(1, 6, 60).astype(float)
    human[::7] += 0.5  # two raters' means
    judge = np.clip(np.round(human + rng.normal(0, 1.1, 60)), 1, 5)
    assert kendall_tau_b(human, judge) == pytest.approx(stats.kendalltau(human, judge, variant="b").statistic, abs=1e-12)
    assert spearman(human, judge) == pytest.approx(stats.spearmanr(human, judge).statistic, abs=1e-12)
    figures = agreement(list(human), list(judge), samples=2000, seed=0)
    assert figures["n"] == 60
    assert figures["within_one"] == pytest.approx(np.mean(np.abs(judge - human) <= 1), abs=1e-4)
    assert figures["exact"] == pytest.approx(np.mean(judge == np.floor(human + 0.5)), abs=1e-4)
    assert figures["mean_shift"] == pytest.approx(judge.mean() - human.mean(), abs=1e-4)
    scipy_ci = stats.bootstrap((human, judge), lambda x, y: stats.spearmanr(x, y).statistic, paired=True,
                               vectorized=False, n_resamples=2000, method="percentile", random_state=1).confidence_interval
    low, high = figures["spearman_ci95"]
    assert low < figures["spearman"] < high
    assert low == pytest.approx(scipy_ci.low, abs=0.05) and high == pytest.approx(scipy_ci.high, abs=0.05)
    assert agreement([3, 3, 3, 3], [1, 2, 3, 4])["spearman"] is None  # raters gave one score to all: no ranking


def test_the_client_scores_by_the_rule_caches_retries_io_failures_and_keeps_to_the_rate(tmp_path):
    from loraops.judge.llm import Judge, JudgeError

    with JudgeServer() as server:
        judge = Judge(_cfg(server.url, tmp_path, requests_per_minute=300, concurrency=4))
        items = [("곰팡이가 왜 생기나요?", REFERENCE, a) for a in ANSWERS]
        started = time.monotonic()
        verdicts = judge.score(items)
        took = time.monotonic() - started
        assert [v.scores["accuracy"] for v in verdicts] == [rule_score(a, REFERENCE) for a in ANSWERS]
        assert verdicts[0].scores["accuracy"] > verdicts[3].scores["accuracy"]
        assert took >= 3 * 60 / 300 - 0.05  # four uncached calls at 300/min: the last starts ≥ 0.6 s after the first
        assert judge.usage.requests == 4 and judge.usage.prompt_tokens > 0 and judge.usage.completion_tokens > 0

        again = Judge(_cfg(server.url, tmp_path))  # a rerun: every reply from the cache, nothing sent
        sent = len(server.requests)
        assert [v.scores for v in again.score(items)] == [v.scores for v in verdicts]
        assert len(server.requests) == sent and again.usage.cached == 4 and again.usage.requests == 0

        server.fail_next = [429, 500, 503]  # retried (Retry-After: 0), then answered
        fresh = Judge(_cfg(server.url, tmp_path, retries=3))
        assert fresh.score([("새 질문", REFERENCE, "새 답변입니다")])[0].scores is not None
        assert len(server.requests) == sent + 4

        server.fail_next = [500, 500]
        with pytest.raises(JudgeError, match="no answer after 1 retries"):
            Judge(_cfg(server.url, tmp_path, retries=1)).score([("또 다른 질문", REFERENCE, "답")])
        server.fail_next = []
        with pytest.raises(JudgeError, match="'gpt-x' is not served at .* \(it serves rule-judge\)"):
            Judge(_cfg(server.url, tmp_path).model_copy(update={"model": "gpt-x"})).check()
    with pytest.raises(JudgeError, match="does not answer"):
        Judge(_cfg(server.url, tmp_path, retries=0)).check()


def test_an_agreeing_judge_is_valid_a_disagreeing_or_unreadable_one_is_not(tmp_path, tiny_params):
    from loraops.review.calibration import calibrate, report

    items = _ratings(40, seed=1)
    params = tiny_params.model_copy(deep=True)
    with JudgeServer() as server:
        params.eval.judge = _cfg(server.url, tmp_path)
        result, table = calibrate(params, items)
        assert result["valid"], report(result)
        for figures in result["criteria"].values():
            assert figures["n"] == len(table) and figures["spearman_ci95"][0] >= 0.3
        assert set(table.columns) >= {"rater_accuracy", "judge_accuracy", "judge_reason_accuracy"}
    with JudgeServer(mode="reverse") as server:
        params.eval.judge = _cfg(server.url, tmp_path)
        result, _ = calibrate(params, items)
        assert not result["valid"] and result["criteria"]["accuracy"]["spearman"] < 0
        assert "below eval.judge.calibration.min_spearman_low" in " ".join(result["criteria"]["accuracy"]["short"])
        assert result["disagreements"] and result["disagreements"][0]["judge"] != result["disagreements"][0]["rater"]
    with JudgeServer(mode="garbage") as server:
        params.eval.judge = _cfg(server.url, tmp_path)
        result, _ = calibrate(params, items)
        assert not result["valid"] and result["unparsed"]["count"] == len(table)
        assert "점수는 높은 편입니다" in result["unparsed"]["example"]
        assert f"{len(table)} of {len(table)} judge replies could not be parsed" in report(result)
    few = _ratings(12, seed=2)
    with JudgeServer() as server:
        params.eval.judge = _cfg(server.url, tmp_path)
        result, _ = calibrate(params, few)
        assert not result["valid"] and "(eval.judge.calibration.min_n: 30)" in result["criteria"]["relevance"]["short"][0]


def test_pairwise_counts_a_preference_for_a_position_as_a_tie(tmp_path):
    from loraops.judge.llm import Judge

    pairs = [("곰팡이가 왜 생기나요?", REFERENCE, ANSWERS[3], ANSWERS[0]), ("곰팡이가 왜 생기나요?", REFERENCE, ANSWERS[0], ANSWERS[3])]
    with JudgeServer() as server:
        fair = Judge(_cfg(server.url, tmp_path, pairwise=True)).prefer(pairs)
        assert [r["score"] for r in fair] == [1.0, 0.0] and all(r["consistent"] for r in fair)
    with JudgeServer(mode="first") as server:
        biased = Judge(_cfg(server.url, tmp_path / "other", pairwise=True)).prefer(pairs)
        assert [r["score"] for r in biased] == [0.5, 0.5] and not any(r["consistent"] for r in biased)


def test_the_gate_uses_a_judge_only_after_a_valid_calibration_and_calibrate_prints_json(workspace, tmp_path):
    """`loraops judge calibrate --ratings FILE --json` records each calibration in MLflow; the gate's pre-training check
    refuses a never-calibrated or disagreeing judge naming its figures and allows an agreeing one."""
    import csv

    from helpers import run_cli
    from loraops.core.config import load_params
    from loraops.core.errors import ConfigError, MetricError
    from loraops.registry.judging import require_calibrated

    sheet = tmp_path / "ratings.csv"
    with sheet.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["question", "reference", "answer", "rater", "relevance", "accuracy", "completeness"])
        writer.writeheader()
        for item in _ratings(40, seed=5, noise=0.4):
            writer.writerow({k: item[k] for k in ("question", "reference", "answer", "rater")} | item["scores"])
    with pytest.raises(ConfigError, match="eval.judge.enabled"):
        load_params(workspace / "params.yaml", ["registry.gate.metric=judge_accuracy"])
    with JudgeServer(mode="reverse") as bad, JudgeServer() as good, JudgeServer(mode="garbage") as prose:
        sets = lambda url: ["--set", "eval.judge.enabled=true", "--set", f"eval.judge.base_url={url}", "--set",
                            "eval.judge.model=rule-judge", "--set", "registry.gate.metric=judge_accuracy",
                            "--set", f"eval.judge.cache_dir={tmp_path / 'cache'}",
                            "--set", "eval.judge.requests_per_minute=6000"]
        params = lambda url: load_params(workspace / "params.yaml", [s for s in sets(url) if s != "--set"])
        with pytest.raises(MetricError, match="was never calibrated against human ratings"):
            require_calibrated(params(good.url))

        refused = run_cli(["judge", "calibrate", "--ratings", str(sheet), "--json", *sets(bad.url)], workspace)
        assert refused.returncode == 3, refused.stderr
        figures = json.loads(refused.stdout)
        assert figures["valid"] is False and set(figures["criteria"]) == {"relevance", "accuracy", "completeness"}
        assert {"n", "kendall_tau", "spearman", "spearman_ci95", "kendall_tau_ci95", "exact", "within_one",
                "mean_shift"} <= set(figures["criteria"]["accuracy"])
        with pytest.raises(MetricError, match=r"falls short on accuracy: Spearman -[0-9.]+ \["):
            require_calibrated(params(bad.url))

        assert run_cli(["judge", "calibrate", "--ratings", str(sheet), *sets(prose.url)], workspace).returncode == 3
        with pytest.raises(MetricError, match="40 of 40 judge replies could not be parsed"):
            require_calibrated(params(prose.url))

        allowed = run_cli(["judge", "calibrate", "--ratings", str(sheet), *sets(good.url)], workspace)
        assert allowed.returncode == 0, allowed.stdout + allowed.stderr
        assert "valid: the gate may use judge_relevance, judge_accuracy, judge_completeness" in allowed.stdout
        checked = require_calibrated(params(good.url))
        assert checked["n"] == 40 and checked["spearman_ci95"][0] >= 0.3
        with pytest.raises(MetricError, match="min_n: 50"):  # stricter thresholds judge the same figures again
            require_calibrated(load_params(workspace / "params.yaml", [s for s in sets(good.url) if s != "--set"]
                                           + ["eval.judge.calibration.min_n=50"]))
        missing = run_cli(["judge", "calibrate", "--ratings", str(tmp_path / "none.csv"), *sets(good.url)], workspace)
        assert missing.returncode == 2 and "none.csv: not found" in missing.stderr


@pytest.mark.integration
@pytest.mark.slow
def test_a_run_with_the_judge_reports_judge_metrics_and_gates_on_them_once_calibrated(golden_copy, tmp_path):
    """On the trained project: gating on judge_accuracy stops the run before training while the judge was never
    calibrated; after `loraops judge calibrate` on agreeing ratings, a run reports judge_* in metrics/eval.json, the
    report and MLflow, and the gate compares on it (production, evaluated before the judge, is scored by it now)."""
    import csv

    import mlflow

    from helpers import run_cli
    from loraops.registry.tracking import tracking_setup

    sheet = tmp_path / "ratings.csv"
    with sheet.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, ["question", "reference", "answer", "relevance", "accuracy", "completeness"])
        writer.writeheader()
        for item in _ratings(40, seed=5, noise=0.4):
            writer.writerow({k: item[k] for k in ("question", "reference", "answer")} | item["scores"])
    with JudgeServer() as server:
        sets = ["--set", "eval.judge.enabled=true", "--set", f"eval.judge.base_url={server.url}",
                "--set", "eval.judge.model=rule-judge", "--set", f"eval.judge.cache_dir={tmp_path / 'cache'}",
                "--set", "eval.judge.requests_per_minute=6000", "--set", "registry.gate.metric=judge_accuracy",
                "--set", "registry.auto_promote=true"]
        stopped = _loraops(["run", *sets], golden_copy)
        assert stopped.returncode == 2, stopped.stdout + stopped.stderr
        assert "was never calibrated against human ratings" in stopped.stdout + stopped.stderr
        assert not server.requests[1:]  # only the reachability check: nothing was scored

        assert run_cli(["judge", "calibrate", "--ratings", sheet, *sets], golden_copy).returncode == 0
        done = _loraops(["run", *sets], golden_copy)
        assert done.returncode in (0, 3), done.stdout + done.stderr
        assert "judge_accuracy" in done.stdout
    summary = json.loads((golden_copy / "metrics/eval.json").read_text())
    for criterion in ("relevance", "accuracy", "completeness"):
        figures = summary["metrics"][f"judge_{criterion}"]
        assert 1 <= figures["base"] <= 5 and 1 <= figures["tuned"] <= 5 and len(figures["ci95"]) == 2
    assert summary["judge"]["model"] == "rule-judge" and summary["judge"]["usage"]["requests"] > 0
    assert "## LLM judge" in (golden_copy / "reports/eval.md").read_text()
    tracking_setup(golden_copy)
    newest = mlflow.search_runs(experiment_names=["interior-qa-lora"], order_by=["attributes.start_time DESC"],
                                max_results=1, output_format="list")[0]
    assert {"tuned/judge_accuracy", "gate/judge_accuracy", "judge/requests", "judge/prompt_tokens"} <= set(newest.data.metrics)
    # the same adapter as v3, evaluated again with the judge: the gate judged v3 by this run's table
    assert "v3" in done.stdout and "mean judge_accuracy gain" in done.stdout
    assert "sk-judge-secret" not in json.dumps(newest.data.params) + (golden_copy / "params.yaml").read_text()


def test_a_ratings_file_reads_missing_cells_as_empty_and_names_the_line_of_a_bad_score(tmp_path):
    from loraops.core.errors import DataError
    from loraops.review.calibration import from_file

    rows = [{"question": "곰팡이가 왜 생기나요?", "answer": "결로 때문입니다.", "reference": "결로와 환기 부족", "accuracy": 4},
            {"question": "도배는 며칠 걸리나요?", "answer": "이틀입니다.", "accuracy": 5}]  # no reference, no rater
    path = tmp_path / "ratings.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    items = from_file(path, ["relevance", "accuracy"])
    assert [i["reference"] for i in items] == ["결로와 환기 부족", None] and items[1]["rater"] == "line 2"
    path.write_text(json.dumps({**rows[0], "accuracy": 7}, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match=r"ratings.jsonl: line 1: accuracy must be an integer 1–5 \(or empty\), got '7'"):
        from_file(path, ["accuracy"])
    sheet = tmp_path / "ratings.csv"
    sheet.write_text("question,score\n질문,3\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing column\\(s\\) answer, a score column"):
        from_file(sheet, ["accuracy"])
