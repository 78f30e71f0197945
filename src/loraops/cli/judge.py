"""`loraops judge calibrate`: how far the configured LLM judge agrees with the people who rated answers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from loraops.cli import ParamsOpt, SetOpt, app, friendly, params_of, user_path

judge_app = typer.Typer(no_args_is_help=True, help="The LLM rubric judge (eval.judge): calibrate it against raters.")
app.add_typer(judge_app, name="judge")

NOT_VALID = 3
"""Exit code of a calibration that falls short (as a refused promotion): the gate may not use that judge."""


@judge_app.command("calibrate")
@friendly
def judge_calibrate(run: Optional[str] = typer.Option(None, "--run", help="MLflow run id whose ratings to use "
                                                                            "(demo and review imports)."),
                    ratings: Optional[Path] = typer.Option(None, "--ratings", help="CSV/JSONL of rated answers: "
                                                           "question, answer, [reference, rater], 1–5 per criterion."),
                    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
                    params: Path = ParamsOpt, overrides: Optional[list[str]] = SetOpt) -> None:
    """Score the rated answers with eval.judge, print per criterion n, Kendall τ-b and Spearman ρ with 95% bootstrap
    intervals, exact and within-one agreement and the judge's mean shift, record it in MLflow, and say whether the
    judge may gate (exit 0) or not (exit 3). Without --run or --ratings: every run of the project with ratings."""
    from loraops.core.errors import ConfigError
    from loraops.registry import judging
    from loraops.registry.tracking import tracking_setup
    from loraops.review import calibration

    p = params_of(params, overrides)
    cfg = p.eval.judge
    if not cfg.base_url or not cfg.model:
        raise ConfigError("eval.judge.base_url and eval.judge.model: set the judge's endpoint and model to calibrate it "
                          "(calibrating sends the rated answers there even while eval.judge.enabled is false)")
    if run and ratings:
        raise ConfigError("--run and --ratings: give one source of ratings")
    tracking_setup()
    criteria = list(cfg.criteria)
    if ratings is not None:
        items, source = calibration.from_file(user_path(ratings), criteria), f"file {ratings}"
    elif run is not None:
        items, source = calibration.from_run(run, criteria), f"run {run}"
    else:
        items, runs = calibration.from_project(p)
        source = f"{len(runs)} runs of {p.registry.model_name}"
    if not items:
        raise ConfigError(f"no rated answers in {source}: rate answers in `loraops demo` or with `loraops review export`"
                          " / `import`, or pass --ratings FILE")
    result, table = calibration.calibrate(p, items)
    result["source"] = source
    result["run_id"] = judging.record(cfg, result, table, source)
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False, indent=2))
    else:
        typer.echo(calibration.report(result))
    if not result["valid"]:
        raise typer.Exit(NOT_VALID)
