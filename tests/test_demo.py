"""`loraops demo` in a real browser (Debian's Chromium driven by Playwright): ask, read three answers, rate,
save; the ratings land in the versions' MLflow runs where the gate reads them, the approved correction in
the DVC-tracked feedback file. Bad input (no rater, half a rubric) is refused on the page."""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest

from helpers import free_port, start_server, stop_server, wait_http
from judge_server import JudgeServer, rule_score

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NAME = "interior-qa-lora"
CHROMIUM = "/usr/bin/chromium"
QUESTION = "벽지에 곰팡이가 생기는 원인은 무엇인가요?"


@pytest.fixture
def page(served_project, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip("Chromium not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    port = free_port()
    log = tmp_path / "demo.log"
    judge = JudgeServer().__enter__()  # the LLM judge the page asks after a save (tests/judge_server.py: a known rule)
    judged = ["--set", "eval.judge.enabled=true", "--set", f"eval.judge.base_url={judge.url}", "--set",
              "eval.judge.model=rule-judge", "--set", f"eval.judge.cache_dir={tmp_path / 'judge-cache'}"]
    proc = start_server([sys.executable, "-m", "loraops.cli", "demo", "--port", str(port), *judged], log, served_project,
                        {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "LORAOPS_DEMO_USERS": "kim:pw-kim,lee:pw-lee",
                         "LORAOPS_JUDGE_API_KEY": "sk-judge-secret-for-the-demo-test"})
    try:
        wait_http(f"http://127.0.0.1:{port}/", 180, proc, log)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            tab = browser.new_page(viewport={"width": 1400, "height": 1100})
            tab.goto(f"http://127.0.0.1:{port}/")
            tab.url_root = f"http://127.0.0.1:{port}"
            tab.judge = judge
            yield tab
            tab.screenshot(path=str(tmp_path / "demo.png"), full_page=True)
            browser.close()
    finally:
        stop_server(proc)
        judge.__exit__(None, None, None)
        feedback = served_project / "data/feedback"
        shutil.rmtree(feedback, ignore_errors=True)  # other tests read the project as it was


def _answer(tab, arm: str) -> str:
    return tab.locator(f"#{arm}-answer textarea").input_value()


def _rate(tab, arm: str, thumb: str | None, scores: dict[str, str]) -> None:
    if thumb:
        tab.locator(f"#{arm}-thumb").get_by_text(thumb).click()
    for criterion, value in scores.items():
        tab.locator(f"#{arm}-{criterion}").get_by_text(value, exact=True).click()


def test_demo_compares_rates_into_mlflow_and_keeps_approved_corrections(page, served_project, monkeypatch, tmp_path):
    import httpx
    import mlflow

    from loraops.registry.tracking import tracking_setup

    tab = page
    # without signing in nothing is saved, not even by a script calling the save endpoint directly
    blocked = httpx.post(f"{tab.url_root}/gradio_api/call/on_save", json={"data": ["mallory", {}, {}]}, timeout=30)
    assert blocked.status_code in (401, 403), blocked.text
    tab.get_by_label("username").fill("kim")
    tab.get_by_label("password").fill("pw-kim")
    tab.get_by_role("button", name="Login").click()
    tab.locator("#question textarea").fill(QUESTION)
    tab.locator("#ask").click()
    tab.wait_for_function("document.querySelector('#candidate-answer textarea').value.length > 0", timeout=120_000)
    assert "production · interior-qa-lora/1" in tab.locator("#production-label").inner_text()
    assert "candidate · interior-qa-lora/3" in tab.locator("#candidate-label").inner_text()
    assert "base model" in tab.locator("#base-label").inner_text()
    assert tab.locator("#candidate-judge").inner_text().strip() == "" and not tab.judge.requests  # never before a save

    monkeypatch.chdir(served_project)
    tracking_setup(served_project)
    assert _answer(tab, "production") == mlflow.pyfunc.load_model(f"models:/{NAME}@production").predict([QUESTION])[0]

    _rate(tab, "production", "good", {"relevance": "5", "accuracy": "4"})  # half a rubric: refused, nothing saved
    assert not tab.locator("#rater textarea").is_visible()  # signed in: the account is the rater
    tab.locator("#save").click()
    tab.get_by_text("production: completeness not rated").wait_for(timeout=60_000)

    _rate(tab, "production", None, {"completeness": "5"})
    _rate(tab, "candidate", "bad", {"relevance": "2", "accuracy": "2", "completeness": "3"})
    _rate(tab, "base", "bad", {})
    tab.locator("#candidate-correction textarea").fill("곰팡이는 결로와 환기 부족 때문에 생깁니다.")
    tab.locator("#candidate-approve input").check()
    for _ in range(5):  # rapid saves of the same ratings: one rating each, as the gate counts them
        tab.locator("#save").click()
    tab.wait_for_function("document.querySelector('#status').innerText.includes('saved ratings')", timeout=60_000)
    tab.wait_for_timeout(3000)  # the queued saves finish
    judged = {}
    for arm in ("base", "production", "candidate"):  # the judge's scores and reasons under each answer, once saved
        degenerate = "degenerate answer" in tab.locator(f"#{arm}-label").inner_text()
        judged[arm] = 1 if degenerate else rule_score(_answer(tab, arm), None)  # a degenerate answer is not sent
        shown = tab.locator(f"#{arm}-judge").inner_text()
        assert "LLM judge" in shown and f"accuracy: {judged[arm]}" in shown, (arm, shown)
        assert ("without asking the judge" if degenerate else "겹치는 정도로") in shown, (arm, shown)
    assert len(tab.judge.requests) == sum("degenerate answer" not in tab.locator(f"#{a}-label").inner_text()
                                          for a in judged)  # one request per sent answer, five saves: the cache
    given = {"production": (5, 4, 5), "candidate": (2, 2, 3)}
    differ = any(abs(judged[arm] - score) >= 2 for arm, scores in given.items() for score in scores)
    assert ("judge and rater differ by 2 or more" in tab.locator("#status").inner_text()) == differ

    client = mlflow.MlflowClient()
    runs = {v: client.get_run(client.get_model_version(NAME, v).run_id) for v in ("1", "3")}
    assert runs["1"].data.metrics["review/mean/tuned"] == pytest.approx(14 / 3, abs=1e-3)
    assert runs["1"].data.metrics["review/thumbs_up/tuned"] == 1.0
    assert runs["3"].data.metrics["review/mean/tuned"] == pytest.approx(7 / 3, abs=1e-3)
    assert runs["3"].data.metrics["review/thumbs_up/base"] == 0.0
    items = json.load(open(client.download_artifacts(runs["3"].info.run_id, "review/items.json")))
    assert {i["rater"] for i in items.values()} == {"kim"} and {i["model"] for i in items.values()} == {"tuned", "base"}
    assert len(items) == 2 and runs["1"].data.metrics["review/n"] == 1  # five saves, one rating per answer
    assert all(set(i["judge"]["scores"]) == {"relevance", "accuracy", "completeness"} for i in items.values())
    assert "sk-judge-secret" not in json.dumps(items)
    # the MLflow UI shows each rating as a trace with the rater's and the judge's assessments (one per rating)
    traces = mlflow.search_traces(locations=[runs["3"].info.experiment_id], run_id=runs["3"].info.run_id,
                                  return_type="list")
    assert len(traces) == 2, [t.info.tags for t in traces]
    sources = {(a.name, a.source.source_type, a.source.source_id) for t in traces for a in t.info.assessments}
    assert {("accuracy", "HUMAN", "kim"), ("accuracy", "LLM_JUDGE", "rule-judge"), ("thumbs_up", "HUMAN", "kim")} <= sources

    # the ratings saved here are a calibration set: `loraops judge calibrate` reads every rated run of the project,
    # asks the judge (its replies cached by the page's saves) and prints the figures; two answers are too few
    from helpers import run_cli

    judged = ["--set", f"eval.judge.base_url={tab.judge.url}", "--set", "eval.judge.model=rule-judge",
              "--set", f"eval.judge.cache_dir={tmp_path / 'judge-cache'}"]
    calibrated = run_cli(["judge", "calibrate", "--json", *judged], served_project)
    assert calibrated.returncode == 3, calibrated.stdout + calibrated.stderr
    figures = json.loads(calibrated.stdout)
    assert figures["ratings"]["answers"] == 2 and figures["usage"]["requests"] == 0  # the page's replies, cached
    assert figures["criteria"]["accuracy"]["n"] == 2 and figures["valid"] is False
    assert "(eval.judge.calibration.min_n: 30)" in figures["criteria"]["accuracy"]["short"][0]

    rows = [json.loads(line) for line in (served_project / "data/feedback/corrections.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0] == {**rows[0], "question": QUESTION, "answer": "곰팡이는 결로와 환기 부족 때문에 생깁니다.",
                                          "corrects": f"{NAME}/3", "rater": "kim", "source": "demo"}
    assert (served_project / "data/feedback/corrections.jsonl.dvc").exists()


def test_a_refused_rejected_or_forced_version_is_labelled_so():
    from loraops.serving.demo import verdict_note

    assert "refused by the gate" in verdict_note("refused")
    assert "rejected by a reviewer" in verdict_note("rejected by reviewer")
    assert "by force" in verdict_note("forced")
    assert verdict_note("promoted") == verdict_note(None) == ""


def test_the_pages_inputs_are_bounded_and_must_be_text():
    from loraops.core.errors import ConfigError
    from loraops.serving.demo import LIMITS, authentication, check_text, demo_users

    problems = check_text({"question": "벽지\ud800", "target_age": "x" * 500, "category": "벽지"}, LIMITS)
    assert problems == ["question: not valid Unicode text (a lone surrogate at character 2)",
                        "target_age: 500 characters; at most 200"]  # every problem at once
    assert check_text({"question": "q" * LIMITS["question"]}, LIMITS) == []
    assert demo_users({"LORAOPS_DEMO_USERS": "kim:a:b, lee:pw"}) == [("kim", "a:b"), ("lee", "pw")]
    with pytest.raises(ConfigError, match="LORAOPS_DEMO_USERS"):
        demo_users({"LORAOPS_DEMO_USERS": "kim"})
    keyed = authentication({"LORAOPS_API_KEY": "k3y"})
    assert keyed("park", "k3y") and not keyed("park", "nope") and not keyed("", "k3y")
    assert authentication({}) is None
