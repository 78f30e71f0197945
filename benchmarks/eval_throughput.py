"""Evaluation throughput: generation one question at a time vs batched (left-padded, length-sorted), and
scoring with one reused BERTScore/cosine scorer vs a fresh scorer per call.

Both generation arms answer the same distinct test questions greedily with the same model; the script
checks that they give the same answers. The last line is ``generation_speedup_batched: X.XX``.

    python benchmarks/eval_throughput.py                   # sample data, tiny base + a quickly trained adapter
    python benchmarks/eval_throughput.py --questions 64 --batch-size 32
    python benchmarks/eval_throughput.py --arch qwen2.5-0.5b --questions 256 --batch-size 64   # GPU, offline

With ``--arch`` the model is a published shape with random weights and an untrained adapter (see
``architectures.py``): generation speed depends on the shape, not the weights. Its answers mean nothing
and are not compared; the scoring arms score pairs of reference answers instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import architectures


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _random_base(name: str, root: Path, device: str) -> str:
    """``name``'s shape with random weights and a tokenizer learned from the prepared splits."""
    from loraops.core.config import TinyBase
    from loraops.core.readers import load_split
    from loraops.modeling.model import train_tokenizer

    texts = [r["prompt"] + r["answer"] for r in load_split("train", root)]
    train_tokenizer(texts, TinyBase().vocab_size).save_pretrained(root / "tokenizer")
    return architectures.build(name, root / "tokenizer", root / name, device)


def _untrained_adapter(params, adapter_dir: Path, device: str) -> None:
    """A freshly initialised LoRA adapter (and the base's tokenizer) where evaluate expects a trained one."""
    from loraops.modeling.model import load_tokenizer
    from loraops.stages.train import prepare_model

    prepare_model(params.model.base, params, device, "padded").save_pretrained(adapter_dir)
    load_tokenizer(params.model.base, params.model).save_pretrained(adapter_dir)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--scoring-calls", type=int, default=4, help="scoring calls (e.g. base, tuned, gate, self-test); 0: generation only")
    p.add_argument("--arch", choices=sorted(architectures.ARCHITECTURES),
                   help="a published Llama/Qwen shape with random weights (default: the tiny base, trained briefly)")
    a = p.parse_args(argv)

    import torch

    from loraops.core.config import load_params
    from loraops.core.paths import ADAPTER_DIR
    from loraops.core.readers import load_split
    from loraops.core.utils import pick_device
    from loraops.judge.metrics import MetricPack
    from loraops.modeling import generation
    from loraops.stages import evaluate, prepare, train

    device = pick_device("auto")
    with tempfile.TemporaryDirectory(prefix="loraops-evalbench-") as tmp:
        root = Path(tmp)
        overrides = [f"data.path={ROOT / 'data/raw/interior_qa.csv'}", "train.max_steps=60",
                     f"eval.max_new_tokens={a.max_new_tokens}", f"eval.batch_size={a.batch_size}"]
        params = load_params(ROOT / "params.yaml", overrides)
        prepare.run(params, root)
        if a.arch:
            params = load_params(ROOT / "params.yaml", overrides + [f"model.base={_random_base(a.arch, root, device)}",
                                                                    "lora.modules_to_save=[]"])
            _untrained_adapter(params, root / ADAPTER_DIR, device)
        else:
            train.run(params, root)
        model, tok = generation.load_tuned(params, root / ADAPTER_DIR, device, root)
        rows = load_split("test", root) + load_split("validation", root)
        prompts = sorted({r["prompt"] for r in rows})[: a.questions]
        one = params.eval.model_copy(update={"batch_size": 1})
        generation.generate(model, tok, prompts[:2], params.eval, device, progress=False)  # warm-up
        single, t_single = _timed(evaluate.generate, model, tok, prompts, one, device, progress=False)
        batched, t_batched = _timed(evaluate.generate, model, tok, prompts, params.eval, device, progress=False)
        same = sum(x == y for x, y in zip(single, batched))

        refs = [r["answer"] for r in rows][: len(prompts)]
        # random weights generate ids the data's tokenizer cannot decode: score other references instead
        answers = refs[1:] + refs[:1] if a.arch else batched
        cfg = params.eval.model_copy(update={"metrics": ["bertscore", "cosine"], "self_test": False})
        t_reused = t_fresh = 0.0
        if a.scoring_calls:
            reused = MetricPack(cfg, device=device)
            _, t_reused = _timed(lambda: [reused.score(answers, refs) for _ in range(a.scoring_calls)])
            _, t_fresh = _timed(lambda: [MetricPack(cfg, device=device).score(answers, refs) for _ in range(a.scoring_calls)])
    pairs = len(refs) * a.scoring_calls
    hardware = f"{torch.cuda.get_device_name()}, bf16" if device == "cuda" else f"{os.cpu_count()} CPU cores, fp32"
    print(f"{len(prompts)} distinct questions, max_new_tokens {a.max_new_tokens}, {a.arch or 'tiny base'}, {hardware}")
    print(f"{'':<34}{'baseline':>12}{'loraops':>12}{'ratio':>8}")
    print(f"{'generation answers/s (1 vs batch)':<34}{len(prompts) / t_single:>12.2f}{len(prompts) / t_batched:>12.2f}"
          f"{t_single / t_batched:>8.2f}")
    if pairs:
        print(f"{'scoring pairs/s (fresh vs reused)':<34}{pairs / t_fresh:>12.1f}{pairs / t_reused:>12.1f}"
              f"{t_fresh / t_reused:>8.2f}")
    else:
        print("scoring: not measured (--scoring-calls 0)")
    if a.arch:
        print("answers: random weights, not compared (scoring used pairs of reference answers)")
    else:
        print(f"identical answers batched vs one at a time: {same}/{len(prompts)}")
    print(f"generation_speedup_batched: {t_single / t_batched:.2f}")


if __name__ == "__main__":
    main()
