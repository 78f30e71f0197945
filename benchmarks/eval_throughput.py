"""Evaluation throughput: generation one question at a time vs batched (left-padded, length-sorted), and
scoring with one reused BERTScore/cosine scorer vs a fresh scorer per call.

Both generation arms answer the same distinct test questions greedily with the same model; the script
checks that they give the same answers. The last line is ``generation_speedup_batched: X.XX``.

    python benchmarks/eval_throughput.py                   # sample data, tiny base + a quickly trained adapter
    python benchmarks/eval_throughput.py --questions 64 --batch-size 32
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=48)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--scoring-calls", type=int, default=4, help="scoring calls (e.g. base, tuned, gate, self-test)")
    a = p.parse_args(argv)

    from loraops import data, evaluate, train
    from loraops.config import load_params
    from loraops.metrics import MetricPack

    with tempfile.TemporaryDirectory(prefix="loraops-evalbench-") as tmp:
        root = Path(tmp)
        params = load_params(ROOT / "params.yaml", [f"data.path={ROOT / 'data/raw/interior_qa.csv'}", "train.max_steps=60",
                                                    f"eval.max_new_tokens={a.max_new_tokens}", f"eval.batch_size={a.batch_size}"])
        data.run(params, root)
        train.run(params, root)
        model, tok = evaluate.load_tuned(params, root / train.ADAPTER_DIR, "cpu", root)
        rows = data.load_split("test", root) + data.load_split("validation", root)
        prompts = sorted({r["prompt"] for r in rows})[: a.questions]
        one = params.eval.model_copy(update={"batch_size": 1})
        evaluate.generate(model, tok, prompts[:2], params.eval, "cpu", progress=False)  # warm-up
        single, t_single = _timed(evaluate.generate, model, tok, prompts, one, "cpu", progress=False)
        batched, t_batched = _timed(evaluate.generate, model, tok, prompts, params.eval, "cpu", progress=False)
        same = sum(x == y for x, y in zip(single, batched))

        refs = [r["answer"] for r in rows][: len(prompts)]
        cfg = params.eval.model_copy(update={"metrics": ["bertscore", "cosine"], "self_test": False})
        reused = MetricPack(cfg)
        _, t_reused = _timed(lambda: [reused.score(batched, refs) for _ in range(a.scoring_calls)])
        _, t_fresh = _timed(lambda: [MetricPack(cfg).score(batched, refs) for _ in range(a.scoring_calls)])
    pairs = len(refs) * a.scoring_calls
    print(f"{len(prompts)} distinct questions, max_new_tokens {a.max_new_tokens}, CPU")
    print(f"{'':<34}{'baseline':>12}{'loraops':>12}{'ratio':>8}")
    print(f"{'generation answers/s (1 vs batch)':<34}{len(prompts) / t_single:>12.2f}{len(prompts) / t_batched:>12.2f}"
          f"{t_single / t_batched:>8.2f}")
    print(f"{'scoring pairs/s (fresh vs reused)':<34}{pairs / t_fresh:>12.1f}{pairs / t_reused:>12.1f}{t_fresh / t_reused:>8.2f}")
    print(f"identical answers batched vs one at a time: {same}/{len(prompts)}")
    print(f"generation_speedup_batched: {t_single / t_batched:.2f}")


if __name__ == "__main__":
    main()
