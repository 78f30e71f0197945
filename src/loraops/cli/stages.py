"""`loraops prepare | augment | index | retrieve | train | evaluate | score`: the DVC stages' commands (``dvc.yaml`` runs these)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from loraops.cli import ParamsOpt, SetOpt, app, friendly, params_of, user_path
from loraops.core.config import Params


@app.command()
@friendly
def prepare(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt,
            show: int = typer.Option(0, "--show", min=0, metavar="N",
                                     help="Then print the first N training pairs as the model reads them (the chat "
                                          "template applied), with the trained tokens marked ⟦…⟧.")) -> None:
    """Read data.path, clean, split by source row, render prompts → data/prepared."""
    from loraops.stages import prepare as prepare_stage

    p = params_of(params, set_)
    card = prepare_stage.run(p)
    typer.echo(f"prepared {card.pairs} pairs from {card.source['path']} ({card.source['encoding']}); "
               f"cleaning: {card.cleaning}")
    note = prepare_stage.length_note(card.cleaning, p.data)
    if note:
        typer.secho(f"note: {note}", fg=typer.colors.YELLOW)
    if show:
        _show_prompts(p, show)


def _show_prompts(p: Params, count: int) -> None:
    """`prepare --show N`, kept out of the prepare command's body: the DVC stage (`loraops prepare`) never runs it,
    so loading the base's tokenizer is no code dependency of the stage."""
    from loraops.stages import preview

    typer.echo(preview.show(p, Path("."), count))


@app.command()
@friendly
def augment(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """More training rows (augment.enabled): rule-based question variants, a teacher's answers, Q&A from the
    documents; train-only, filtered, none close to validation/test → data/augmented."""
    from loraops.stages import augment as augment_stage

    card = augment_stage.run(params_of(params, set_))
    if not card["enabled"]:
        typer.echo(f"augment.enabled is false: data/augmented/train.jsonl is the prepared train split ({card['rows']} rows)")
        return
    added = {k: v for k, v in card["by_source"].items() if k != "original" and v}
    typer.echo(f"augmented: {card['by_source']['original']} original + {sum(added.values())} added rows "
               f"({', '.join(f'{k} {v}' for k, v in added.items()) or 'none'}); filters removed "
               f"{sum(card['removed'].values())} ({', '.join(f'{k} {v}' for k, v in card['removed'].items()) or 'none'})")
    if card.get("teacher"):
        t = card["teacher"]
        typer.echo(f"teacher {t['model']}: {t['calls']} calls, {t['cached']} replies from the cache, "
                   f"{sum(card['unparseable_replies'].values())} unparseable replies skipped")


@app.command()
@friendly
def index(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Chunk rag.docs_path and index it (Korean morpheme BM25; vectors for dense/hybrid) → data/index; with
    rag.enabled, each prepared question's passages → data/retrieved."""
    from loraops.core.remote import pull_inputs
    from loraops.stages import index as index_stage

    p = params_of(params, set_)
    if p.rag.corpus == "docs":
        pull_inputs(Path("."), p.rag.docs_path)  # a fresh clone: the documents from the DVC remote
    card = index_stage.run(p)
    typer.echo(f"indexed {card['documents']} documents as {card['chunks']} chunks from {card['source']} "
               f"(mode {card['mode']}, {card['tokenizer']} terms)")
    prompts = card["prompts"]
    if "skipped" in prompts:
        typer.echo(f"no questions to attach passages to ({prompts['skipped']}): `loraops run` or `dvc repro index` "
                   "writes data/retrieved once the data is prepared")
    elif prompts["enabled"]:
        typer.echo(f"passages attached to every prepared question (rag.template): mean context "
                   f"{prompts['mean_context_chars']} characters, {prompts['empty_contexts']} question(s) with none")


@app.command()
@friendly
def retrieve(query: Optional[str] = typer.Argument(None, help="A question to look up."),
             k: Optional[int] = typer.Option(None, "--k", help="Passages to return (default rag.k)."),
             file: Optional[Path] = typer.Option(None, "--file", help="CSV/JSONL of questions."),
             out: Optional[Path] = typer.Option(None, "--out", help="JSONL to write (with --file; default FILE.retrieved.jsonl)."),
             question_column: str = typer.Option("question", "--question-column", help="The column of --file holding the questions."),
             mode: Optional[str] = typer.Option(None, "--mode", help="bm25 | dense | hybrid (default rag.mode)."),
             as_json: bool = typer.Option(False, "--json", help="One JSON line: {question, results: [{id, score, text}]}."),
             params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """The top-k passages of the document index for a question, or for every question of a file."""
    import json

    from loraops.core.errors import ConfigError
    from loraops.retrieval import index as retrieval

    p = params_of(params, set_)
    if mode is not None and mode not in ("bm25", "dense", "hybrid"):
        raise ConfigError(f"--mode: {mode!r} is not one of bm25, dense, hybrid")
    top = p.rag.k if k is None else k
    if top <= 0:
        raise ConfigError(f"--k: must be at least 1, got {top}")
    if (query is None) == (file is None):
        raise ConfigError("retrieve needs a question, or --file (not both)")
    retriever = retrieval.Retriever(p, mode=mode)
    if file is not None:
        source = user_path(file)
        target = user_path(out.parent) / out.name if out else source.with_name(source.stem + ".retrieved.jsonl")
        count = retrieval.retrieve_file(retriever, source, target, top, question_column)
        typer.echo(f"wrote {target} ({count} questions, top {top} each)")
        return
    assert query is not None  # checked above: a question or --file
    results = retriever.search(query, top)
    if as_json:
        typer.echo(json.dumps({"question": query, "results": results}, ensure_ascii=False))
        return
    for rank, hit in enumerate(results, start=1):
        typer.echo(f"{rank}. {hit['id']}  ({hit['score']:.3f})\n   {hit['text']}")
    if not results:
        typer.echo("no passage shares a term with the question")


@app.command()
@friendly
def train(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt) -> None:
    """Train the LoRA adapter on data/prepared → models/adapter."""
    from loraops.stages import train as train_stage

    figures = train_stage.run(params_of(params, set_))
    if figures.adapter_sha256 is None:  # a non-main process under accelerate launch
        return
    typer.echo(f"trained {figures.steps} steps in {figures.train_seconds}s; train loss {figures.train_loss}, "
               f"best validation loss {figures.best_val_loss}; adapter sha256 {figures.adapter_sha256[:12]}")


@app.command()
@friendly
def evaluate(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt,
             self_test: bool = typer.Option(False, "--self-test", help="Only measure metric validity on the Korean probes and print it.")) -> None:
    """Answer the test split with base and tuned models and score them → metrics/eval.json, reports/eval.md."""
    from loraops.core.utils import pick_device
    from loraops.judge import validity
    from loraops.judge.report import headline
    from loraops.stages import evaluate as evaluate_stage

    p = params_of(params, set_)
    if self_test:
        measured, _ = validity.measure_cached(p.eval, pick_device(p.base.device))
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
    from loraops.judge import score as scorer

    out = user_path(out.parent) / out.name
    result = scorer.run(params_of(params, set_), user_path(pairs), out)
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False, indent=2))
        return
    typer.echo(f"scored {result['n']} pairs ({result['degenerate']} degenerate) → {out}")
    for metric, value in result["metrics"].items():
        typer.echo(f"  {metric:<14}{value:.4f}")
