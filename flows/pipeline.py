"""The `finetune` flow: DVC stages prepare → train → evaluate, one MLflow run, registration, the gate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import deployment, flow_run

from loraops import lineage, pipeline, registry, tracking
from loraops.cli import headline
from loraops.config import Params
from loraops.model import base_location
from loraops.report import flat_metrics
from loraops.train import ADAPTER_DIR, TRAIN_LOG

ROOT = Path(".")


def _io_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only what I/O can fix (tracking server, artifact store, network), never logic errors."""
    from mlflow.exceptions import MlflowException

    try:
        state.result()
    except (MlflowException, OSError, ConnectionError, TimeoutError):
        return True
    except BaseException:
        return False
    return False


IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 5, 10], "retry_condition_fn": _io_failure}


@task(name="params")
def resolve_params(params_file: str, overrides: list[str]) -> Params:
    return pipeline.write_params(params_file, overrides, ROOT)


@task(name="prepare")
def prepare() -> bool:
    return pipeline.reproduce_stage("prepare", ROOT)


@task(name="train", tags=["gpu"])
def train() -> bool:
    return pipeline.reproduce_stage("train", ROOT)


@task(name="evaluate", tags=["gpu"])
def evaluate() -> bool:
    return pipeline.reproduce_stage("evaluate", ROOT)


@task(name="log-run", **IO_RETRIES)
def log_run(run_id: str) -> dict[str, Any]:
    import json

    summary = json.loads((ROOT / "metrics/eval.json").read_text(encoding="utf-8"))
    with mlflow.start_run(run_id=run_id):
        tracking.log_curves(run_id, ROOT / TRAIN_LOG)
        tracking.log_eval(run_id, ROOT, flat_metrics(summary))
    return summary


@task(name="register", **IO_RETRIES)
def register(params: Params, run_id: str, allow_dirty: bool) -> dict[str, Any]:
    location = base_location(params.model, ROOT)
    card = lineage.card(params, ROOT, location, ROOT / ADAPTER_DIR, run_id,
                        {"id": flow_run.id, "deployment": deployment.name})
    pipeline.check_clean(card, allow_dirty)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags(lineage.card_tags(card))
        mlflow.log_dict(card, "lineage.json")
    return registry.register(params, run_id, ROOT / ADAPTER_DIR, location, card["adapter_sha256"], card)


@task(name="gate")
def gate(params: Params, version: str) -> dict[str, Any]:
    return registry.promote(params.registry.model_name, version, params)


@flow(name="finetune", log_prints=True)
def finetune(params_file: str = "params.yaml", overrides: list[str] | None = None, allow_dirty: bool = False) -> dict[str, Any]:
    """Fine-tune, evaluate and register a LoRA adapter; promote it when the gate passes and auto_promote is on."""
    params = resolve_params(params_file, list(overrides or []))
    uri = tracking.tracking_setup(ROOT)
    experiment = tracking.experiment_for(params.registry.model_name, ROOT)
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name),
            "prefect.deployment": str(deployment.name)}
    with mlflow.start_run(experiment_id=experiment, run_name=tracking.run_name(params), tags=tags) as run:
        tracking.log_params(params)
        ran = {"prepare": prepare(), "train": train(), "evaluate": evaluate()}
        mlflow.set_tags({f"dvc.{stage}": "ran" if did else "skipped" for stage, did in ran.items()})
    run_id = run.info.run_id
    try:
        summary = log_run(run_id)
        registered = register(params, run_id, allow_dirty)
        decision = gate(params, registered["version"]) if params.registry.auto_promote else None
    except BaseException:
        mlflow.MlflowClient().set_terminated(run_id, "FAILED")
        raise
    markdown = pipeline.summary_markdown(params, summary, run_id, uri, registered, decision, ran)
    create_markdown_artifact(markdown, key="finetune-summary", description="base vs tuned, registration, gate")
    create_table_artifact(pipeline.top_losses(ROOT, params.registry.gate.metric), key="tuned-biggest-losses",
                          description="10 questions where tuned lost most to base")
    text = headline(summary) + f"\nMLflow run {run_id}; registered {registered['name']} v{registered['version']}"
    if decision is not None:
        text += "\n" + registry.describe(decision)
    return {"run_id": run_id, "version": registered["version"], "summary_text": text, "ran": ran}
