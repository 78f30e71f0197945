"""Sweeps and grouped cross-validation: the search space, pruning through a shared Optuna journal, folds by source
group, and `loraops sweep` end to end (three child runs under one parent, the best registered and gated)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, make_workspace, tiny_overrides
from loraops.core.config import load_params
from loraops.modeling import trial
from loraops.orchestration import sweep
from loraops.registry import tracking
from loraops.stages import train


def test_search_space_becomes_typed_optuna_distributions():
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    params = load_params(REPO / "params.yaml", ['sweep.space={"train.learning_rate": {"low": 0.0001, "high": 0.01, "log": true}, '
                                                '"lora.r": {"low": 4, "high": 32, "step": 4}, "lora.use_dora": {"choices": [true, false]}}'])
    space = sweep.distributions(params)
    assert space["train.learning_rate"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert space["lora.r"] == IntDistribution(4, 32, step=4)
    assert space["lora.use_dora"] == CategoricalDistribution([True, False])
    assert sweep.trial_overrides({"lora.r": 8, "train.learning_rate": 0.000123456789}) == [
        "lora.r=8", "train.learning_rate=0.000123456789"]


def test_a_trial_behind_the_median_is_pruned_through_the_shared_journal(tmp_path, monkeypatch):
    """The flow creates the study; a train stage (here: this process, as the subprocess would) rebuilds its trial from
    the environment, reports validation losses and is told to stop once it falls behind the completed trial."""
    params = load_params(REPO / "params.yaml")
    path = tmp_path / "study.journal"
    study = sweep.create_study(params, "s", path)
    first = study.ask()
    for step, loss in ((10, 2.0), (20, 1.5)):
        first.report(loss, step)
    study.tell(first, 1.5)
    second = study.ask()
    for key, value in trial.trial_env(path, "s", second._trial_id, pruning=True).items():
        monkeypatch.setenv(key, value)
    reporter = trial.Reporter()
    assert reporter.report(1.9, 10) is False  # better than the completed trial at step 10
    assert reporter.report(3.0, 20) is True and reporter.pruned_at == 20
    monkeypatch.setenv(trial.PRUNING_ENV, "")
    third = study.ask()
    monkeypatch.setenv(trial.TRIAL_ENV, str(third._trial_id))
    assert trial.Reporter().report(9.0, 10) is False  # sweep.pruning off: never pruned
    monkeypatch.delenv(trial.STORAGE_ENV)
    assert trial.Reporter().trial is None and trial.Reporter().report(9.0, 10) is False  # outside a sweep: inert


def test_folds_are_by_source_group_and_added_rows_never_cross_into_their_origins_fold():
    rows = [{"group": f"G{i}", "source": "line"} for i in range(10) for _ in range(3)]
    rows += [{"group": "G0", "source": "rule"}, {"group": "G1", "source": "rule", "origin_groups": ["G1", "G2"]},
             {"group": "doc:x", "source": "document"}]
    fold = train.folds_of(rows, 3, seed=1)
    assert set(fold) == {f"G{i}" for i in range(10)} and sorted(fold.values()).count(0) in (3, 4)
    for k in range(3):
        training, held = train.fold_rows(rows, fold, k)
        held_groups = {r["group"] for r in held}
        assert held_groups == {g for g, f in fold.items() if f == k}
        assert all(r["source"] == "line" for r in held)
        assert not held_groups & {g for r in training for g in [r["group"], *r.get("origin_groups", [])]}
        assert {"group": "doc:x", "source": "document"} in training


def test_cv_figures_become_mlflow_metrics_per_fold():
    from loraops.core.results import TrainFigures

    common = dict(train_loss=1.5, steps=40, stopped_early=False, train_seconds=2.0, started_at=1.0, finished_at=3.0,
                  train_pairs=100, trainable_params=1000, device="cpu", torch_threads=2, answer_tokens_per_epoch=500,
                  pairs_cut_by_max_length=0, batching="packed")
    figures = TrainFigures(**common, best_val_loss=1.2, cv={"folds": 3, "folds_run": 3, "val_loss": [1.0, 1.2, 1.4],
                                                            "val_loss_mean": 1.2, "val_loss_sd": 0.2})
    metrics = tracking.train_figures(figures)
    assert metrics["train/cv_val_loss_mean"] == 1.2 and metrics["train/cv_val_loss_sd"] == 0.2
    assert [metrics[f"train/cv_fold_{i}_val_loss"] for i in range(3)] == [1.0, 1.2, 1.4]
    assert sweep.objective(figures, load_params(REPO / "params.yaml")) == 1.2
    cv = load_params(REPO / "params.yaml", ["train.cv_folds=3", "sweep.objective=cv_val_loss"])
    assert sweep.objective(figures, cv) == 1.2 and sweep.objective(TrainFigures(**common, best_val_loss=1.0), cv) is None


@pytest.mark.slow
def test_train_stage_cross_validates_by_group_before_the_final_training(tmp_path):
    from loraops.stages import prepare

    params = load_params(REPO / "params.yaml", tiny_overrides(f"data.path={REPO / 'data/raw/interior_qa.csv'}",
                                                             "train.max_steps=20", "train.eval_steps=10", "train.cv_folds=2"))
    prepare.run(params, tmp_path)
    cv = train.run(params, tmp_path).cv
    assert cv is not None and cv.folds == cv.folds_run == 2 and len(cv.val_loss) == 2
    assert cv.val_loss_mean == pytest.approx(sum(cv.val_loss) / 2, abs=1e-5) and cv.val_loss_sd > 0
    assert json.loads((tmp_path / "metrics/train.json").read_text())["cv"] == cv.model_dump()
    assert (tmp_path / "models/adapter/adapter_model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_sweep_runs_three_child_runs_under_one_parent_and_registers_the_best(tmp_path):
    import mlflow

    ws = make_workspace(tmp_path / "ws", tiny_overrides("train.max_steps=40", "train.eval_steps=10"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "loraops.cli", "sweep", "--set", "sweep.trials=3",
                          "--set", "augment.enabled=true"], cwd=ws, env=env, capture_output=True, text=True, timeout=1500)
    # 40-step trials: the best is registered and gated; promoted (0) or refused by the gate (3), both are complete
    assert out.returncode in (0, 3), out.stdout[-3000:] + out.stderr[-3000:]
    assert "sweep interior-qa-lora-" in out.stdout and "best: trial" in out.stdout
    assert not subprocess.run(["git", "status", "--porcelain", "params.yaml"], cwd=ws, capture_output=True, text=True).stdout
    tracking.tracking_setup(ws)
    runs = mlflow.search_runs(experiment_names=["interior-qa-lora"])
    parent = runs[runs["tags.loraops.sweep"] == "parent"]
    children = runs[runs["tags.mlflow.parentRunId"] == parent.run_id.iloc[0]]
    assert len(parent) == 1 and len(children) == 3 and set(runs.status) == {"FINISHED"}
    assert (children["params.augment.enabled"] == "True").all()
    assert (children["metrics.train/train_pairs"] > 1260).all()  # the trials trained on the augmented rows
    values = {int(r["tags.loraops.sweep.trial"]): r["metrics.sweep/objective"] for _, r in children.iterrows()}
    study = json.loads(Path(mlflow.MlflowClient().download_artifacts(parent.run_id.iloc[0], "sweep/study.json")).read_text())
    assert len(study["trials"]) == 3 and all(t["state"] in ("COMPLETE", "PRUNED") for t in study["trials"])
    assert all(t["last_step"] is not None for t in study["trials"])  # every train stage reported to its trial
    complete = {t["number"]: t["value"] for t in study["trials"] if t["state"] == "COMPLETE"}
    best = min(complete, key=complete.get)
    assert study["best"]["number"] == best and values[best] == pytest.approx(complete[best])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(parent.run_id.iloc[0], "sweep")}
    assert "sweep/parallel_coordinate.png" in artifacts
    version = mlflow.MlflowClient().get_model_version_by_alias("interior-qa-lora", "candidate")
    assert version.run_id == study["best"]["mlflow_run_id"]
    assert version.tags.get("gate.verdict")  # it went through the gate
    best_run = runs[runs.run_id == version.run_id].iloc[0]
    assert best_run["metrics.gate/morph_f1"] >= 0 and best_run["metrics.train/best_val_loss"] == pytest.approx(complete[best])
