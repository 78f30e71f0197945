"""The `finetune` flow: DVC stages prepare → train → evaluate, one MLflow run, registration, the gate.

Wiring only: every step calls loraops code. Runs started from a deployment work in their own git
worktree (shared DVC cache), so concurrent runs never touch each other's params, outputs or adapters.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import deployment, flow_run
from prefect.states import Completed, Failed
from pydantic import Field

from loraops.core import concurrency, remote
from loraops.core.config import Params, load_params
from loraops.core.outcomes import NOT_SUCCESS, promotion_outcome
from loraops.core.paths import ADAPTER_DIR, TRAIN_LOG
from loraops.core.results import EvalSummary, Promotion
from loraops.core.secrets import redact_text
from loraops.judge import tone
from loraops.judge.report import (details, flat_metrics, headline, outcome, summary_markdown, top_losses,
                                  version_description)
from loraops.modeling.model import base_location, check_base
from loraops.orchestration import form, publish, workspace
from loraops.registry import judging, lineage, tracking
from loraops.registry import versions as registry

REPO = Path(".")  # the project checkout the flow was started in; MLflow's local store lives here


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
def resolve_params(work: Path, params_file: str, overrides: list[str]) -> Params:
    shown = ", ".join(redact_text(o) for o in overrides) or "none (the file's values as they are)"
    get_run_logger().info("settings: %s with overrides: %s", params_file, shown)
    return workspace.write_params(params_file, overrides, work)


@task(name="base-check")
def base_check(work: Path, params: Params) -> str:
    """model.base loads (its config and weights are there, or the hub id resolves) before any stage runs."""
    return check_base(params.model, work)


@task(name="metric-check")
def metric_check(params: Params) -> dict[str, Any]:
    """The gate metric must order graded Korean answers correctly, or a judge metric's judge agree with the raters,
    before any training is spent on it."""
    return judging.check_gate_metric(params)


@task(name="tone-check")
def tone_check(work: Path, params: Params) -> int:
    """Every row's target value has a speech level in eval.tone.levels, before any training is spent."""
    return tone.check_data(params, work)


def stage_runner() -> workspace.CommandRunner | None:
    """How a flow runs its stages' ``loraops …`` commands: in this process (``loraops.cli.invoke``), or each in a
    `dvc repro` process of its own with ``LORAOPS_STAGE_PROCESSES=1`` (e.g. to give a GPU back between stages)."""
    import os

    from loraops.cli import invoke

    return None if os.environ.get("LORAOPS_STAGE_PROCESSES", "") not in ("", "0") else invoke


def _stage(stage: str, work: Path) -> bool:
    log = get_run_logger()
    ran = workspace.run_stage(stage, work, log.info, in_process=stage_runner())
    log.info("DVC stage %s: %s", stage, "ran" if ran else "skipped (code, params and inputs unchanged)")
    return ran


def gpu_limit() -> tuple[str, int]:
    """The limit this run's training takes (a run started by a work pool's worker takes its host's own)."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return concurrency.run_gpu_limit(bool(context and context.flow_run and context.flow_run.work_pool_name))


def _gpu() -> object:
    """One slot of the ``gpu`` limit for training and the generation after it: a run keeps the GPU from its train
    stage to the end of its evaluate stage (one take per run, and no other run's training between the two)."""
    return concurrency.gpu_slot(get_run_logger().warning, {"type": "flow_run", "id": str(flow_run.id)}, gpu_limit()[0])


@task(name="prepare")
def prepare(work: Path) -> bool:
    remote.pull_stage_inputs(work, get_run_logger().info)  # a fresh clone: the data and documents from the remote
    return _stage("prepare", work)


@task(name="augment")
def augment(work: Path) -> bool:
    return _stage("augment", work)


@task(name="index")
def index(work: Path) -> bool:
    return _stage("index", work)


@task(name="train")
def train(work: Path) -> bool:
    return _stage("train", work)


@task(name="evaluate")
def evaluate(work: Path) -> bool:
    return _stage("evaluate", work)


@task(name="log-run", **IO_RETRIES)
def log_run(work: Path, run_id: str, gate_metric: str) -> EvalSummary:
    summary = EvalSummary.read(work)
    with mlflow.start_run(run_id=run_id):
        tracking.log_curves(run_id, work / TRAIN_LOG)
        tracking.log_eval(run_id, work, flat_metrics(summary, gate_metric), details(summary))
    return summary


@task(name="register", **IO_RETRIES)
def register(work: Path, params: Params, run_id: str, allow_dirty: bool, summary: EvalSummary) -> dict[str, Any]:
    location = base_location(params.model, work)
    card = lineage.card(params, work, location, work / ADAPTER_DIR, run_id,
                        {"id": flow_run.id, "deployment": deployment.name})
    workspace.check_clean(card, allow_dirty)
    with mlflow.start_run(run_id=run_id):
        mlflow.set_tags(lineage.card_tags(card))
        mlflow.log_dict(card, "lineage.json")
    return registry.register(params, run_id, work / ADAPTER_DIR, location, card["adapter_sha256"], card,
                             version_description(summary, params.registry.gate.metric, run_id, card))


@task(name="gate")
def _gate(params: Params, version: str, evidence: str | None = None) -> Any:
    """The gate task ends in a state named after what it did (Promoted, Unchanged, or Refused, Failed-type and red
    like the run it belongs to), so the task list does not show a refusal in the success colour."""
    result = registry.promote(params.registry.model_name, version, params, evidence_run=evidence)
    return final_state(promotion_outcome(result), registry.describe(result), result)


def gate(params: Params, version: str, evidence: str | None = None) -> Promotion:
    """Judge ``version`` against production (or the base) and promote when it passes: the ``gate`` task's result,
    whichever state it ended in; an error in the task is raised here. ``evidence``: the run whose evaluation to
    judge by (this run's, when its adapter was already registered and the evaluation settings changed)."""
    result = _gate(params, version, evidence, return_state=True).result(raise_on_failure=False)
    if isinstance(result, BaseException):
        raise result
    return result


def _log_to_ui(text: str) -> None:
    """Put the headline table and verdict in the run's Prefect log (the UI) without printing them twice in a terminal
    (`loraops run` prints the same text itself when the flow returns)."""
    import logging

    from prefect.logging.handlers import APILogHandler

    adapter = get_run_logger()
    ui = logging.getLogger("loraops.flow-run-log")
    if not ui.handlers:
        ui.addHandler(APILogHandler())
        ui.propagate = False
        ui.setLevel(logging.INFO)
    ui.info(redact_text(text), extra=dict(adapter.extra))


def final_state(name: str, message: str, data: Any) -> Any:
    """The flow run's last state, named after its outcome: Failed-type for an outcome that is no success (a refusal,
    a model worse than its base, a rejection, a timed-out approval) so the Prefect UI shows it red and counts it
    among failed runs; Completed-type otherwise. The data (summary, outcome) is the same either way."""
    return (Failed if name in NOT_SUCCESS else Completed)(name=name, message=message[:1000], data=data)


def close_mlflow_runs(flow: Any, flow_run_: Any, state: Any) -> None:
    """A cancelled, crashed or failed flow run leaves no MLflow run RUNNING."""
    if state.name in NOT_SUCCESS:  # an outcome, not a failure of the run: its MLflow run finished as it should
        return
    tracking.tracking_setup(REPO)
    try:
        tracking.close_runs_of(str(flow_run_.id), "KILLED" if state.is_cancelled() or state.is_cancelling() else "FAILED")
    except Exception as exc:  # the tracking server is down: the next run closes the orphan (tracking.close_orphans)
        if not tracking.unreachable(exc):
            raise


_D = Params()  # the code defaults equal params.yaml's; a deployment's defaults are its params file's values
DataGroup, ModelGroup, LoraGroup = form.GROUPS["data"], form.GROUPS["model"], form.GROUPS["lora"]
TrainGroup, EvalGroup, RegistryGroup = form.GROUPS["train"], form.GROUPS["eval"], form.GROUPS["registry"]
RagGroup, AugmentGroup = form.GROUPS["rag"], form.GROUPS["augment"]


def _run_name() -> str:
    """The flow run's name starts with the registered model it trains, so runs of several domains read apart in the
    Prefect UI (``store-copy-lora · brave-otter``); the rest is the name the run was created with (the Run Name a user
    typed in the form, or the one Prefect made up), so a typed name is kept. A run started by a data version says so
    (``interior-qa-lora · new data · brave-otter``)."""
    created_as = flow_run.name
    if flow_run.parameters.get("data_revision") and not str(created_as or "").startswith("new data · "):
        created_as = f"new data · {created_as}"
    return form.run_name(form.model_name_of(flow_run.parameters, REPO), created_as)


@flow(name="finetune", log_prints=True, validate_parameters=True, flow_run_name=_run_name,
      on_cancellation=[close_mlflow_runs], on_crashed=[close_mlflow_runs], on_failure=[close_mlflow_runs])
def finetune(
    data_path: str = form.quick_field("data_path", _D.data.path),
    data_format: Literal["wide", "qa", "alpaca", "chat"] = form.quick_field("data_format", _D.data.format),
    base_model: str = form.quick_field("base_model", _D.model.base),
    learning_rate: float = form.quick_field("learning_rate", _D.train.learning_rate),
    max_steps: int = form.quick_field("max_steps", _D.train.max_steps),
    lora_rank: int = form.quick_field("lora_rank", _D.lora.r),
    eval_questions: int = form.quick_field("eval_questions", _D.eval.max_samples or 0),
    model_name: str = form.quick_field("model_name", _D.registry.model_name),
    auto_promote: bool = form.quick_field("auto_promote", _D.registry.auto_promote),
    # The valid-type ignores below: the groups are pydantic models built at import time (form.GROUPS), which
    # Prefect renders as form sections; mypy cannot use a variable as a type
    data: DataGroup = DataGroup(),  # type: ignore[valid-type]
    model: ModelGroup = ModelGroup(),  # type: ignore[valid-type]
    lora: LoraGroup = LoraGroup(),  # type: ignore[valid-type]
    train: TrainGroup = TrainGroup(),  # type: ignore[valid-type]
    eval: EvalGroup = EvalGroup(),  # type: ignore[valid-type]  # noqa: A002 - the params.yaml section name
    registry: RegistryGroup = RegistryGroup(),  # type: ignore[valid-type]
    rag: RagGroup = RagGroup(),  # type: ignore[valid-type]
    augment: AugmentGroup = AugmentGroup(),  # type: ignore[valid-type]
    params_file: str = Field("params.yaml", description="The params file the form's values are compared with "
                                                        "(e.g. configs/DATASET.yaml for another dataset)."),
    overrides: list[str] = Field([], description="Extra dotted.key=value settings, applied last "
                                                 "(as `loraops run --set`)."),
    allow_dirty: bool = Field(False, description="Register even if the code has uncommitted changes (the diff is "
                                                 "stored in the lineage card)."),
    isolate: bool = Field(True, description="Run in a fresh git worktree of the project, so runs started together "
                                            "never share params, outputs or adapters."),
    use_form: bool = Field(True, description="Apply the form's values; off = the params file and overrides only "
                                             "(what `loraops run` does)."),
    data_revision: str = Field("", description="Train the project as of this git commit (a published data version); "
                                               "'published' = the newest version `loraops data publish` announced "
                                               "(what the data trigger passes); empty = the checkout's HEAD."),
) -> Any:
    """Fine-tune, evaluate and register a LoRA adapter; promote it when the gate passes and auto_promote is on.

    The most-changed settings come first, then one group per params.yaml section with the keys people change from
    run to run (the others keep the params file's values; ``overrides`` reaches them). A value that differs from
    the params file becomes a `--set`-style override, as do the entries of ``overrides``.
    """
    quick = {"data_path": data_path, "data_format": data_format, "base_model": base_model,
             "learning_rate": learning_rate, "max_steps": max_steps, "lora_rank": lora_rank,
             "eval_questions": eval_questions, "model_name": model_name, "auto_promote": auto_promote}
    groups = {"data": data, "model": model, "lora": lora, "train": train, "eval": eval, "registry": registry, "rag": rag,
              "augment": augment}
    extra = list(overrides or [])
    chosen = load_params(REPO / params_file, extra)
    inputs = [data_path if use_form else chosen.data.path, (rag.docs_path if use_form else None) or chosen.rag.docs_path]
    revision = publish.revision_to_train(data_revision, chosen, get_run_logger().info) if data_revision else "HEAD"
    isolate = isolate or revision != "HEAD"
    with (workspace.isolated_workspace(REPO, str(flow_run.id), inputs, revision) if isolate
          else contextlib.nullcontext(REPO)) as work:
        changed = form.overrides(load_params(Path(work) / params_file), quick, groups) if use_form else []
        with tracking.reachable("starting or tracking the run"):
            return _finetune(Path(work), params_file, changed + extra, allow_dirty)


def _finetune(work: Path, params_file: str, overrides: list[str], allow_dirty: bool) -> Any:
    params = resolve_params(work, params_file, overrides)
    same = workspace.unchanged(work, params, registry_first=True)  # MLflow is imported here: its answer first
    if same is not None:
        get_run_logger().info(same)
        return final_state("Unchanged", same, {"summary_text": same, "outcome": "Unchanged"})
    with workspace.imports_outside_the_collector():  # a deployment's run (`loraops run` has done so already)
        workspace.import_what_runs_use()
    base_check(work, params)
    if judging.needs_gate_check(params):
        metric_check(params)
    if params.eval.tone is not None:
        tone_check(work, params)
    limit, slots = gpu_limit()
    concurrency.ensure_gpu_limit(slots, limit)
    uri = tracking.tracking_setup(REPO)
    experiment = tracking.experiment_for(params.registry.model_name, REPO)
    for orphan in tracking.close_orphans(experiment):
        get_run_logger().warning("MLflow run %s was left RUNNING by a process that died; marked KILLED", orphan)
    tags = {"mlflow.source.name": "loraops finetune flow (flows/finetune.py)", "mlflow.source.type": "JOB",
            **tracking.owner_tags(), "prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name),
            "prefect.deployment": str(deployment.name), "loraops.workspace": str(work.resolve())}
    with mlflow.start_run(experiment_id=experiment, run_name=tracking.run_name(params), tags=tags,
                          log_system_metrics=None) as run:  # MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=true turns them on
        tracking.log_params(params)
        if uri.startswith("http"):
            get_run_logger().info("MLflow run: %s/#/experiments/%s/runs/%s?workflowType=machine_learning", uri.rstrip("/"), experiment, run.info.run_id)
        ran = {"prepare": prepare(work), "augment": augment(work), "index": index(work)}
        with _gpu():
            ran |= {"train": train(work), "evaluate": evaluate(work)}
        mlflow.set_tags({f"dvc.{stage}": "ran" if did else "skipped" for stage, did in ran.items()})
    run_id = run.info.run_id
    try:
        with tracking.reachable("logging and registering the run"):
            summary = log_run(work, run_id, params.registry.gate.metric)
            registered = register(work, params, run_id, allow_dirty, summary)
            same = workspace.already_decided(work, params, registered["version"]) if registered.get("reused") else None
            if same is not None:
                get_run_logger().info(same)
                return final_state("Unchanged", same, {"summary_text": same, "outcome": "Unchanged"})
            approval = params.registry.gate.require_approval  # then only the promote flow, with a reviewer, promotes
            evidence = run_id if registered.get("reused") else None  # the same adapter, evaluated now
            decision = gate(params, registered["version"], evidence) if params.registry.auto_promote and not approval else None
    except BaseException:
        with contextlib.suppress(Exception):  # the server may be the thing that is down; the next run closes it then
            mlflow.MlflowClient().set_terminated(run_id, "FAILED")
        raise
    markdown = summary_markdown(params, summary, run_id, uri, registered, decision, ran, experiment)
    create_markdown_artifact(markdown, key="finetune-summary", description="base vs tuned, registration, gate")
    create_table_artifact(top_losses(work, params.registry.gate.metric), key="tuned-biggest-losses",
                          description="10 questions where tuned lost most to base")
    against_production: list[dict[str, Any]] = []
    if decision is not None and decision.previous not in (None, registered["version"]):
        with tracking.reachable("comparing the candidate's answers with production's"):
            against_production = registry.losses_against_production(params.registry.model_name, registered["version"],
                                                                    params.registry.gate.metric)
    if against_production:
        create_table_artifact(against_production, key="candidate-losses-vs-production",
                              description=f"10 questions where v{registered['version']} lost most to production "
                                          f"v{decision.previous if decision else ''}")
    text = headline(summary) + f"\nMLflow run {run_id}; registered {registered['name']} v{registered['version']}"
    if decision is not None:
        text += "\n" + registry.describe(decision)
    name, message = outcome(summary, params.registry.gate.metric, decision, params.registry.gate.require_approval)
    text += f"\noutcome: {name}: {message}"
    result = {"run_id": run_id, "version": registered["version"], "summary_text": text, "ran": ran, "outcome": name}
    _log_to_ui(text)
    log = get_run_logger().info if name in ("Promoted", "Registered", "Unchanged") else get_run_logger().warning
    log("%s: %s", name, message)
    return final_state(name, message, result)  # the run's state says what happened
