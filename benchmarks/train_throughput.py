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

The loraops arm is the train stage's own path (``train.prepare_model`` + ``train.make_trainer``); the
baseline is what a plain script does: ``Trainer`` defaults and the padding collator. Arms run ``--repeats``
times, alternating, so a noisy machine slows both alike; figures pool the repeats. Losses are comparable
because both arms see the same batches in the same order (same seed, random sampler).

The last line is ``speedup_vs_hf_trainer: X.XX`` (loraops tokens/s ÷ baseline tokens/s, same run).

    python benchmarks/train_throughput.py --quick          # under 3 minutes on 2 CPU cores
    python benchmarks/train_throughput.py --split data/prepared/train.jsonl --steps 200
    python benchmarks/train_throughput.py --arch qwen2.5-0.5b --batch-size 64 [--quantization 4bit]   # GPU, offline
    python benchmarks/train_throughput.py --base Qwen/Qwen2.5-0.5B --random-init   # a hub config (needs the network)
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import architectures
from architectures import ARCHITECTURES


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="30 timed steps: a figure in under 3 minutes on 2 CPU cores")
    p.add_argument("--smoke", action="store_true", help="2 timed steps of a 1-layer base, once: checks the benchmark "
                                                        "runs (the test suite), its figures mean nothing")
    p.add_argument("--split", type=Path, help="a prepared split (JSONL with prompt, answer); default: the sample data")
    p.add_argument("--steps", type=int, default=60, help="timed optimiser steps per arm and repeat")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2, help="runs of each arm, alternating")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimiser step (both arms)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--base", default=None, help="base model dir or hub id (default: the tiny base built here)")
    p.add_argument("--random-init", action="store_true", help="with --base: its config, randomly initialised (no weights needed)")
    p.add_argument("--arch", choices=sorted(ARCHITECTURES),
                   help="a published Llama/Qwen shape, randomly initialised here (no download; see architectures.py)")
    p.add_argument("--layers", type=int, default=4, help="tiny-base layers (compute-bound on CPU at the defaults)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--quantization", default="none", choices=["none", "4bit"], help="4bit: QLoRA in both arms (CUDA)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the GPU's dense bf16 peak, for MFU")
    p.add_argument("--batching", default="auto", choices=["auto", "packed", "length_grouped", "padded"],
                   help="the loraops arm's train.batching (default: what the train stage uses)")
    p.add_argument("--arm", choices=["baseline", "loraops"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.steps, a.warmup = min(a.steps, 30), 3
    if a.smoke:
        a.steps, a.warmup, a.repeats, a.layers, a.hidden, a.batch_size = 2, 1, 1, 1, 64, 4
    if a.arch and a.base:
        p.error("--arch builds its own base; give --arch or --base, not both")
    return a


def _setup(a: argparse.Namespace, work: Path) -> tuple[str, list[dict]]:
    """Prepared rows and a base model dir (built once, shared by both arms)."""
    from loraops.core.config import TinyBase, load_params
    from loraops.core.readers import load_split
    from loraops.modeling.model import build_tiny_base
    from loraops.stages import prepare

    if a.split:
        rows = _read_split(a.split)
    else:
        params = load_params(ROOT / "params.yaml", [f"data.path={ROOT / 'data/raw/interior_qa.csv'}"])
        prepare.run(params, work)
        rows = load_split("train", work)
    base, texts = a.base, [r["prompt"] + r["answer"] for r in rows]
    if a.arch:
        from loraops.core.utils import pick_device
        from loraops.modeling.model import train_tokenizer

        train_tokenizer(texts, TinyBase().vocab_size).save_pretrained(work / "tokenizer")
        base = architectures.build(a.arch, work / "tokenizer", work / a.arch, pick_device("auto"))
    elif base is None:
        base = str(work / "base")
        shape = TinyBase(layers=a.layers, hidden=a.hidden, heads=max(2, a.hidden // 64), intermediate=2 * a.hidden)
        build_tiny_base(texts, shape, 0, Path(base))
    elif a.random_init:
        base = _random_init(base, work / "random-base")
    return base, rows


def _read_split(path: Path) -> list[dict]:
    """Rows of a prepared split; exits with the file and line when it is missing or a row is malformed."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        sys.exit(f"--split {path}: cannot read: {exc}")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            sys.exit(f"--split {path}:{number}: not JSON: {exc.msg}")
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "answer")):
            sys.exit(f"--split {path}:{number}: a row needs string fields 'prompt' and 'answer'")
        rows.append(row)
    if not rows:
        sys.exit(f"--split {path}: no rows")
    return rows


def _random_init(location: str, out: Path) -> str:
    """``location``'s architecture (a hub id or directory), randomly initialised, with its tokenizer."""
    from transformers import AutoConfig, AutoTokenizer

    from loraops.core.utils import pick_device

    try:
        tokenizer, config = AutoTokenizer.from_pretrained(location), AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as exc:
        sys.exit(f"--base {location} --random-init: cannot load its config and tokenizer: {exc}")
    return architectures.save_random(config, tokenizer, out, pick_device("auto"))


def _trainer(a: argparse.Namespace, base: str, rows: list[dict], device: str) -> tuple[object, object, str]:
    """(trainer, peft model, batching) for the arm: loraops' train stage path, or a plain Trainer script."""
    from datasets import Dataset
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments, set_seed

    from loraops.core.config import load_params
    from loraops.modeling.model import base_config, load_base, load_tokenizer
    from loraops.stages.train import lora_config, make_trainer, prepare_model, resolve_batching, tokenize_pair

    total = a.steps + a.warmup
    params = load_params(ROOT / "params.yaml", [
        f"model.base={base}", "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "lora.modules_to_save=[]",
        f"train.max_steps={total}", f"train.batch_size={a.batch_size}", "train.learning_rate=2e-4",
        "train.warmup_ratio=0.0", "train.scheduler=linear", "train.logging_steps=1", f"train.eval_steps={total}",
        f"train.batching={a.batching}", f"train.quantization={a.quantization}"])
    set_seed(0)
    tok = load_tokenizer(base, params.model)
    items = Dataset.from_list([tokenize_pair(tok, r["prompt"], r["answer"], a.max_length) for r in rows])
    out = Path(a.workdir) / f"ckpt-{a.arm}"
    if a.arm == "loraops":
        batching = resolve_batching(params.train.batching, base_config(base, params.model), device, a.max_length)
        model = prepare_model(base, params, device, batching)
        return make_trainer(model, tok, params.train, 0, device, out, items, batching=batching), model, batching
    model = load_base(base, params.model, device, dtype="bf16" if device == "cuda" else "fp32", quantization=a.quantization)
    if a.quantization == "4bit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, lora_config(params.lora))
    args = TrainingArguments(output_dir=str(out), max_steps=total, per_device_train_batch_size=a.batch_size,
                             learning_rate=2e-4, logging_steps=1, seed=0, data_seed=0, report_to="none",
                             use_cpu=device == "cpu", bf16=device == "cuda", save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True)
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100, return_tensors="pt")
    return Trainer(model=model, args=args, train_dataset=items, data_collator=collate), model, "padded"


def _run_arm(a: argparse.Namespace, base: str, rows: list[dict]) -> dict:
    """One arm, once: per-step seconds and losses, token counts and peak memory (timed steps only)."""
    import torch
    from transformers import TrainerCallback

    from loraops.core.utils import pick_device

    device = pick_device("auto")
    trainer, model, batching = _trainer(a, base, rows, device)
    trainer.args.save_strategy, trainer.args.disable_tqdm = "no", True
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

    collate = trainer.data_collator

    def counting(batch):
        out_batch = collate(batch)
        if len(steps) >= a.warmup:
            lengths = [len(b["input_ids"]) for b in batch]
            counts["tokens"] += sum(lengths)
            counts["padded"] += out_batch["input_ids"].numel()
            counts["samples"] += len(batch)
            counts["attn"] += sum(n * n for n in lengths)
        return out_batch

    trainer.data_collator = counting
    trainer.add_callback(Timer())
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    cfg = model.config
    return {
        "arm": a.arm, "device": device, "batching": batching, "step_seconds": steps[a.warmup:], **counts,
        "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e][a.warmup:],
        # peft counts a 4-bit weight as the parameters it stands for, not its packed bytes (MFU under QLoRA)
        "params": model.get_nb_trainable_parameters()[1], "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
        "hardware": torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores",
        "peak_mem_mb": (torch.cuda.max_memory_allocated() if device == "cuda"
                        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20,
    }


def _pool(runs: list[dict], peak_tflops: float) -> dict:
    """One arm's figures over its repeats."""
    import numpy as np

    times = [t for r in runs for t in r["step_seconds"]]
    seconds, first = float(sum(times)), runs[0]
    tokens, attn = sum(r["tokens"] for r in runs), sum(r["attn"] for r in runs)
    flops = 4 * first["params"] * tokens + 4 * first["layers"] * first["hidden"] * attn
    return {
        "device": first["device"], "batching": first["batching"], "steps": len(first["step_seconds"]),
        "hardware": first["hardware"], "params": first["params"],
        "tokens_per_s": tokens / seconds, "samples_per_s": sum(r["samples"] for r in runs) / seconds,
        "step_p50_ms": 1000 * float(np.percentile(times, 50)), "step_p95_ms": 1000 * float(np.percentile(times, 95)),
        "peak_mem_mb": max(r["peak_mem_mb"] for r in runs), "pad_fraction": 1 - tokens / max(sum(r["padded"] for r in runs), 1),
        "mean_loss": float(np.mean(first["losses"])),
        "mfu": flops / seconds / (peak_tflops * 1e12) if first["device"] == "cuda" else None,
    }


def _child(a: argparse.Namespace, arm: str, work: str, base: str) -> dict:
    cmd = [sys.executable, __file__, "--arm", arm, "--workdir", work, "--base", base, "--steps", str(a.steps),
           "--warmup", str(a.warmup), "--batch-size", str(a.batch_size), "--max-length", str(a.max_length),
           "--batching", a.batching, "--quantization", a.quantization]
    if a.split:
        cmd += ["--split", str(a.split)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        sys.exit(f"{arm} arm failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    a = _args(argv)
    if a.arm:  # child: one arm, JSON on the last line
        base, rows = _setup(a, a.workdir) if a.base is None else (a.base, _setup(a, a.workdir)[1])
        print(json.dumps(_run_arm(a, base, rows)))
        return
    runs: dict[str, list[dict]] = {"baseline": [], "loraops": []}
    with tempfile.TemporaryDirectory(prefix="loraops-bench-") as work:
        base, _ = _setup(a, Path(work))
        for repeat in range(a.repeats):
            for arm in ("baseline", "loraops") if repeat % 2 == 0 else ("loraops", "baseline"):
                runs[arm].append(_child(a, arm, work, base))
    base_r, ours = _pool(runs["baseline"], a.peak_tflops), _pool(runs["loraops"], a.peak_tflops)
    rows = [("non-pad tokens/s", "tokens_per_s", "{:.0f}"), ("samples/s", "samples_per_s", "{:.1f}"),
            ("step p50 ms", "step_p50_ms", "{:.1f}"), ("step p95 ms", "step_p95_ms", "{:.1f}"),
            ("peak memory MB", "peak_mem_mb", "{:.0f}"), ("pad fraction", "pad_fraction", "{:.3f}"),
            ("mean loss (timed steps)", "mean_loss", "{:.4f}"), ("MFU", "mfu", "{:.3f}")]
    model = a.arch or a.base or f"tiny Llama {a.layers}x{a.hidden}"
    print(f"{ours['hardware']}; {model} ({ours['params'] / 1e6:.0f}M parameters), quantization {a.quantization}")
    print(f"device {ours['device']}; {ours['steps']} timed steps after {a.warmup} warm-up, {a.repeats} alternating "
          f"repeats per arm; batch {a.batch_size} sequences")
    print(f"baseline: Trainer defaults + padding collator; loraops: train.batching={ours['batching']}")
    print(f"{'':<26}{'hf_trainer':>14}{'loraops':>14}{'ratio':>9}")
    for label, key, fmt in rows:
        b, o = base_r[key], ours[key]
        ratio = f"{o / b:.2f}" if isinstance(b, float) and b else ""
        print(f"{label:<26}{fmt.format(b) if b is not None else '-':>14}{fmt.format(o) if o is not None else '-':>14}{ratio:>9}")
    diff = max(abs(x - y) for x, y in zip(runs["baseline"][0]["losses"], runs["loraops"][0]["losses"]))
    print(f"largest per-step loss difference between the arms: {diff:.2e}")
    print(f"removing all padding alone would give {1 / (1 - base_r['pad_fraction']):.2f}x on this data")
    each = [(o["tokens"] / sum(o["step_seconds"])) / (b["tokens"] / sum(b["step_seconds"]))
            for b, o in zip(runs["baseline"], runs["loraops"])]
    print(f"speedup of each repeat (the spread is this machine's noise): {', '.join(f'{x:.2f}' for x in each)}")
    print(f"speedup_vs_hf_trainer: {ours['tokens_per_s'] / base_r['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
