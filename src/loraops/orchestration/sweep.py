"""Hyperparameter sweeps with Optuna: the study, its search space and what a sweep reports.

The ``sweep`` flow (``flows/sweep.py``) asks Optuna's TPE sampler for each trial's values of the searched params
(``sweep.space``), runs the loop up to `train` in the trial's own git worktree with those values as ``--set``
overrides, and tells Optuna the trial's validation objective (the best validation loss, or the mean over the
grouped folds of ``train.cv_folds``) — never a test-split number. The study lives in an Optuna journal file, so
the `train` stage (a `dvc repro` subprocess) can report its validation losses to its trial and stop when the
median pruner says so (``modeling.trial``, the part of a trial the stage runs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraops.core.config import Params, leaf_types
from loraops.core.results import TrainFigures
from loraops.modeling.trial import pruner, storage


def distributions(params: Params) -> dict[str, Any]:
    """Optuna distributions of ``sweep.space`` (ints stay ints: ``lora.r`` is sampled as an integer)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    kinds = leaf_types()
    out: dict[str, Any] = {}
    for key, space in params.sweep.space.items():
        if space.choices is not None:
            out[key] = CategoricalDistribution(space.choices)
            continue
        assert space.low is not None and space.high is not None, key  # Params' cross-checks: choices, or low and high
        if kinds[key] is int:
            out[key] = IntDistribution(int(space.low), int(space.high), log=space.log, step=int(space.step or 1))
        else:
            out[key] = FloatDistribution(float(space.low), float(space.high), log=space.log,
                                         step=None if space.log else space.step)
    return out


def create_study(params: Params, name: str, path: Path) -> Any:
    """A minimising study: TPE seeded with base.seed; the median pruner when sweep.pruning, else none."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, storage=storage(path), direction="minimize",
                               pruner=pruner(params.sweep.pruning), sampler=optuna.samplers.TPESampler(seed=params.base.seed))


def trial_overrides(values: dict[str, Any]) -> list[str]:
    """A trial's values as ``--set`` overrides (floats written in full, so the trial's params are exact)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def objective(figures: TrainFigures, params: Params) -> float | None:
    """The trial's value from its train figures: best validation loss, or the mean over the grouped folds."""
    if params.sweep.objective == "cv_val_loss":
        return figures.cv.val_loss_mean if figures.cv is not None else None
    return figures.best_val_loss


def summary(study: Any, runs: dict[int, str]) -> dict[str, Any]:
    """The study as JSON: every trial (state, value, params, MLflow child run) and the best one."""
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "mlflow_run_id": runs.get(t.number), "last_step": t.last_step} for t in study.trials]
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    best = min(done, key=lambda t: t.value) if done else None
    return {"study": study.study_name, "direction": "minimize", "trials": trials,
            "complete": len(done), "pruned": sum(t.state.name == "PRUNED" for t in study.trials),
            "failed": sum(t.state.name == "FAIL" for t in study.trials),
            "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params,
                                               "mlflow_run_id": runs.get(best.number)}}


MIN_TRIALS_FOR_IMPORTANCE = 5
"""Param importances (fANOVA) from fewer completed trials are noise: not drawn."""


def plots(study: Any, out_dir: Path) -> list[Path]:
    """Parallel coordinates of the completed trials, and param importances from five completed trials on."""
    import matplotlib

    matplotlib.use("Agg")
    import warnings

    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis
    from optuna.exceptions import ExperimentalWarning

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    complete = sum(t.state.name == "COMPLETE" for t in study.trials)
    drawings: list[tuple[str, Any]] = [("parallel_coordinate", vis.plot_parallel_coordinate)]
    if complete >= MIN_TRIALS_FOR_IMPORTANCE:
        drawings.append(("param_importances", vis.plot_param_importances))
    for name, draw in drawings:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                axes = draw(study)
        except (ValueError, RuntimeError):  # too few completed trials, or a param that never varied
            continue
        figure: Any = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure  # one Axes, or an array of them
        figure.set_size_inches(10, 5)
        figure.tight_layout()
        path = out_dir / f"{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def describe(result: dict[str, Any]) -> str:
    """Lines for a terminal: every trial, then the best."""
    lines = [f"sweep {result['study']}: {result['complete']} complete, {result['pruned']} pruned, {result['failed']} failed"]
    for t in result["trials"]:
        value = "—" if t["value"] is None else f"{t['value']:.4f}"
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
        lines.append(f"  trial {t['number']}: {t['state'].lower():<8} objective {value}  ({values})")
    if result["best"]:
        lines.append(f"best: trial {result['best']['number']}, objective {result['best']['value']:.4f}")
    return "\n".join(lines)


__all__ = ["create_study", "distributions", "objective", "plots", "summary"]
