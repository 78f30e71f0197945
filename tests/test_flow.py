"""The whole loop through Prefect, DVC and MLflow in an isolated workspace (integration tier)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from helpers import loraops_in_one_process

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def loraops(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "loraops.cli", *args], capture_output=True, text=True, timeout=900)
    return result


def mlflow_client():
    import mlflow

    from loraops.registry.tracking import tracking_setup

    tracking_setup()
    return mlflow.MlflowClient()


def test_finetune_registers_promotes_skips_and_serves(golden, golden_copy):
    workspace = golden_copy
    first = golden.runs[0]  # the golden project's first `loraops run`: v1, promoted
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "registered interior-qa-lora v1" in first.stdout and "PROMOTED" in first.stdout
    assert "Finished in state Promoted(" in first.stdout + first.stderr
    assert "LOAD_GLOBAL" not in first.stdout + first.stderr  # what libraries capture (dill's disassembly) is not logged

    client = mlflow_client()
    experiment = client.get_experiment_by_name("interior-qa-lora")
    run = client.get_run(client.get_model_version("interior-qa-lora", "1").run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.flow_run_id"] and run.data.tags["dvc.train"] == "ran"
    assert float(run.data.params["train.learning_rate"]) == 0.005
    assert "tuned/cosine" in run.data.metrics and "vs_base/morph_f1" in run.data.metrics
    assert run.data.metrics["gate/morph_f1"] == run.data.metrics["tuned/morph_f1"]  # the headline section
    assert run.data.metrics["gate/degenerate_rate_base"] > run.data.metrics["gate/degenerate_rate"]
    sections = sorted({k.split("/")[0] for k in run.data.metrics} - {"system"})
    assert sections == ["gate", "train", "tuned", "vs_base"]  # MLflow orders chart sections by name: headline, curves
    details = json.load(open(client.download_artifacts(run.info.run_id, "eval/details.json")))
    assert details["validity"]["morph_f1"]["paraphrase>unrelated"] >= 0.95
    assert run.data.tags["mlflow.source.name"].startswith("loraops finetune flow")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    curve = client.get_metric_history(run.info.run_id, "train/train_loss")
    assert len(curve) >= 2 and curve[0].step < curve[-1].step
    lineage = json.loads((workspace / "mlruns").joinpath("artifacts").exists() and
                         open(client.download_artifacts(run.info.run_id, "lineage.json")).read())
    assert lineage["git_commit"] and lineage["git_dirty"] is False and lineage["mlflow_run_id"] == run.info.run_id
    assert lineage["base_revision"].startswith("sha256:") and lineage["params"]["lora"]["r"] == 8
    required = {"git_commit", "git_dirty", "dvc_lock_md5", "data_md5", "params", "base_model", "base_revision",
                "tokenizer_sha256", "adapter_sha256", "seed", "versions", "device", "prefect_flow_run_id",
                "prefect_deployment", "mlflow_run_id"}
    assert required <= set(lineage) and lineage["prefect_flow_run_id"] == run.data.tags["prefect.flow_run_id"]
    assert set(lineage["versions"]) >= {"python", "torch", "transformers", "peft", "datasets", "mlflow", "prefect", "dvc"}
    assert lineage["data_md5"]["data/raw/interior_qa.csv"] and lineage["dvc_lock_md5"]
    version_tags = client.get_model_version("interior-qa-lora", "1").tags
    assert version_tags["lineage.git_commit"] == lineage["git_commit"] and version_tags["loraops.adapter_sha256"]
    assert str(client.get_model_version_by_alias("interior-qa-lora", "production").version) == "1"

    runs_before = len(client.search_runs([experiment.experiment_id]))
    started = time.perf_counter()
    again = loraops("run")  # params.yaml is the last run's (v3): nothing to do
    took = time.perf_counter() - started
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.startswith("unchanged: ") and "interior-qa-lora v3" in again.stdout, again.stdout
    assert took <= 10, f"a no-op rerun took {took:.1f}s"
    assert len(client.search_runs([experiment.experiment_id])) == runs_before  # no new MLflow run, no gate decision
    assert len(client.search_model_versions("name = 'interior-qa-lora'")) == 3

    # a fresh process loads the last registered model and answers exactly as evaluate's tuned answers (and
    # production answers the question `ask` is asked below)
    question = "벽지 곰팡이 문제는 어떻게 해결하나요?"
    probe = (
        "import mlflow, pandas as pd, json;"
        "from loraops.registry.tracking import tracking_setup; tracking_setup();"
        "m = mlflow.pyfunc.load_model('models:/interior-qa-lora/3');"
        "p = mlflow.pyfunc.load_model('models:/interior-qa-lora@production');"
        "t = pd.read_csv('reports/eval_questions.csv', keep_default_na=False).drop_duplicates('question').head(8);"
        f"print(json.dumps([list(t.tuned_answer), m.predict(list(t.question)), p.predict([{question!r}])[0]],"
        " ensure_ascii=False))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    expected, answered, production_answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answered == expected

    reproduced = loraops("reproduce", "models:/interior-qa-lora@production", "--json")
    assert reproduced.returncode == 0, reproduced.stderr[-3000:]
    report = json.loads(reproduced.stdout)
    assert report["identical"] is True and report["original_sha256"] == report["reproduced_sha256"]
    assert report["metrics"]["tuned/cosine"]["difference"] == 0

    # the commands that only read the registry, one after another in one process
    questions, tickets = workspace / "questions.csv", workspace / "tickets.csv"
    questions.write_text(f"question\n{question}\n결로는 왜 생기나요?\n", encoding="utf-8")
    tickets.write_text(f"번호,문의내용\n1,{question}\n", encoding="utf-8")
    missing, asked, batch, named, wrong = loraops_in_one_process(workspace, [
        ["reproduce", "models:/interior-qa-lora@nope"], ["ask", question],
        ["ask", "--file", str(questions), "--out", str(workspace / "answers.csv")],
        ["ask", "--file", str(tickets), "--question-column", "문의내용"], ["ask", "--file", str(tickets)]])
    assert missing.returncode == 2 and "model 'interior-qa-lora' has no alias @nope" in missing.stderr
    assert asked.returncode == 0 and asked.stdout.strip() == production_answer, asked.stdout + asked.stderr[-2000:]
    assert batch.returncode == 0, batch.stderr[-2000:]
    import pandas as pd

    answers = pd.read_csv(workspace / "answers.csv", keep_default_na=False)
    assert list(answers.columns) == ["question", "answer"] and answers.loc[0, "answer"] == production_answer
    assert named.returncode == 0, named.stderr[-2000:]
    assert pd.read_csv(workspace / "tickets.answers.csv", keep_default_na=False).loc[0, "answer"] == production_answer
    assert wrong.returncode == 2 and "missing question column 'question' (--question-column)" in wrong.stderr
    assert "Lineage: base `tiny-ko`" in client.get_model_version("interior-qa-lora", "1").description


def test_promote_refuses_worse_and_rollback_restores(golden, golden_copy):
    worse = golden.runs[1]  # the golden project's second run learns nothing: the default gate must refuse it
    # exit codes a script reads: 3 refused, 4 worse than base
    assert ("outcome: Refused" in worse.stdout and worse.returncode == 3) or \
        ("outcome: Worse than base" in worse.stdout and worse.returncode == 4), worse.stdout[-2000:] + worse.stderr[-2000:]
    assert "Finished in state Refused(" in worse.stdout + worse.stderr or \
        "Finished in state Worse than base(" in worse.stdout + worse.stderr
    mv = mlflow_client().get_model_version("interior-qa-lora", "2")
    assert mv.tags["gate.verdict"] == "refused" and "## Gate: REFUSED vs production v1" in mv.description
    trained = mlflow_client().get_run(mv.run_id).data.tags  # the run's own page says so too
    assert trained["gate.verdict"] == "refused" and "## Gate: REFUSED vs production v1" in trained["mlflow.note.content"]
    # and its metrics carry the comparison that decided (vs production), beside the ones against the base
    gate_metrics = mlflow_client().get_run(mv.run_id).data.metrics
    assert {"gate/morph_f1_production", "gate/morph_f1_vs_production", "gate/morph_f1_delta"} <= set(gate_metrics)
    assert gate_metrics["gate/morph_f1_vs_production"] < gate_metrics["gate/morph_f1_delta"]
    from loraops.registry.versions import losses_against_production

    lost = losses_against_production("interior-qa-lora", "2", "morph_f1")
    assert lost and all(row["delta"] < 0 for row in lost) and "production v1" in lost[0], lost[:1]
    assert "Gate metric **morph_f1**" in mv.description  # the headline scores, from registration
    refused = loraops("promote", "--version", "2", "--json")
    assert refused.returncode == 3
    decision = json.loads(refused.stdout)
    assert decision["promoted"] is False and decision["version"] == "2" and decision["previous"] == "1"
    assert any("not measurably better" in r or "regresses" in r for r in decision["decision"]["reasons"])

    forced = loraops("promote", "--version", "2", "--force", "--reason", "test rollback path")
    assert forced.returncode == 0 and "FORCED" in forced.stdout
    back = loraops("rollback")
    assert back.returncode == 0 and "v2 → v1" in back.stdout

    from loraops.registry.versions import audit_trail

    actions = [(a["action"], a["from"], a["to"]) for a in audit_trail("interior-qa-lora")]
    assert actions == [("promote", "None", "1"), ("refuse", "1", "2"), ("refuse", "1", "2"), ("promote", "1", "2"),
                       ("rollback", "2", "1")]
    assert str(mlflow_client().get_model_version_by_alias("interior-qa-lora", "production").version) == "1"


def test_editing_serving_demo_review_or_cli_code_leaves_every_stage_up_to_date(golden_copy):
    """DVC's own verdict on a trained project: code no stage runs does not make one stale; a judge module does,
    for the stages that import it and no other."""
    from dvc.repo import Repo

    from loraops.core.codedeps import stage_files
    from loraops.core.paths import STAGES

    def stale() -> set[str]:
        with Repo(str(golden_copy)) as repo:
            return {name.rsplit(":", 1)[-1].split("@")[0] for name in repo.status(targets=list(STAGES))}

    assert stale() == set()
    for module in ("serving/demo.py", "serving/api.py", "serving/pyfunc.py", "review/rubric.py", "review/approval.py",
                   "registry/versions.py", "orchestration/workspace.py", "cli/serving.py", "cli/models.py"):
        with (golden_copy / "src/loraops" / module).open("a", encoding="utf-8") as fh:
            fh.write("\n# an edit no stage runs\n")
    assert stale() == set()
    with (golden_copy / "src/loraops/judge/degenerate.py").open("a", encoding="utf-8") as fh:
        fh.write("\n# a judge edit\n")
    expected = {s for s in STAGES if "src/loraops/judge/degenerate.py" in stage_files(s)}
    assert "evaluate" in expected and "train" not in expected
    assert stale() == expected
