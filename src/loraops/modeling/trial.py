"""A sweep trial as its train stage sees it: the environment a sweep sets for the stage (journal file, study, trial,
pruning, objective), and the :class:`Reporter` that sends the stage's validation losses to that trial. Outside a
sweep the reporter is inert. The study itself (space, sampler, summary) is ``orchestration.sweep``."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

STORAGE_ENV, STUDY_ENV, TRIAL_ENV = "LORAOPS_OPTUNA_STORAGE", "LORAOPS_OPTUNA_STUDY", "LORAOPS_OPTUNA_TRIAL_ID"
PRUNING_ENV, OBJECTIVE_ENV = "LORAOPS_OPTUNA_PRUNING", "LORAOPS_OPTUNA_OBJECTIVE"
"""Set for a trial's `train` stage: the journal file, study name and trial id it reports to, whether to prune
(Optuna keeps no pruner in the storage: the stage builds the same one) and what it reports (each evaluation's
validation loss, or the running mean after each cross-validation fold)."""


def storage(path: Path) -> Any:
    """An Optuna journal storage in ``path``: several processes (the flow, each trial's train stage) share it."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def pruner(enabled: bool) -> Any:
    """The median pruner (a trial stops when its validation loss is worse than the median of the completed trials'
    at the same step, from the second trial on), or none."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0) if enabled else optuna.pruners.NopPruner()


def trial_env(path: Path, study: str, trial_id: int, pruning: bool, objective: str = "val_loss") -> dict[str, str]:
    return {STORAGE_ENV: str(path.resolve()), STUDY_ENV: study, TRIAL_ENV: str(trial_id), PRUNING_ENV: "1" if pruning else "",
            OBJECTIVE_ENV: objective}


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
