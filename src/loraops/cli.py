"""The `loraops` command line (Typer). Each command is a thin shell over a stage's ``run``.

Every command takes ``--params FILE`` and repeated ``--set dotted.key=value``. Expected failures
(bad data, bad params, missing models or versions, a failed stage) print one message and exit 2,
without a traceback; a promotion the gate refuses prints the reasons and exits 1.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from loraops.config import Params, load_params
from loraops.errors import ConfigError, LoraopsError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Domain Q&A data → a gated, traceable LoRA adapter.")
review_app = typer.Typer(no_args_is_help=True, help="Human rubric review of answers.")
app.add_typer(review_app, name="review")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="Params file.")
SetOpt = typer.Option(None, "--set", help="Override a param: dotted.key=value (repeatable).")


def _expected_errors() -> tuple[type[BaseException], ...]:
    return (LoraopsError,)


def friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected errors into one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        try:
            return func(*args, **kwargs)
        except _expected_errors() as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def prefect_defaults() -> None:
    """Offline-friendly Prefect settings unless the user set them: no telemetry, a patient ephemeral start."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from loraops.concurrency import local_defaults

    local_defaults()


def _params(path: Path, overrides: Optional[list[str]]) -> Params:
    return load_params(path, overrides or [])


@app.command()
@friendly
def prepare(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Read data.path, clean, split by source row, render prompts → data/prepared."""
    from loraops import data

    card = data.run(_params(params, set_))
    typer.echo(f"prepared {card['pairs']} pairs from {card['source']['path']} ({card['source']['encoding']}); "
               f"cleaning: {card['cleaning']}")


@app.command()
@friendly
def train(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Train the LoRA adapter on data/prepared → models/adapter."""
    from loraops import train as train_stage

    figures = train_stage.run(_params(params, set_))
    if "adapter_sha256" not in figures:  # a non-main process under accelerate launch
        return
    typer.echo(f"trained {figures['steps']} steps in {figures['train_seconds']}s; train loss {figures['train_loss']}, "
               f"best validation loss {figures['best_val_loss']}; adapter sha256 {figures['adapter_sha256'][:12]}")


@app.command()
@friendly
def evaluate(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt,
             self_test: bool = typer.Option(False, "--self-test", help="Only measure metric validity on the Korean probes and print it.")) -> None:
    """Answer the test split with base and tuned models and score them → metrics/eval.json, reports/eval.md."""
    from loraops import evaluate as evaluate_stage
    from loraops import validity
    from loraops.metrics import MetricPack
    from loraops.utils import pick_device

    p = _params(params, set_)
    if self_test:
        measured = validity.measure(MetricPack(p.eval, device=pick_device(p.base.device)), p.eval)
        typer.echo(validity.describe(measured))
        gate = p.registry.gate.metric
        typer.echo(f"thresholds: paraphrase>unrelated >= {p.eval.min_paraphrase_over_unrelated}, "
                   f"real>garbage >= {p.eval.min_real_over_garbage}, identity = 1")
        validity.require_valid(measured, gate, p.eval)
        typer.echo(f"gate metric {gate} (registry.gate.metric) is valid")
        return
    from loraops.report import headline

    summary = evaluate_stage.run(p)
    typer.echo(headline(summary))


@app.command()
@friendly
def score(pairs: Path = typer.Argument(..., help="CSV with columns reference, candidate (optional id, category)."),
          out: Path = typer.Option(..., "--out", help="Where to write the scored CSV."),
          as_json: bool = typer.Option(False, "--json", help="Print the means per metric as JSON."),
          params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Score (reference, candidate) pairs with the metric pack, after the degenerate check → SCORES.csv."""
    from loraops import score as scorer

    result = scorer.run(_params(params, set_), pairs, out)
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False, indent=2))
        return
    typer.echo(f"scored {result['n']} pairs ({result['degenerate']} degenerate) → {out}")
    for metric, value in result["metrics"].items():
        typer.echo(f"  {metric:<14}{value:.4f}")


def _quiet_expected_tracebacks() -> None:
    """Prefect logs every task failure with its traceback; for expected errors the message is enough."""
    import logging

    expected = _expected_errors()

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and isinstance(record.exc_info[1], expected):
                record.exc_info, record.exc_text = None, None
            return True

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_Filter())


@app.command()
@friendly
def run(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt,
        allow_dirty: bool = typer.Option(False, "--allow-dirty", help="Register from uncommitted code (the diff is recorded).")) -> None:
    """Run the whole finetune flow on Prefect (prepare → train → evaluate → register → gate)."""
    _params(params, set_)  # refuse bad params before Prefect starts
    prefect_defaults()
    sys.path.insert(0, str(Path.cwd()))
    from flows.pipeline import finetune

    _quiet_expected_tracebacks()
    _terminate_cleanly()
    try:
        result = finetune(params_file=str(params), overrides=list(set_ or []), allow_dirty=allow_dirty)
    except KeyboardInterrupt as stop:
        typer.secho(f"stopped ({stop or 'interrupted'}): the MLflow run is closed and the gpu slot released",
                    err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(130) from None
    typer.echo(result["summary_text"])


def _terminate_cleanly() -> None:
    """SIGTERM ends `loraops run` as Ctrl-C does: the running stage is stopped, context managers release the
    gpu slot, the flow's crash hooks mark its MLflow run KILLED. (Python's default SIGTERM skips all that.)"""
    import signal

    def stop(signum: int, _frame: Any) -> None:
        import psutil

        for child in psutil.Process().children(recursive=True):  # the DVC stage's `loraops train`, not Prefect's server
            with contextlib.suppress(psutil.Error):
                command = " ".join(child.cmdline())
                if "loraops" in command and "uvicorn" not in command and "prefect" not in command:
                    child.terminate()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)


@app.command()
@friendly
def promote(name: Optional[str] = typer.Argument(None, help="Registered model (default registry.model_name)."),
            version: Optional[str] = typer.Option(None, "--version", help="Version to promote (default: the candidate alias)."),
            force: bool = typer.Option(False, "--force", help="Promote even if the gate refuses."),
            reason: Optional[str] = typer.Option(None, "--reason", help="Why, when forcing (recorded)."),
            as_json: bool = typer.Option(False, "--json"),
            params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Move alias production to a version, only through the gate."""
    from loraops import registry

    p = _params(params, set_)
    result = registry.promote(name or p.registry.model_name, version, p, force=force, reason=reason)
    typer.echo(json.dumps(result, ensure_ascii=False, indent=2) if as_json else registry.describe(result))
    if not result["promoted"]:
        raise typer.Exit(1)


@app.command()
@friendly
def rollback(name: Optional[str] = typer.Argument(None), params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Restore the previous production version (audited)."""
    from loraops import registry

    p = _params(params, set_)
    result = registry.rollback(name or p.registry.model_name, p)
    typer.echo(registry.describe(result))


@app.command()
@friendly
def ask(question: Optional[str] = typer.Argument(None),
        model: Optional[str] = typer.Option(None, "--model", help="models:/<name>@<alias> or models:/<name>/<version>."),
        file: Optional[Path] = typer.Option(None, "--file", help="CSV/JSONL with a question column."),
        out: Optional[Path] = typer.Option(None, "--out", help="Where to write answers (CSV)."),
        params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Answer questions with a registered adapter (default: production)."""
    from loraops import serve

    p = _params(params, set_)
    uri = model or f"models:/{p.registry.model_name}@production"
    if file is not None:
        written = serve.answer_file(uri, file, out or file.with_name(file.stem + ".answers.csv"))
        typer.echo(f"wrote {written}")
        return
    if not question:
        raise ConfigError("ask needs a question, or --file")
    dropped: list[int] = []
    for piece in serve.stream_answer(uri, question, dropped):
        typer.echo(piece, nl=False)
    typer.echo()
    if dropped:
        typer.secho(f"note: {sum(dropped)} undecodable character(s) were dropped from the answer", err=True, fg=typer.colors.YELLOW)


@app.command()
@friendly
def reproduce(ref: str = typer.Argument(..., help="MLflow run id, models:/name/version or models:/name@alias."),
              as_json: bool = typer.Option(False, "--json"), params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Rebuild a run's inputs in an isolated worktree, retrain, re-evaluate and compare."""
    from loraops import reproduce as reproducer

    report = reproducer.reproduce(ref, _params(params, set_))
    typer.echo(json.dumps(report, ensure_ascii=False, indent=2) if as_json else reproducer.describe(report))
    if not report["reproduced"]:
        raise typer.Exit(1)


@review_app.command("export")
@friendly
def review_export(run: str = typer.Option(..., "--run", help="MLflow run id whose answers to review."),
                  out: Path = typer.Option(Path("reviews.csv"), "--out"), n: int = typer.Option(20, "--n", help="Questions to sample."),
                  seed: int = typer.Option(0, "--seed")) -> None:
    """Write a blinded, stratified review sheet (base and tuned answers shuffled) for raters."""
    from loraops import review

    typer.echo(f"wrote {review.export(run, out, n, seed)}; raters fill relevance, accuracy, completeness with 1–5")


@review_app.command("import")
@friendly
def review_import(sheet: Path = typer.Argument(..., help="The filled review CSV.")) -> None:
    """Validate a filled review sheet and log per-criterion means to its MLflow run."""
    from loraops import review

    result = review.import_sheet(sheet)
    typer.echo("\n".join(f"{k}: {v}" for k, v in result.items()))


@app.command()
@friendly
def deploy(params: Path = ParamsOpt) -> None:
    """Serve the Prefect deployments finetune/loraops, promote/loraops, rollback/loraops, reproduce/loraops."""
    prefect_defaults()
    sys.path.insert(0, str(Path.cwd()))
    from flows.deploy import serve_all

    serve_all(str(params))


def main() -> None:  # pragma: no cover - console entry
    app()
if __name__ == "__main__":
    main()
