"""The `sweep` flow: Optuna trials of the loop as MLflow child runs of one parent run; the best goes to the gate.

Wiring only (the logic is :mod:`loraops.orchestration.sweep`, :mod:`loraops.orchestration.workspace`, the finetune flow's tasks). Each trial
runs prepare → augment → index → train in its own git worktree with the trial's values as overrides, holding the
`gpu` slot while it trains; its train stage reports validation losses to Optuna, which prunes trials that fall
behind. The best trial by the validation objective (never the test split) is then evaluated, registered as
`candidate` and gated like a finetune run.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import deployment, flow_run
from pydantic import Field

from loraops.core import concurrency, remote
from loraops.core.config import Params, apply_overrides, dump_params, load_params, validate
from loraops.core.errors import StageError
from loraops.core.paths import SWEEPS_DIR, TRAIN_LOG
from loraops.core.results import TrainFigures
from loraops.flows.finetune import IO_RETRIES, REPO, close_mlflow_runs, final_state, gate, log_run, register
from loraops.judge.report import headline, outcome
from loraops.modeling.trial import trial_env
from loraops.orchestration import form, sweep, workspace
from loraops.registry import tracking
from loraops.registry import versions as registry

SweepGroup = form.SWEEP_GROUP


def in_process(params: Params) -> workspace.CommandRunner | None:
    """Trials one at a time (sweep.parallel 1) run their stages' commands in this process, as the finetune flow does;
    concurrent trials each start `dvc repro` (a stage in this process changes its directory and environment)."""
    from loraops.flows.finetune import stage_runner

    return stage_runner() if params.sweep.parallel == 1 else None


@task(name="trial")
def trial(work: Path, number: int, trial_id: int, params: Params, values: dict[str, Any], study: dict[str, str],
          parent: dict[str, str]) -> dict[str, Any]:
    """One trial: the loop up to train in its worktree, then its MLflow child run (params, curves, objective)."""
    log = get_run_logger()
    dump_params(params, work / "params.yaml")  # the resolved params of this trial, as DVC reads them
    remote.pull_stage_inputs(work, log.info)
    here = in_process(params)
    for stage in ("prepare", "augment", "index"):
        workspace.run_stage(stage, work, log.info, in_process=here)
    with concurrency.gpu_slot(log.warning, {"type": "flow_run", "id": str(flow_run.id)}):
        workspace.run_stage("train", work, log.info, trial_env(Path(study["path"]), study["name"], trial_id,
                                                                   params.sweep.pruning, params.sweep.objective),
                            in_process=here)
    figures = TrainFigures.read(work)
    value = sweep.objective(figures, params)
    client = mlflow.MlflowClient()
    run = client.create_run(parent["experiment"], run_name=f"trial-{number}", tags={
        "mlflow.parentRunId": parent["run_id"], "loraops.sweep.trial": str(number), "mlflow.source.type": "JOB",
        "mlflow.source.name": "loraops sweep flow (flows/sweep.py)", **tracking.owner_tags(),
        "prefect.flow_run_id": str(flow_run.id), "loraops.workspace": str(work.resolve()),
        "optuna.state": "PRUNED" if figures.pruned else "COMPLETE"})
    run_id = run.info.run_id
    tracking.log_params(params, run_id)
    tracking.log_curves(run_id, work / TRAIN_LOG)
    tracking.log_metrics_batch(run_id, {"sweep/objective": value, **tracking.train_figures(figures)})
    client.set_terminated(run_id, "FINISHED")
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    log.info("trial %d (%s): objective %s%s", number, shown, "—" if value is None else f"{value:.4f}",
             f", pruned at {figures.pruned_at}" if figures.pruned else "")
    return {"value": value, "pruned": bool(figures.pruned), "run_id": run_id, "figures": figures.model_dump(mode="json")}


@task(name="study-summary", **IO_RETRIES)
def study_summary(study: Any, runs: dict[int, str], parent_id: str, params: Params) -> dict[str, Any]:
    """The parent run: the search space, the study summary and its plots."""
    result = sweep.summary(study, runs)
    client = mlflow.MlflowClient()
    client.log_dict(parent_id, result, "sweep/study.json")
    client.log_dict(parent_id, {k: v.model_dump(mode="json") for k, v in params.sweep.space.items()}, "sweep/space.json")
    with tempfile.TemporaryDirectory() as tmp:
        for path in sweep.plots(study, Path(tmp)):
            client.log_artifact(parent_id, str(path), "sweep")
    tracking.log_metrics_batch(parent_id, {"sweep/best_objective": (result["best"] or {}).get("value"),
                                           "sweep/complete": result["complete"], "sweep/pruned": result["pruned"],
                                           "sweep/failed": result["failed"]})
    if result["best"]:
        client.set_tag(parent_id, "loraops.sweep.best_trial", str(result["best"]["number"]))
        client.set_tag(parent_id, "loraops.sweep.best_run_id", str(result["best"]["mlflow_run_id"]))
    return result


def _run_name() -> str:
    from prefect.utilities.names import generate_slug

    return f"sweep · {form.model_name_of(flow_run.parameters, REPO)} · {generate_slug(2)}"


@flow(name="sweep", log_prints=True, validate_parameters=True, flow_run_name=_run_name,
      on_cancellation=[close_mlflow_runs], on_crashed=[close_mlflow_runs], on_failure=[close_mlflow_runs])
def sweep_flow(
    # The valid-type ignores below: the groups are pydantic models built at import time (form.GROUPS), which
    # Prefect renders as form sections; mypy cannot use a variable as a type
    sweep: SweepGroup = SweepGroup(),  # type: ignore[valid-type]
    params_file: str = Field("params.yaml", description="The params file every trial starts from."),
    overrides: list[str] = Field([], description="Extra dotted.key=value settings, applied before the trial's values "
                                                 "(as `loraops sweep --set`)."),
    allow_dirty: bool = Field(False, description="Register the best trial even if the code has uncommitted changes."),
    use_form: bool = Field(True, description="Apply the sweep group's values; off = the params file and overrides only."),
) -> Any:
    """Search the settings with Optuna: each trial a tracked child run in its own worktree; the best by the validation
    objective is evaluated, registered as candidate and gated."""
    extra = list(overrides or [])
    if use_form:
        extra = form.overrides(load_params(REPO / params_file, extra), {}, {"sweep": sweep}) + extra
    params = load_params(REPO / params_file, extra)
    with tracking.reachable("running the sweep"):
        return _sweep(params, allow_dirty)


def _sweep(params: Params, allow_dirty: bool) -> Any:
    from optuna.trial import TrialState

    from loraops.orchestration.sweep import create_study, distributions, trial_overrides

    log = get_run_logger()
    if params.sweep.objective == "val_loss" and params.data.validation_fraction == 0:
        raise StageError("sweep.objective: val_loss needs a validation split (data.validation_fraction > 0), or use "
                         "cv_val_loss with train.cv_folds")
    concurrency.ensure_gpu_limit()
    tracking.tracking_setup(REPO)
    experiment = tracking.experiment_for(params.registry.model_name, REPO)
    client = mlflow.MlflowClient()
    base = Path(params.model.base).name or params.model.base
    parent = client.create_run(experiment, run_name=f"sweep-{base}-{params.sweep.trials}trials-{time.strftime('%m%d-%H%M%S')}", tags={
        "mlflow.source.type": "JOB", "mlflow.source.name": "loraops sweep flow (flows/sweep.py)", **tracking.owner_tags(),
        "loraops.sweep": "parent", "prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name),
        "prefect.deployment": str(deployment.name)})
    parent_id = parent.info.run_id
    tracking.log_params(params, parent_id)
    name = f"{params.registry.model_name}-{parent_id[:8]}"
    study_path = REPO / SWEEPS_DIR / f"{name}.journal"
    study = create_study(params, name, study_path)
    space = distributions(params)
    runs: dict[int, str] = {}
    trial_params: dict[int, Params] = {}
    tree = params.model_dump(mode="json")
    with contextlib.ExitStack() as worktrees:
        works: dict[int, Path] = {}
        while len(study.trials) < params.sweep.trials:
            batch = [study.ask(space) for _ in range(min(params.sweep.parallel, params.sweep.trials - len(study.trials)))]
            futures = []
            for asked in batch:
                chosen = validate(apply_overrides(json.loads(json.dumps(tree)), trial_overrides(asked.params)))
                trial_params[asked.number] = chosen
                works[asked.number] = worktrees.enter_context(workspace.isolated_workspace(
                    REPO, f"{flow_run.id}-trial-{asked.number}", [chosen.data.path, chosen.rag.docs_path]))
                futures.append(trial.submit(works[asked.number], asked.number, asked._trial_id,  # the id the train stage reports to
                                            chosen, asked.params,
                                            {"path": str(study_path), "name": name},
                                            {"run_id": parent_id, "experiment": experiment}))
            for asked, future in zip(batch, futures):
                future.wait()
                state = future.state
                if not state.is_completed():
                    log.warning("trial %d failed: %s", asked.number, state.message)
                    study.tell(asked, state=TrialState.FAIL)
                    continue
                done = future.result()
                runs[asked.number] = done["run_id"]
                if done["pruned"]:
                    study.tell(asked, state=TrialState.PRUNED)
                elif done["value"] is None:
                    log.warning("trial %d has no validation objective (%s)", asked.number, params.sweep.objective)
                    study.tell(asked, state=TrialState.FAIL)
                else:
                    study.tell(asked, done["value"])
        result = study_summary(study, runs, parent_id, params)
        if result["best"] is None:
            client.set_terminated(parent_id, "FAILED")
            raise StageError(f"sweep {name}: no trial completed ({result['pruned']} pruned, {result['failed']} failed); "
                             "see the trials' logs above")
        best = result["best"]["number"]
        best_params, best_work, best_run = trial_params[best], works[best], runs[best]
        log.info("best trial %d (objective %.4f): evaluating it on the test split, then registering", best,
                 result["best"]["value"])
        with concurrency.gpu_slot(log.warning, {"type": "flow_run", "id": str(flow_run.id)}):
            workspace.run_stage("evaluate", best_work, log.info, in_process=in_process(best_params))
        summary = log_run(best_work, best_run, best_params.registry.gate.metric)
        registered = register(best_work, best_params, best_run, allow_dirty, summary)
        approval = best_params.registry.gate.require_approval
        decision = gate(best_params, registered["version"]) if best_params.registry.auto_promote and not approval else None
    client.set_tag(parent_id, "loraops.sweep.registered", f"{registered['name']} v{registered['version']}")
    client.set_terminated(parent_id, "FINISHED")
    text = sweep.describe(result) + "\n" + headline(summary)
    text += f"\nMLflow parent run {parent_id}; best trial run {best_run}; registered {registered['name']} v{registered['version']}"
    if decision is not None:
        text += "\n" + registry.describe(decision)
    name_, message = outcome(summary, best_params.registry.gate.metric, decision, approval)
    text += f"\noutcome: {name_}: {message}"
    rows = [{"trial": t["number"], "state": t["state"], "objective": t["value"],
             **{k: v for k, v in t["params"].items()}} for t in result["trials"]]
    create_table_artifact(rows, key="sweep-trials", description="every trial: state, validation objective, values")
    create_markdown_artifact(f"```\n{text}\n```", key="sweep-summary", description="trials, the best, its gate")
    return final_state(name_, message, {"summary_text": text, "result": result, "outcome": name_,
                                        "version": registered["version"], "parent_run_id": parent_id})
