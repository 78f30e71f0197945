"""What operators do in the default local mode (no PostgreSQL, no MLflow server): start runs from the Prefect UI,
several at once, through the real form in Chromium; compare experiments with `dvc exp show`.

Everything started here (a Prefect server and `loraops deploy` on loopback) is stopped here.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import (ended_with_an_outcome, make_workspace, prefect_api, prefect_with_deployments, small_loop_overrides,
                     trigger_finetune, wait_flow_runs)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent
CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(scope="module")
def local_ui(tmp_path_factory):
    """A fresh project (no MLflow store yet) served as deployments on a Prefect server with its UI."""
    tmp = tmp_path_factory.mktemp("local")
    ws = make_workspace(tmp / "ws", small_loop_overrides("train.max_steps=40", "train.eval_steps=20"))
    assert not (ws / "mlruns" / "mlflow.db").exists()
    with prefect_with_deployments(tmp, ws) as served:
        yield served


def _mlflow_runs(ws: Path) -> list[dict]:
    """The runs in the project's local MLflow store, read straight from its database."""
    with sqlite3.connect(ws / "mlruns" / "mlflow.db") as db:
        rows = db.execute("select r.run_uuid, r.status, p.value from runs r join params p on p.run_uuid = r.run_uuid "
                          "where p.key = 'train.learning_rate'").fetchall()
        tags = dict(db.execute("select run_uuid, value from tags where key = 'prefect.flow_run_id'").fetchall())
    return [{"id": r, "status": s, "learning_rate": float(lr), "flow_run": tags.get(r)} for r, s, lr in rows]


def _flow_run_log(api: str, flow_run_id: str) -> str:
    """Every message of a flow run's Prefect log, page by page (the API returns at most 200 at a time)."""
    messages: list[str] = []
    while True:
        page = prefect_api("POST", f"{api}/logs/filter", json={
            "logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200,
            "offset": len(messages)})
        messages += [entry["message"] for entry in page]
        if len(page) < 200:
            return "\n".join(messages)


def test_three_runs_started_together_on_a_fresh_local_store_all_complete(local_ui):
    """Three custom runs at once, as three people pressing Run in the UI: the first MLflow use of the fresh
    sqlite store is not a migration race, and each run keeps its own params, outputs and lineage."""
    api = local_ui["api"]
    rates = [0.004, 0.003, 0.002]
    ids = [trigger_finetune(api, rate) for rate in rates]
    states = wait_flow_runs(api, ids, 1200)
    names = {i: s["state_name"] for i, s in states.items()}
    assert all(ended_with_an_outcome(s) for s in states.values()), (names, local_ui["log"].read_text()[-5000:])
    runs = _mlflow_runs(local_ui["ws"])
    assert sorted(r["learning_rate"] for r in runs) == sorted(rates), runs
    assert {r["flow_run"] for r in runs} == set(ids) and {r["status"] for r in runs} == {"FINISHED"}, runs
    text = _flow_run_log(api, ids[0])
    assert "train step" in text and "DVC stage train: ran" in text, text[-3000:]  # progress reaches the UI's log
    assert not list((local_ui["ws"] / ".loraops" / "runs").glob("*"))  # workspaces removed


def test_finetune_form_in_chromium_shows_common_settings_first_and_submits_a_run(local_ui):
    if not CHROMIUM.exists():
        pytest.skip("Chromium from Debian packages is not installed (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    api = local_ui["api"]
    deployment = prefect_api("GET", f"{api}/deployments/name/finetune/finetune-interior-qa-lora")
    shots = local_ui["tmp"] / "screens"
    shots.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM),
                                     args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(f"{local_ui['ui']}/deployments")  # the five deployments read apart
            page.get_by_text("finetune-interior-qa-lora").first.wait_for(timeout=60_000)
            listed = page.inner_text("body")
            assert all(f"{flow}-interior-qa-lora" in listed for flow in ("finetune", "promote", "rollback", "sweep")), listed
            page.screenshot(path=str(shots / "deployments.png"))
            page.goto(f"{local_ui['ui']}/deployments/deployment/{deployment['id']}/run")
            page.get_by_text("learning_rate", exact=False).first.wait_for(timeout=60_000)
            body = page.inner_text("body")
            order = [body.index(name) for name in ("data_path", "base_model", "learning_rate", "max_steps",
                                                   "lora_rank", "eval_questions", "model_name", "auto_promote")]
            assert order == sorted(order) and body.index("auto_promote") < body.index("Chat Template")
            assert "Peak learning rate" in body and "Write a line break as \\n" in body
            templates = [t.input_value() for t in page.locator("textarea").all()]
            assert "질문: {question}\\n답변: " in templates  # the whole template is visible on one line
            assert "참고 자료:\\n{context}\\n\\n질문: {question}\\n답변: " in templates  # rag.template the same way
            assert 'Property is type "None"' not in body and "Section" not in body and "| None" not in body
            inputs = page.locator("input, textarea, select").count()
            assert inputs <= 60, f"{inputs} inputs: the form shows the keys people change (form.SHOWN)"
            page.locator("input[type=number]").first.fill("0.003")
            run_name = page.get_by_label("Run Name")
            if not run_name.count():  # the label may not be tied to its input: the first input after it
                run_name = page.get_by_text("Run Name", exact=True).first.locator("xpath=following::input[1]")
            run_name.fill("lr 3e-3 첫 시도")
            page.screenshot(path=str(shots / "finetune-form.png"))
            page.get_by_role("button", name="Submit").click()
            page.wait_for_url("**/deployment/*?tab=Runs", timeout=30_000)
        finally:
            browser.close()
    runs = prefect_api("POST", f"{api}/flow_runs/filter", json={"sort": "START_TIME_DESC"})
    submitted = [r for r in runs if r["parameters"].get("learning_rate") == 0.003 and r["id"] not in
                 {m["flow_run"] for m in _mlflow_runs(local_ui["ws"])}]
    assert submitted, [(r["name"], r["parameters"].get("learning_rate")) for r in runs]
    states = wait_flow_runs(api, [submitted[0]["id"]], 900)
    assert ended_with_an_outcome(states[submitted[0]["id"]]), local_ui["log"].read_text()[-5000:]
    mine = [r for r in _mlflow_runs(local_ui["ws"]) if r["flow_run"] == submitted[0]["id"]]
    assert mine and mine[0]["learning_rate"] == 0.003 and mine[0]["status"] == "FINISHED"
    assert states[submitted[0]["id"]]["name"] == "interior-qa-lora · lr 3e-3 첫 시도"  # the typed name, model first


def test_dvc_exp_show_compares_main_and_every_experiment(tmp_path):
    """Metrics and plots are in git, so `dvc exp show` has values for main and for each `dvc exp run -S`."""
    ws = make_workspace(tmp_path / "ws", small_loop_overrides())
    dvc = str(BIN / "dvc")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for rate in ("0.004", "0.002"):
        out = subprocess.run([dvc, "exp", "run", "-S", f"train.learning_rate={rate}"], cwd=ws, env=env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    shown = subprocess.run([dvc, "exp", "show", "--json"], cwd=ws, capture_output=True, text=True, check=True)
    revisions = json.loads(shown.stdout)  # the workspace first, then the commits with their experiments
    main = next(r for r in revisions if r["name"] == "main")
    assert main["data"]["metrics"]["metrics/eval.json"]["data"]["metrics"]["morph_f1"]["tuned"] >= 0
    experiments = [e for e in main["experiments"] or [] for e in e["revs"]]
    rates = sorted(e["data"]["params"]["params.yaml"]["data"]["train"]["learning_rate"] for e in experiments)
    assert rates == [0.002, 0.004]
    for exp in experiments:
        metrics = exp["data"]["metrics"]
        assert metrics["metrics/eval.json"]["data"]["metrics"]["morph_f1"]["tuned"] > 0
        assert metrics["metrics/train.json"]["data"]["steps"] > 0 and metrics["data/prepared/card.json"]["data"]["pairs"]
    shutil.rmtree(ws, ignore_errors=True)
