"""Orchestration overhead: `loraops run` (Prefect flow + DVC stages + MLflow logging + registration + gate)
against calling the stage functions directly on the same config, and the time of a no-op rerun.

Runs in a throw-away git worktree of HEAD with its own empty DVC cache, so the checkout is untouched and
DVC's run cache cannot restore a stage that an earlier run of this benchmark computed: the first
`loraops run` must run every stage (checked), the second none.

    python benchmarks/orchestration_overhead.py            # ~5 minutes on 2 CPU cores (3 pairs)
    python benchmarks/orchestration_overhead.py --repeat 1 # one pair, ~2 minutes

One pair of measurements moves by ±20 % on a shared 2-core host (the same commit printed 1.40 and 1.64 an hour
apart, the direct arm 23.7 s then 19.0 s). So the arms run in interleaved pairs (a first `loraops run` in a fresh
worktree, then the stages called directly), and the ratio printed is the median of the pairs' ratios; every pair is
printed too.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CONFIG = ["train.max_steps=60", "train.eval_steps=30", "eval.max_samples=60"]
SMOKE = ["model.tiny.layers=1", "model.tiny.vocab_size=1000", "model.max_length=96", "train.max_steps=10",
         "train.eval_steps=5", "eval.max_samples=10", "eval.self_test=false", "eval.metrics=[morph_f1]",
         "registry.gate.min_test_size=5"]
"""--smoke: checks that the benchmark runs (the test suite runs it so it cannot rot); its figures mean nothing."""
OUTCOMES = (0, 3, 4)  # promoted/registered/unchanged, refused, worse than base: the run completed (README "Exit codes")


PHASES: list[tuple[str, float]] = []
"""Where the first `loraops run`'s seconds went (filled by _timed_cli from its output as it arrives)."""
_TASK = re.compile(r"Task run '([a-z-]+)-[0-9a-z]+' - ")


def _timed_cli(cwd: Path, *args: str, phases: bool = False) -> tuple[float, list[str]]:
    """Seconds `loraops ARGS` took in ``cwd``, and the DVC stages it ran; with ``phases``, the seconds of each part
    of the run (start-up to the flow, each Prefect task from its previous line to its last, the end) in PHASES."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "loraops.cli", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(cwd / "src"),
                                 "PYTHONUNBUFFERED": "1"})
    lines, marks = [], []  # (seconds since start, what the line belongs to)
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        task = _TASK.search(line)
        what = task.group(1) if task else ("flow start" if "Beginning flow run" in line else None)
        if what:
            marks.append((time.perf_counter() - start, what))
    code, took = proc.wait(), time.perf_counter() - start
    out = "".join(lines)
    if code not in OUTCOMES:
        sys.exit(f"loraops {' '.join(args)} failed:\n{out[-3000:]}")
    if phases:  # a task's time runs from the previous task's last line to its own last line (its start-up included)
        PHASES.clear()
        runs: list[list] = []
        for at, what in marks:
            if runs and runs[-1][0] == what:
                runs[-1][1] = at
            else:
                runs.append([what, at])
        previous = 0.0
        for what, last in runs:
            PHASES.append(("start-up: imports, Prefect's temporary server" if what == "flow start" else what,
                           last - previous))
            previous = last
        PHASES.append(("end: results printed, Prefect's server stopped", took - previous))
    ran = sorted(set(re.findall(r"Running stage '(\w+)'", out)))
    return took, ran


def _phase_table(direct: float) -> None:
    """The first run's seconds by phase, merged per name (a task's lines may come in several stretches)."""
    merged: dict[str, float] = {}
    for name, seconds in PHASES:
        merged[name] = merged.get(name, 0.0) + seconds
    print(f"{'where pair 1 spent its time':<52}{'s':>7}")
    for name, seconds in merged.items():
        print(f"  {name:<50}{seconds:>7.1f}")
    stages = sum(seconds for name, seconds in merged.items() if name in ("prepare", "augment", "index", "train",
                                                                          "evaluate"))
    print(f"  {'(the five DVC stage tasks together)':<50}{stages:>7.1f}   vs {direct:.1f} s called directly (their imports"
          " included; the run imports in its start-up)")


_DIRECT = """
import sys
from pathlib import Path
from loraops.core.config import load_params
from loraops.stages import augment, evaluate, index, prepare, train
params = load_params(sys.argv[1], sys.argv[2:])
for stage in (prepare, augment, index, train, evaluate):
    stage.run(params, Path("."))
"""
"""The direct arm: the five stage functions one after the other in a fresh interpreter, as a script of one's own
would call them; timed from outside, as `loraops run` is (each pays its own imports: a process that has imported
torch and transformers once runs the stages 3-5 s faster the second time)."""


def _pair(params: Any, keep: bool) -> tuple[float, float, float | None]:
    """One pair: a first `loraops run` in a fresh worktree of HEAD (every stage must run), its no-op rerun when
    ``keep``, then the five stages called directly, with the same code, on a fresh copy of the same inputs."""
    from loraops.core.paths import STAGES
    from loraops.orchestration.workspace import isolated_workspace

    with isolated_workspace(ROOT, f"bench-{os.getpid()}", [params.data.path, params.rag.docs_path]) as ws:
        dvc = str(Path(sys.executable).parent / "dvc")
        subprocess.run([dvc, "cache", "dir", "--local", str(ws / ".bench-dvc-cache")], cwd=ws, check=True)
        flow_first, ran_first = _timed_cli(ws, "run", *[arg for kv in CONFIG for arg in ("--set", kv)], phases=keep)
        flow_noop, ran_noop = _timed_cli(ws, "run") if keep else (None, [])
        if ran_first != sorted(STAGES) or ran_noop:
            sys.exit(f"expected every stage to run first and none on the rerun; ran {ran_first}, then {ran_noop}")
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            (root / "data/raw").mkdir(parents=True)
            (root / params.data.path).write_bytes((ws / params.data.path).read_bytes())
            shutil.copytree(ws / params.rag.docs_path, root / params.rag.docs_path)
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _DIRECT, str(ROOT / "params.yaml"), *CONFIG], cwd=root,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ws / "src")},
                                  capture_output=True, text=True)
            direct = time.perf_counter() - start
            if proc.returncode != 0:
                sys.exit(f"the stages called directly failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return flow_first, direct, flow_noop


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a 10-step config, one pair: checks the benchmark runs")
    parser.add_argument("--repeat", type=int, default=3, help="pairs of measurements (default 3)")
    args = parser.parse_args(argv)
    global CONFIG
    if args.smoke:
        CONFIG, args.repeat = SMOKE, 1
    from loraops.core.config import load_params

    params = load_params(ROOT / "params.yaml", CONFIG)
    pairs = [_pair(params, keep=n == 0) for n in range(max(1, args.repeat))]
    flow_noop = pairs[0][2]
    median = statistics.median(flow / direct for flow, direct, _ in pairs)
    print(f"config: {' '.join(CONFIG)}")
    print(f"{'pair':<6}{'loraops run':>13}{'stages directly':>17}{'ratio':>8}")
    for n, (flow, direct, _) in enumerate(pairs, 1):
        print(f"{n:<6}{flow:>11.1f} s{direct:>15.1f} s{flow / direct:>8.2f}")
    print(f"{'loraops run again, nothing changed':<44}{flow_noop:>8.1f} s")
    _phase_table(pairs[0][1])
    print(f"orchestration_overhead_ratio: {median:.2f}   (median of {len(pairs)} pair(s))")
    print(f"noop_rerun_seconds: {flow_noop:.1f}")


if __name__ == "__main__":
    main()
