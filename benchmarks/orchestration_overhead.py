"""Orchestration overhead: `loraops run` (Prefect flow + DVC stages + MLflow logging + registration + gate)
against calling the stage functions directly on the same config, and the time of a no-op rerun.

Runs in a throw-away git worktree of HEAD, so the checkout is untouched.

    python benchmarks/orchestration_overhead.py            # ~3 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CONFIG = ["train.max_steps=60", "train.eval_steps=30", "eval.max_samples=60"]


def _timed_cli(cwd: Path, *args: str) -> float:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "loraops.cli", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(cwd / "src")})
    if out.returncode != 0:
        sys.exit(f"loraops {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    from loraops import data, evaluate, train
    from loraops.config import load_params
    from loraops.pipeline import isolated_workspace

    params = load_params(ROOT / "params.yaml", CONFIG)
    with isolated_workspace(ROOT, f"bench-{os.getpid()}", params.data.path) as ws:
        flow_first = _timed_cli(ws, "run", *[arg for kv in CONFIG for arg in ("--set", kv)])
        flow_noop = _timed_cli(ws, "run")
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "data/raw").mkdir(parents=True)
            (root / params.data.path).write_bytes((ws / params.data.path).read_bytes())
            start = time.perf_counter()
            data.run(params, root)
            train.run(params, root)
            evaluate.run(params, root)
            direct = time.perf_counter() - start
    print(f"config: {' '.join(CONFIG)}")
    print(f"{'stages called directly (in-process)':<44}{direct:>8.1f} s")
    print(f"{'loraops run (Prefect + DVC + MLflow + gate)':<44}{flow_first:>8.1f} s")
    print(f"{'loraops run again, nothing changed':<44}{flow_noop:>8.1f} s")
    print(f"orchestration_overhead_ratio: {flow_first / direct:.2f}")
    print(f"noop_rerun_seconds: {flow_noop:.1f}")


if __name__ == "__main__":
    main()
