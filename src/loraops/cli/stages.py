"""`loraops prepare | train | evaluate | score`: the DVC stages' commands (``dvc.yaml`` runs these)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from loraops.cli import ParamsOpt, SetOpt, app, friendly, params_of, user_path


@app.command()
@friendly
def prepare(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Read data.path, clean, split by source row, render prompts → data/prepared."""
    from loraops import prepare as prepare_stage

    card = prepare_stage.run(params_of(params, set_))
    typer.echo(f"prepared {card['pairs']} pairs from {card['source']['path']} ({card['source']['encoding']}); "
               f"cleaning: {card['cleaning']}")


@app.command()
@friendly
def train(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Train the LoRA adapter on data/prepared → models/adapter."""
    from loraops import train as train_stage

    figures = train_stage.run(params_of(params, set_))
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
    from loraops.report import headline
    from loraops.utils import pick_device

    p = params_of(params, set_)
    if self_test:
        measured = validity.measure(MetricPack(p.eval, device=pick_device(p.base.device)), p.eval)
        typer.echo(validity.describe(measured))
        gate = p.registry.gate.metric
        typer.echo(f"thresholds: paraphrase>unrelated >= {p.eval.min_paraphrase_over_unrelated}, "
                   f"real>garbage >= {p.eval.min_real_over_garbage}, identity = 1")
        validity.require_valid(measured, gate, p.eval)
        typer.echo(f"gate metric {gate} (registry.gate.metric) is valid")
        return
    typer.echo(headline(evaluate_stage.run(p)))


@app.command()
@friendly
def score(pairs: Path = typer.Argument(..., help="CSV with columns reference, candidate (optional id, category)."),
          out: Path = typer.Option(..., "--out", help="Where to write the scored CSV."),
          as_json: bool = typer.Option(False, "--json", help="Print the means per metric as JSON."),
          params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Score (reference, candidate) pairs with the metric pack, after the degenerate check → SCORES.csv."""
    from loraops import score as scorer

    out = user_path(out.parent) / out.name
    result = scorer.run(params_of(params, set_), user_path(pairs), out)
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False, indent=2))
        return
    typer.echo(f"scored {result['n']} pairs ({result['degenerate']} degenerate) → {out}")
    for metric, value in result["metrics"].items():
        typer.echo(f"  {metric:<14}{value:.4f}")
