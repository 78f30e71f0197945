"""Hyperparameter sweeps with Optuna, and the pruning hook the train stage calls.

The ``sweep`` flow (``flows/sweep.py``) asks Optuna's TPE sampler for each trial's values of the searched params
(``sweep.space``), runs the loop up to `train` in the trial's own git worktree with those values as ``--set``
overrides, and tells Optuna the trial's validation objective (the best validation loss, or the mean over the
grouped folds of ``train.cv_folds``) — never a test-split number. The study lives in an Optuna journal file, so
the `train` stage (a `dvc repro` subprocess) can report its validation losses to its trial and stop when the
median pruner says so (:func:`pruning_callback`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from loraops.config import Params, leaf_types
from loraops.results import TrainFigures

STORAGE_ENV, STUDY_ENV, TRIAL_ENV = "LORAOPS_OPTUNA_STORAGE", "LORAOPS_OPTUNA_STUDY", "LORAOPS_OPTUNA_TRIAL_ID"
PRUNING_ENV, OBJECTIVE_ENV = "LORAOPS_OPTUNA_PRUNING", "LORAOPS_OPTUNA_OBJECTIVE"
"""Set for a trial's `train` stage: the journal file, study name and trial id it reports to, whether to prune
(Optuna keeps no pruner in the storage: the stage builds the same one) and what it reports (each evaluation's
validation loss, or the running mean after each cross-validation fold)."""


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


def storage(path: Path) -> Any:
    """An Optuna journal storage in ``path``: several processes (the flow, each trial's train stage) share it."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def create_study(params: Params, name: str, path: Path) -> Any:
    """A minimising study: TPE seeded with base.seed; the median pruner when sweep.pruning, else none."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=name, storage=storage(path), direction="minimize",
                               pruner=pruner(params.sweep.pruning), sampler=optuna.samplers.TPESampler(seed=params.base.seed))


def pruner(enabled: bool) -> Any:
    """The median pruner (a trial stops when its validation loss is worse than the median of the completed trials'
    at the same step, from the second trial on), or none."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0) if enabled else optuna.pruners.NopPruner()


def trial_overrides(values: dict[str, Any]) -> list[str]:
    """A trial's values as ``--set`` overrides (floats written in full, so the trial's params are exact)."""
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def trial_env(path: Path, study: str, trial_id: int, pruning: bool, objective: str = "val_loss") -> dict[str, str]:
    return {STORAGE_ENV: str(path.resolve()), STUDY_ENV: study, TRIAL_ENV: str(trial_id), PRUNING_ENV: "1" if pruning else "",
            OBJECTIVE_ENV: objective}


def objective(figures: TrainFigures, params: Params) -> float | None:
    """The trial's value from its train figures: best validation loss, or the mean over the grouped folds."""
    if params.sweep.objective == "cv_val_loss":
        return figures.cv.val_loss_mean if figures.cv is not None else None
    return figures.best_val_loss


class Reporter:
    """The trial a `train` stage belongs to (from the environment), or nothing outside a sweep."""

    def __init__(self) -> None:
        self.trial: Any = None
        self.pruned_at: int | None = None
        self.objective = os.environ.get(OBJECTIVE_ENV) or "val_loss"
        if os.environ.get(STORAGE_ENV):
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            study = optuna.load_study(study_name=os.environ[STUDY_ENV], storage=storage(Path(os.environ[STORAGE_ENV])),
                                      pruner=pruner(bool(os.environ.get(PRUNING_ENV))))
            self.trial = optuna.trial.Trial(study, int(os.environ[TRIAL_ENV]))

    def report(self, value: float | None, step: int) -> bool:
        """Report an intermediate validation loss; True when the pruner says to stop this trial."""
        if self.trial is None or value is None or math.isnan(value):
            return False
        self.trial.report(float(value), step)
        if self.trial.should_prune():
            self.pruned_at = step
            return True
        return False


def pruning_callback(reporter: Reporter) -> Any:
    """A Trainer callback: each evaluation's loss goes to the trial; training stops when the trial is pruned."""
    from transformers import TrainerCallback

    class OptunaPruning(TrainerCallback):
        def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                        **kwargs: Any) -> None:
            if reporter.report((metrics or {}).get("eval_loss"), state.global_step):
                control.should_training_stop = True

    return OptunaPruning()


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
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    import warnings

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


__all__ = ["create_study", "distributions", "objective", "plots", "pruning_callback", "summary"]
