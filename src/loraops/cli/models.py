"""`loraops promote | rollback | ask | reproduce`: registered versions in MLflow."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from loraops.cli import ParamsOpt, SetOpt, app, friendly, params_of, registry_params, user_path
from loraops.core.errors import ConfigError


@app.command()
@friendly
def promote(name: Optional[str] = typer.Argument(None, help="Registered model (default registry.model_name)."),
            version: Optional[str] = typer.Option(None, "--version", help="Version to promote (default: the candidate alias)."),
            force: bool = typer.Option(False, "--force", help="Promote even if the gate refuses."),
            reason: Optional[str] = typer.Option(None, "--reason", help="Why, when forcing (recorded)."),
            as_json: bool = typer.Option(False, "--json"),
            params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Move alias production to a version, only through the gate (and a reviewer's approval in the Prefect UI when
    registry.gate.require_approval is set). Exit code 0 promoted (or already production), 3 refused or rejected."""
    import os

    from loraops.judge.report import exit_code
    from loraops.registry import versions as registry

    p = params_of(params, set_)
    if p.registry.gate.require_approval and not force:
        from loraops.review.approval import request_approval

        run = request_approval(name or p.registry.model_name, version, os.path.relpath(user_path(params).resolve()),
                               list(set_ or []))
        typer.echo(run["message"])
        if run["state"] != "PAUSED":
            raise typer.Exit(exit_code("Promoted" if run.get("promoted") else "Refused"))
        return
    result = registry.promote(name or p.registry.model_name, version, p, force=force, reason=reason)
    typer.echo(json.dumps(result.to_dict(), ensure_ascii=False, indent=2) if as_json else registry.describe(result))
    if not result.promoted:
        raise typer.Exit(exit_code("Refused"))


@app.command()
@friendly
def rollback(name: Optional[str] = typer.Argument(None), params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Restore the previous production version (audited)."""
    from loraops.registry import versions as registry

    p = params_of(params, set_)
    typer.echo(registry.describe(registry.rollback(name or p.registry.model_name, p)))


@app.command()
@friendly
def ask(question: Optional[str] = typer.Argument(None),
        model: Optional[str] = typer.Option(None, "--model", help="models:/<name>@<alias> or models:/<name>/<version>."),
        file: Optional[Path] = typer.Option(None, "--file", help="CSV/JSONL of questions."),
        question_column: str = typer.Option("question", "--question-column", help="The column of --file holding the questions."),
        out: Optional[Path] = typer.Option(None, "--out", help="Where to write answers (CSV; default FILE.answers.csv)."),
        params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Answer questions with a registered adapter (default: production)."""
    from loraops.registry import versions as registry
    from loraops.serving import pyfunc as serve

    p = registry_params(params, set_)
    uri = model or f"models:/{p.registry.model_name}@production"
    served = registry.version_of(uri)  # no production yet: the error names the candidate and the gate's verdict
    warning = registry.floor_warning(*served) if served else None
    if warning:
        typer.secho(warning, err=True, fg=typer.colors.YELLOW)
    if file is not None:
        source = user_path(file)
        target = user_path(out.parent) / out.name if out else source.with_name(source.stem + ".answers.csv")
        typer.echo(f"wrote {serve.answer_file(uri, source, target, question_column)}")
        return
    if not question:
        raise ConfigError("ask needs a question, or --file")
    dropped: list[int] = []
    sources: list[dict] = []
    for piece in serve.stream_answer(uri, question, dropped, sources):
        typer.echo(piece, nl=False)
    typer.echo()
    if sources:
        typer.echo("\nsources:")
        for number, passage in enumerate(sources, start=1):
            text = " ".join(passage["text"].split())
            typer.echo(f"  [{number}] {passage['id']}: {text[:100]}{'…' if len(text) > 100 else ''}")
    if dropped:
        typer.secho(f"note: {sum(dropped)} undecodable character(s) were dropped from the answer", err=True, fg=typer.colors.YELLOW)


@app.command()
@friendly
def reproduce(ref: str = typer.Argument(..., help="MLflow run id, models:/name/version or models:/name@alias."),
              as_json: bool = typer.Option(False, "--json"), params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Rebuild a registered run's inputs in an isolated worktree, retrain, re-evaluate and compare."""
    from loraops.registry import reproduce as reproducer

    report = reproducer.reproduce(ref, params_of(params, set_))
    typer.echo(json.dumps(report, ensure_ascii=False, indent=2) if as_json else reproducer.describe(report))
    if not report["reproduced"]:
        raise typer.Exit(1)
