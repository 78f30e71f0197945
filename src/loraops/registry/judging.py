"""Judge calibrations in MLflow, and the rule that a judge gates only when its latest calibration is valid.

Each `loraops judge calibrate` is one run of the experiment ``loraops-judge-calibration``: the judge's settings as
params (never the key), its fingerprint as the tag ``judge.fingerprint``, per criterion the figures as metrics
(``<criterion>/spearman``, ``…/kendall_tau``, ``…/n`` …), the full result (``calibration.json``) and every rated
answer with the raters' and the judge's scores and reason (``calibration_items.csv``) as artifacts, so the MLflow UI
lists the calibrations of each judge beside its settings. The gate reads the newest run of the configured judge's
fingerprint and judges its figures again under today's thresholds (``eval.judge.calibration``).
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
import pandas as pd

from loraops.core.config import JudgeSection, Params
from loraops.core.errors import MetricError
from loraops.core.paths import MLFLOW_ARTIFACTS
from loraops.judge.agreement import revalidate
from loraops.judge.llm import describe, fingerprint
from loraops.registry.tracking import tracking_setup

EXPERIMENT = "loraops-judge-calibration"
RESULT = "calibration.json"


def settings(cfg: JudgeSection) -> dict[str, Any]:
    """The judge's settings as MLflow params (the prompt and rubric are in the artifact; the key is never here)."""
    return {"judge.base_url": cfg.base_url, "judge.model": cfg.model, "judge.temperature": cfg.temperature,
            "judge.max_tokens": cfg.max_tokens, "judge.criteria": ",".join(cfg.criteria),
            "judge.fingerprint": fingerprint(cfg), "judge.api_key_env": cfg.api_key_env}


def record(cfg: JudgeSection, result: dict[str, Any], items: pd.DataFrame, source: str) -> str:
    """Log one calibration as a run of :data:`EXPERIMENT`; returns its run id."""
    tracking_setup()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    location = MLFLOW_ARTIFACTS.resolve().as_uri() if mlflow.get_tracking_uri().startswith("sqlite:") else None
    experiment_id = experiment.experiment_id if experiment else mlflow.create_experiment(
        EXPERIMENT, artifact_location=location, tags={"mlflow.note.content": "One run per `loraops judge calibrate`: a judge's agreement with the "
                                                 "raters, per criterion, under the settings it ran with."})
    name = f"{cfg.model} · {'valid' if result['valid'] else 'not valid'}"
    with mlflow.start_run(experiment_id=experiment_id, run_name=name) as run:
        mlflow.log_params(settings(cfg))
        mlflow.set_tags({"judge.fingerprint": fingerprint(cfg), "judge.valid": str(result["valid"]).lower(),
                         "judge.source": source[:500]})
        metrics = {}
        for criterion, figures in result["criteria"].items():
            for key in ("n", "kendall_tau", "spearman", "exact", "within_one", "mean_shift"):
                if figures.get(key) is not None:
                    metrics[f"{criterion}/{key}"] = float(figures[key])
            if figures.get("spearman_ci95"):
                metrics[f"{criterion}/spearman_ci_low"] = float(figures["spearman_ci95"][0])
        for key, value in (result.get("usage") or {}).items():
            metrics[f"usage/{key}"] = float(value)
        mlflow.log_metrics(metrics)
        mlflow.log_dict({**result, "judge": {**settings(cfg), "criteria": cfg.criteria, "prompt": cfg.prompt}}, RESULT)
        mlflow.log_text(items.to_csv(index=False), "calibration_items.csv")
        return str(run.info.run_id)


def latest(cfg: JudgeSection) -> dict[str, Any] | None:
    """The newest calibration of this judge configuration (its result with ``run_id`` and ``when``), or None."""
    tracking_setup()
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return None
    runs = mlflow.search_runs([experiment.experiment_id], filter_string=f"tags.`judge.fingerprint` = '{fingerprint(cfg)}'",
                              order_by=["attributes.start_time DESC"], max_results=1, output_format="list")
    if not runs:
        return None
    run = runs[0]
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=RESULT)
    with open(path, encoding="utf-8") as fh:
        result = json.load(fh)
    when = pd.Timestamp(run.info.start_time, unit="ms", tz="UTC").strftime("%Y-%m-%d %H:%M UTC")
    return {**result, "run_id": run.info.run_id, "when": when}


def require_calibrated(params: Params) -> dict[str, Any]:
    """Before training: a ``judge_<criterion>`` gate metric needs the configured judge's latest calibration to be
    valid for that criterion under ``eval.judge.calibration``.

    Raises:
        MetricError: never calibrated, or the latest calibration falls short (with its figures and what to do).
    """
    cfg, metric = params.eval.judge, params.registry.gate.metric
    criterion = metric.removeprefix("judge_")
    found = latest(cfg)
    todo = (f"rate at least {cfg.calibration.min_n} answers (the demo or `loraops review`), then run "
            "`loraops judge calibrate`; or gate on a lexical metric such as morph_f1")
    if found is None:
        raise MetricError(f"registry.gate.metric: {metric!r} needs a calibrated judge, and {describe(cfg)} was never "
                          f"calibrated against human ratings: {todo}")
    judged = revalidate(found, cfg.calibration)
    figures = judged["criteria"].get(criterion)
    unparsed = found.get("unparsed") or {}
    if figures is not None and unparsed.get("of") and unparsed["count"] / unparsed["of"] > cfg.max_unparsed:
        figures = {**figures, "valid": False, "short": [*figures["short"], f"{unparsed['count']} of {unparsed['of']} "
                                                        f"judge replies could not be parsed (eval.judge.max_unparsed "
                                                        f"{cfg.max_unparsed:.0%})"]}
    if figures is None:
        raise MetricError(f"registry.gate.metric: {metric!r}: the latest calibration of {describe(cfg)} "
                          f"({found['when']}, MLflow run {found['run_id']}) has no ratings of {criterion}: {todo}")
    if not figures["valid"]:
        raise MetricError(f"registry.gate.metric: {metric!r} is not valid: the latest calibration of {describe(cfg)} "
                          f"({found['when']}, MLflow run {found['run_id']}) falls short on {criterion}: "
                          + "; ".join(figures["short"]) + f". To use it: {todo}")
    return {"metric": metric, "calibration_run": found["run_id"], "when": found["when"], **{
        k: figures[k] for k in ("n", "kendall_tau", "spearman", "spearman_ci95", "within_one", "mean_shift")}}


def needs_gate_check(params: Params) -> bool:
    """Whether a run checks its gate metric before training: the probe self-test, or a judge to reach or trust."""
    return params.eval.self_test or params.eval.judge.enabled or params.registry.gate.metric.startswith("judge_")


def check_gate_metric(params: Params) -> dict[str, Any]:
    """Before any training: an enabled judge answers and serves its model; a ``judge_<criterion>`` gate metric has a
    valid calibration (:func:`require_calibrated`); any other gate metric orders the Korean probes correctly (with
    ``eval.self_test``).

    Raises:
        JudgeError, MetricError: naming the key and the figures.
    """
    from loraops.judge import validity
    from loraops.judge.llm import Judge

    if params.eval.judge.enabled:
        Judge(params.eval.judge).check()
    if params.registry.gate.metric.startswith("judge_"):
        return require_calibrated(params)
    return validity.check_gate(params) if params.eval.self_test else {}
