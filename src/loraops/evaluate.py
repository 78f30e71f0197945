"""Stage `evaluate`: answer the test questions with the base model and the tuned adapter, then score.

One model is loaded: base answers come from the same PeftModel with its adapter disabled, so base and
tuned share weights, tokenizer, prompt template and decoding settings. Generation is batched with left
padding over length-sorted prompts, greedy by default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from loraops.config import EvalSection, Params
from loraops.data import load_split
from loraops.metrics import MetricPack, check
from loraops.model import ModelError, base_location, load_base, load_tokenizer
from loraops.report import flat_metrics, markdown, plots, summarize
from loraops.train import ADAPTER_DIR
from loraops.utils import atomic_write, pick_device, write_json

EVAL_METRICS = Path("metrics/eval.json")
REPORT = Path("reports/eval.md")
TABLE = Path("reports/eval_questions.csv")
PLOTS_DIR = Path("reports/plots")


def clean_answer(text: str, stop_strings: list[str]) -> str:
    """Cut a generated continuation at the first stop string and strip it."""
    for stop in stop_strings:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


def generate(model: Any, tokenizer: Any, prompts: list[str], cfg: EvalSection, device: str,
             progress: bool = True) -> list[str]:
    """Greedy answers for ``prompts``, batched over length-sorted, left-padded prompts; input order kept.

    Each distinct prompt is generated once (a wide-format question has several reference answers).
    """
    import torch
    from tqdm.auto import tqdm

    unique = sorted(set(prompts), key=lambda p: (len(p), p))
    answers: dict[str, str] = {}
    bos = tokenizer.bos_token or ""
    model.eval()
    batches = [unique[i: i + cfg.batch_size] for i in range(0, len(unique), cfg.batch_size)]
    for batch in tqdm(batches, desc="generate", disable=not progress, leave=False):
        texts = [bos + prompt for prompt in batch]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        for prompt, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
            answers[prompt] = clean_answer(text, cfg.stop_strings)
    return [answers[prompt] for prompt in prompts]


def load_tuned(params: Params, adapter_dir: Path, device: str, root: Path = Path(".")) -> tuple[Any, Any]:
    """Base model with the adapter attached, and the tokenizer saved with the adapter.

    Raises:
        ModelError: when the adapter has not been trained.
    """
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").exists():
        raise ModelError(f"{adapter_dir}: no adapter; run `loraops train` (or `dvc repro train`) first")
    dtype = "bf16" if device == "cuda" and params.train.precision in ("auto", "bf16") else "fp32"
    base = load_base(base_location(params.model, root), params.model, device, dtype=dtype)
    tokenizer = load_tokenizer(str(adapter_dir), params.model)
    return PeftModel.from_pretrained(base, str(adapter_dir)).to(device), tokenizer


def score_table(rows: list[dict], base_answers: list[str], tuned_answers: list[str], pack: MetricPack) -> pd.DataFrame:
    """The per-question table: question, reference, both answers and every score."""
    references = [r["answer"] for r in rows]
    table = pd.DataFrame({
        "id": [r["id"] for r in rows], "group": [r["group"] for r in rows], "category": [r["category"] for r in rows],
        "question": [r["question"] for r in rows], "reference": references,
        "base_answer": base_answers, "tuned_answer": tuned_answers,
    })
    for prefix, answers in (("base", base_answers), ("tuned", tuned_answers)):
        for column, values in pack.score(answers, references).items():
            table[f"{prefix}_{column}"] = values
    return table


def select_rows(rows: list[dict], max_samples: int | None) -> list[dict]:
    """The first ``max_samples`` test rows in id order (deterministic)."""
    rows = sorted(rows, key=lambda r: r["id"])
    return rows[:max_samples] if max_samples else rows


def run(params: Params, root: Path = Path("."), self_test: bool | None = None) -> dict[str, Any]:
    """Generate, score and write ``metrics/eval.json``, ``reports/eval.md``, the table and the plots."""
    device = pick_device(params.base.device)
    pack = MetricPack(params.eval, device=device)
    if params.eval.self_test if self_test is None else self_test:
        check(pack)
    rows = select_rows(load_split("test", root), params.eval.max_samples)
    model, tokenizer = load_tuned(params, root / ADAPTER_DIR, device, root)
    prompts = [r["prompt"] for r in rows]
    tuned = generate(model, tokenizer, prompts, params.eval, device)
    with model.disable_adapter():
        base = generate(model, tokenizer, prompts, params.eval, device)
    table = score_table(rows, base, tuned, pack)
    for column in params.data.attribute_columns:
        table[column] = [r.get("attributes", {}).get(column, "") for r in rows]
    slice_columns = ["category"] + [c for c in params.data.attribute_columns if c in table]
    summary = summarize(table, pack.columns, slice_columns, params.eval.bootstrap_samples, params.base.seed,
                        params.eval.min_slice_size)
    primary = params.registry.gate.metric if params.registry.gate.metric in pack.columns else pack.columns[0]
    (root / TABLE).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(root / TABLE, table.to_csv(index=False))
    plots(summary, table, primary, root / PLOTS_DIR)
    atomic_write(root / REPORT, markdown(summary, table, primary))
    write_json(root / EVAL_METRICS, summary)
    return summary


def read_table(root: Path = Path(".")) -> pd.DataFrame:
    """The per-question table of the last evaluate."""
    return pd.read_csv(root / TABLE, keep_default_na=False)


__all__ = ["run", "generate", "score_table", "flat_metrics", "read_table", "clean_answer"]
