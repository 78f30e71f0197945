"""Sweep wall time: `loraops sweep` with 3 trials against the same 3 settings as 3 sequential `loraops run`s.

Both arms start from a throw-away git worktree of HEAD with its own empty DVC cache, so neither reuses a stage an
earlier run computed. The sweep runs prepare/augment/index once (the trials' worktrees share the sweep's DVC cache),
trains each trial without evaluating it on the test split, and evaluates, registers and gates only the best; the
sequential arm runs the whole loop (evaluation, registration and gate included) three times, with the settings the
sweep's trials drew. Pruning is off so both arms train the same steps; a third line shows the sweep with pruning.

    python benchmarks/sweep.py            # ~10 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CONFIG = ["train.max_steps=60", "train.eval_steps=20", "eval.max_samples=60"]
SMOKE = ["model.tiny.layers=1", "model.tiny.vocab_size=1000", "model.max_length=96", "train.max_steps=10",
         "train.eval_steps=5", "eval.max_samples=10", "eval.self_test=false", "eval.metrics=[morph_f1]",
         "registry.gate.min_test_size=5"]
"""--smoke: checks that the benchmark runs (the test suite runs it so it cannot rot); its figures mean nothing."""
OUTCOMES = (0, 3, 4)  # promoted/registered/unchanged, refused, worse than base: the run completed (README "Exit codes")


def _cli(cwd: Path, *args: str) -> tuple[float, str]:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "loraops.cli", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(cwd / "src")}, check=False)
    if out.returncode not in OUTCOMES:
        sys.exit(f"loraops {' '.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    return time.perf_counter() - start, out.stdout


def _fresh(name: str):
    from loraops.core.config import load_params
    from loraops.orchestration.workspace import isolated_workspace

    params = load_params(ROOT / "params.yaml")
    return isolated_workspace(ROOT, f"bench-sweep-{name}-{os.getpid()}", [params.data.path, params.rag.docs_path])


def _own_cache(ws: Path) -> None:
    dvc = str(Path(sys.executable).parent / "dvc")
    subprocess.run([dvc, "cache", "dir", "--local", str(ws / ".bench-dvc-cache")], cwd=ws, check=True)


def _trials(ws: Path) -> list[dict]:
    """The sweep's trials, from its Optuna journal."""
    import optuna

    from loraops.core.paths import SWEEPS_DIR
    from loraops.modeling import trial
    from loraops.orchestration import sweep

    journal = next((ws / SWEEPS_DIR).glob("*.journal"))
    study = optuna.load_study(study_name=journal.stem, storage=trial.storage(journal))
    return sweep.summary(study, {})["trials"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="1 trial of a 10-step config, no pruning arm: checks the "
                                                             "benchmark runs")
    smoke = parser.parse_args(argv).smoke
    sets = [arg for kv in (SMOKE if smoke else CONFIG) for arg in ("--set", kv)]
    trials_n = 1 if smoke else 3
    rows = []
    with _fresh("sweep") as ws:
        _own_cache(ws)
        swept, out = _cli(ws, "sweep", *sets, "--set", f"sweep.trials={trials_n}", "--set", "sweep.pruning=false")
        print(out[-1500:], flush=True)
        trials = _trials(ws)
    rows.append((f"sweep, {trials_n} trial(s) (best evaluated)", swept))
    with _fresh("runs") as ws:
        _own_cache(ws)
        sequential = 0.0
        for trial in trials:
            values = [arg for k, v in trial["params"].items() for arg in ("--set", f"{k}={json.dumps(v)}")]
            seconds, _ = _cli(ws, "run", *sets, *values)
            sequential += seconds
    rows.append((f"{trials_n} sequential `loraops run`", sequential))
    if not smoke:
        with _fresh("pruned") as ws:
            _own_cache(ws)
            pruned, _ = _cli(ws, "sweep", *sets, "--set", "sweep.trials=3", "--set", "sweep.pruning=true")
            states = [t["state"].lower() for t in _trials(ws)]
        rows.append((f"sweep, 3 trials, pruning ({', '.join(states)})", pruned))
    _table(rows, sequential, trials)


def _table(rows: list[tuple[str, float]], sequential: float, trials: list[dict]) -> None:
    print(f"{'arm':<58}{'wall s':>9}{'vs runs':>9}")
    for name, seconds in rows:
        print(f"{name:<58}{seconds:>9.1f}{seconds / sequential:>8.2f}x")
    print("settings: " + "; ".join(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                             for k, v in t["params"].items()) for t in trials))


if __name__ == "__main__":
    main()
