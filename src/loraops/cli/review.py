"""`loraops review export | import`: blinded human rubric review of answers."""

from __future__ import annotations

from pathlib import Path

import typer

from loraops.cli import app, friendly, user_path

review_app = typer.Typer(no_args_is_help=True, help="Human rubric review of answers.")
app.add_typer(review_app, name="review")


@review_app.command("export")
@friendly
def review_export(run: str = typer.Option(..., "--run", help="MLflow run id whose answers to review."),
                  out: Path = typer.Option(Path("reviews.csv"), "--out"), n: int = typer.Option(20, "--n", help="Questions to sample."),
                  seed: int = typer.Option(0, "--seed")) -> None:
    """Write a blinded, stratified review sheet (base and tuned answers shuffled) for raters."""
    from loraops.review import rubric as review

    target = user_path(out.parent) / out.name
    typer.echo(f"wrote {review.export(run, target, n, seed)}; raters fill relevance, accuracy, completeness with 1–5")


@review_app.command("import")
@friendly
def review_import(sheet: Path = typer.Argument(..., help="The filled review CSV.")) -> None:
    """Validate a filled review sheet and log per-criterion means to its MLflow run."""
    from loraops.review import rubric as review

    result = review.import_sheet(user_path(sheet))
    typer.echo("\n".join(f"{k}: {v}" for k, v in result.items()))
