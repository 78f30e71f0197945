"""Training throughput: plain `transformers.Trainer` + peft with the padding collator vs loraops' path.

Both arms use the same base model, data, LoRA config, seed and sequences per optimiser step, and are
timed after warm-up steps, each in its own process (so peak memory is its own). Per arm: non-pad
tokens/s, samples/s, step time p50/p95, peak memory (RSS on CPU, ``max_memory_allocated`` on CUDA),
pad fraction, the mean loss over the timed steps, and on CUDA the model-FLOPs utilisation:

    MFU = (4·N·T + 4·L·d·Σ s_i²) / (t · peak_flops)

N = parameters of the base (frozen weights still cost the forward and the input-gradient backward,
2·N + 2·N FLOPs a token; LoRA's own weight gradients are negligible), T = non-pad tokens, L = layers,
d = hidden size, s_i = length of sequence i (attention scores and values, forward and backward), t = the
timed seconds, peak_flops = the GPU's dense bf16 peak (``--peak-tflops``, default 989 for an H100 SXM).

The last line is ``speedup_vs_hf_trainer: X.XX`` (loraops tokens/s ÷ baseline tokens/s, same run).

    python benchmarks/train_throughput.py --quick          # under 3 minutes on 2 CPU cores
    python benchmarks/train_throughput.py --split data/prepared/train.jsonl --steps 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few steps: a smoke figure in under 3 minutes on CPU")
    p.add_argument("--split", type=Path, help="a prepared split (JSONL with prompt, answer); default: the sample data")
    p.add_argument("--steps", type=int, default=60, help="timed optimiser steps per arm")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimiser step (both arms)")
    p.add_argument("--base", default=None, help="base model dir or hub id (default: the tiny base built here)")
    p.add_argument("--layers", type=int, default=4, help="tiny-base layers (compute-bound on CPU at the defaults)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--batching", default="length_grouped", choices=["auto", "packed", "length_grouped", "padded"],
                   help="loraops arm's train.batching (default length_grouped: the fastest on CPU; see docs/decisions.md)")
    p.add_argument("--arm", choices=["baseline", "loraops"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.warmup = min(a.steps, 30), 3
    return a


def _setup(a: argparse.Namespace, work: Path) -> tuple[str, list[dict]]:
    """Prepared rows and a base model dir (built once, shared by both arms)."""
    from loraops import data
    from loraops.config import TinyBase, load_params
    from loraops.model import build_tiny_base

    if a.split:
        rows = [json.loads(line) for line in a.split.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        params = load_params(ROOT / "params.yaml", [f"data.path={ROOT / 'data/raw/interior_qa.csv'}"])
        data.run(params, work)
        rows = data.load_split("train", work)
    base = a.base
    if base is None:
        base = str(work / "base")
        shape = TinyBase(layers=a.layers, hidden=a.hidden, heads=max(2, a.hidden // 64), intermediate=2 * a.hidden)
        build_tiny_base([r["prompt"] + r["answer"] for r in rows], shape, 0, Path(base))
    return base, rows


def _run_arm(a: argparse.Namespace, base: str, rows: list[dict]) -> dict:
    import numpy as np
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments, set_seed

    from loraops.config import LoraSection, ModelSection, TrainSection
    from loraops.model import load_base, load_tokenizer
    from loraops.train import collator, lora_config, resolve_batching, tokenize_pair, training_args
    from loraops.utils import pick_device

    device = pick_device("auto")
    set_seed(0)
    mcfg = ModelSection(base=base)
    tok = load_tokenizer(base, mcfg)
    model = load_base(base, mcfg, device, dtype="bf16" if device == "cuda" else "fp32")
    model = get_peft_model(model, lora_config(LoraSection(r=16, alpha=32, dropout=0.0)))
    items = [tokenize_pair(tok, r["prompt"], r["answer"], 256) for r in rows]
    total = a.steps + a.warmup
    tcfg = TrainSection(max_steps=total, batch_size=a.batch_size, learning_rate=2e-4, warmup_ratio=0.0,
                        eval_steps=10 ** 6, logging_steps=1, batching=a.batching)
    batching = resolve_batching(tcfg.batching, device) if a.arm == "loraops" else "padded"
    out = Path(a.workdir) / f"ckpt-{a.arm}"
    if a.arm == "loraops":
        args = training_args(tcfg, 0, device, out, has_validation=False, batching=batching)
    else:  # what a plain Trainer + peft script does: defaults, padding collator
        args = TrainingArguments(output_dir=str(out), max_steps=total, per_device_train_batch_size=a.batch_size,
                                 learning_rate=2e-4, logging_steps=1, seed=0, data_seed=0, report_to="none",
                                 use_cpu=device == "cpu", bf16=device == "cuda", save_strategy="no",
                                 remove_unused_columns=False, disable_tqdm=True)
    args.save_strategy, args.disable_tqdm = "no", True
    steps: list[float] = []
    counts = {"tokens": 0, "padded": 0, "samples": 0, "attn": 0}

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
            steps.append(time.perf_counter() - self.t)

    collate = collator(tok, batching == "packed") if a.arm == "loraops" else DataCollatorForSeq2Seq(
        tok, padding=True, label_pad_token_id=-100, return_tensors="pt")

    def counting(batch):
        out_batch = collate(batch)
        if len(steps) >= a.warmup:
            lengths = [len(b["input_ids"]) for b in batch]
            counts["tokens"] += sum(lengths)
            counts["padded"] += out_batch["input_ids"].numel()
            counts["samples"] += len(batch)
            counts["attn"] += sum(n * n for n in lengths)
        return out_batch

    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(items), data_collator=counting,
                      callbacks=[Timer()])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e][a.warmup:]
    timed = steps[a.warmup:]
    seconds = float(sum(timed))
    n_params = sum(p.numel() for p in model.parameters())
    cfg = model.config
    flops = 4 * n_params * counts["tokens"] + 4 * cfg.num_hidden_layers * cfg.hidden_size * counts["attn"]
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {
        "arm": a.arm, "device": device, "batching": batching, "steps": len(timed), "tokens_per_s": counts["tokens"] / seconds,
        "samples_per_s": counts["samples"] / seconds, "step_p50_ms": 1000 * float(np.percentile(timed, 50)),
        "step_p95_ms": 1000 * float(np.percentile(timed, 95)), "peak_mem_mb": peak / 2 ** 20,
        "pad_fraction": 1 - counts["tokens"] / max(counts["padded"], 1), "mean_loss": float(np.mean(losses)),
        "mfu": flops / seconds / (a.peak_tflops * 1e12) if device == "cuda" else None,
    }


def main(argv: list[str] | None = None) -> None:
    a = _args(argv)
    if a.arm:  # child: one arm, JSON on the last line
        base, rows = _setup(a, a.workdir) if a.base is None else (a.base, _setup(a, a.workdir)[1])
        print(json.dumps(_run_arm(a, base, rows)))
        return
    with tempfile.TemporaryDirectory(prefix="loraops-bench-") as work:
        base, _ = _setup(a, Path(work))
        results = []
        for arm in ("baseline", "loraops"):
            cmd = [sys.executable, __file__, "--arm", arm, "--workdir", work, "--base", base, "--steps", str(a.steps),
                   "--warmup", str(a.warmup), "--batch-size", str(a.batch_size), "--peak-tflops", str(a.peak_tflops),
                   "--batching", a.batching]
            if a.split:
                cmd += ["--split", str(a.split)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            if out.returncode != 0:
                sys.exit(f"{arm} arm failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base_r, ours = results
    rows = [("non-pad tokens/s", "tokens_per_s", "{:.0f}"), ("samples/s", "samples_per_s", "{:.1f}"),
            ("step p50 ms", "step_p50_ms", "{:.1f}"), ("step p95 ms", "step_p95_ms", "{:.1f}"),
            ("peak memory MB", "peak_mem_mb", "{:.0f}"), ("pad fraction", "pad_fraction", "{:.3f}"),
            ("mean loss (timed steps)", "mean_loss", "{:.4f}"), ("MFU", "mfu", "{}")]
    print(f"device {ours['device']}; {ours['steps']} timed steps after {a.warmup} warm-up; batch {a.batch_size} sequences")
    print(f"baseline: Trainer defaults + padding collator; loraops: train.batching={ours['batching']}")
    print(f"{'':<26}{'hf_trainer':>14}{'loraops':>14}{'ratio':>9}")
    for label, key, fmt in rows:
        b, o = base_r[key], ours[key]
        ratio = f"{o / b:.2f}" if isinstance(b, float) and b else ""
        print(f"{label:<26}{fmt.format(b) if b is not None else '-':>14}{fmt.format(o) if o is not None else '-':>14}{ratio:>9}")
    print(f"speedup_vs_hf_trainer: {ours['tokens_per_s'] / base_r['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
