"""Typed results one stage writes and other code reads: a renamed or missing key fails where it is written or read,
with the file and the key named, not deep inside a later step.

- :class:`TrainFigures`: ``metrics/train.json`` (the train stage) → tracking, the no-op check, reproduce, sweeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, ValidationError

from loraops.core.errors import DataError
from loraops.core.paths import TRAIN_METRICS


class CrossValidation(BaseModel):
    """Grouped k-fold cross-validation before the final training (``train.cv_folds``)."""

    model_config = ConfigDict(extra="forbid")
    folds: int
    folds_run: int
    val_loss: list[float]
    val_loss_mean: float
    val_loss_sd: float


class TrainFigures(BaseModel):
    """What one training did: losses, steps, time, the adapter's hash (``metrics/train.json``)."""

    model_config = ConfigDict(extra="forbid")
    train_loss: float
    best_val_loss: Optional[float] = None
    steps: int
    stopped_early: bool
    train_seconds: float
    started_at: float
    finished_at: float
    train_pairs: int
    trainable_params: int
    device: str
    torch_threads: int
    answer_tokens_per_epoch: int
    pairs_cut_by_max_length: int
    batching: str
    processes: int = 1
    resumed_from: Optional[str] = None
    cv: Optional[CrossValidation] = None
    pruned: Optional[bool] = None
    pruned_at: Optional[int] = None
    adapter_sha256: Optional[str] = None  # written by the main process only (none under accelerate's other ranks)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2, exclude_none=True)

    @classmethod
    def read(cls, root: Path = Path(".")) -> "TrainFigures":
        """``metrics/train.json`` under ``root``.

        Raises:
            DataError: it is missing, not JSON, or not the train stage's figures (naming the file and the key).
        """
        path = root / TRAIN_METRICS
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{path}: not found; run `loraops train` (or `dvc repro train`) first") from None
        except ValidationError as exc:
            where = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(file)'}: {e['msg']}" for e in exc.errors()[:3])
            raise DataError(f"{path}: not the train stage's figures ({where})") from None
