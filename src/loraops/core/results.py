"""Typed results one stage writes and other code reads: a renamed or missing key fails where it is written or read,
with the file and the key named, not deep inside a later step.

- :class:`DataCard`: ``data/prepared/card.json`` (the prepare stage) → the CLI, tracking, the lineage card.
- :class:`TrainFigures`: ``metrics/train.json`` (the train stage) → tracking, the no-op check, reproduce, sweeps.
- :class:`EvalSummary`: ``metrics/eval.json`` (the evaluate stage) → the flow's logging and gate, reproduce.

- :class:`Decision`: the gate's verdict (``judge.gate.decide``) → the registry, the flows, the approval form.
- :class:`Promotion`: what a promote, refusal, rejection or rollback did (``registry.versions``) → the flows'
  outcomes, the CLI (``--json``: :meth:`Promotion.to_dict`), the audit trail, the reviewer's request.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from loraops.core.errors import DataError
from loraops.core.paths import DATA_CARD, EVAL_METRICS, TRAIN_METRICS

_Result = TypeVar("_Result", bound=BaseModel)


def read_result(cls: type[_Result], path: Path, stage: str, what: str) -> _Result:
    """``path`` parsed as ``cls``.

    Raises:
        DataError: the file is missing (naming the stage that writes it), not JSON, or not ``what`` (naming the
            first keys that differ).
    """
    try:
        return cls.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run `loraops {stage}` (or `dvc repro {stage}`) first") from None
    except ValidationError as exc:
        where = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(file)'}: {e['msg']}" for e in exc.errors()[:3])
        raise DataError(f"{path}: not {what} ({where})") from None


def write_result(result: BaseModel, path: Path) -> None:
    """``result`` as pretty UTF-8 JSON, atomically, without the optional fields that were never set."""
    from loraops.core.utils import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(result.model_dump(mode="json", exclude_unset=True), ensure_ascii=False, indent=2) + "\n")


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
        return read_result(cls, root / TRAIN_METRICS, "train", "the train stage's figures")


class LengthStats(BaseModel):
    """Lengths in characters over every split."""

    model_config = ConfigDict(extra="forbid")
    min: int
    mean: float
    p95: int
    max: int


class DataCard(BaseModel):
    """What the prepare stage made of the raw file (``data/prepared/card.json``)."""

    model_config = ConfigDict(extra="forbid")
    source: dict[str, Any]
    """The raw file: path, format, encoding, md5, rows."""
    pairs: dict[str, int]
    groups: dict[str, int]
    categories: dict[str, dict[str, int]]
    question_chars: LengthStats
    answer_chars: LengthStats
    cleaning: dict[str, int]
    """What cleaning removed or cut, by reason."""

    @classmethod
    def read(cls, root: Path = Path(".")) -> "DataCard":
        return read_result(cls, root / DATA_CARD, "prepare", "the prepare stage's data card")


class Comparison(BaseModel):
    """A paired comparison tuned − base over the same questions."""

    model_config = ConfigDict(extra="forbid")
    base: float
    tuned: float
    delta: float
    ci95: tuple[float, float]
    """The seeded paired-bootstrap 95% interval of ``delta``."""
    wins: int
    ties: int
    losses: int


class SliceMean(BaseModel):
    model_config = ConfigDict(extra="forbid")
    base: float
    tuned: float
    delta: float


class Slice(BaseModel):
    """One value of a slice column (a category, an attribute): its size and, per metric, the means (the JSON keeps
    the metrics beside ``n`` and ``small``, as ``dvc metrics show`` lists them)."""

    model_config = ConfigDict(extra="allow")
    n: int
    small: bool
    """Fewer questions than ``eval.min_slice_size``: shown, never a reason to refuse."""
    __pydantic_extra__: dict[str, SliceMean]  # pydantic's way to type the extra keys (each a metric's means)

    def metric(self, name: str) -> SliceMean | None:
        return (self.__pydantic_extra__ or {}).get(name)


class Degenerate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int
    rate: float
    reasons: dict[str, int]


class Sample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int
    of: int
    seed: int
    stratified_by: Optional[str] = None


class EvalSummary(BaseModel):
    """What the evaluate stage measured (``metrics/eval.json``): means, gains with intervals, slices, degenerate
    answers, and with retrieval the arms without it."""

    model_config = ConfigDict(extra="forbid")
    n: int
    empty_answers: dict[str, int]
    metrics: dict[str, Comparison]
    slices: dict[str, dict[str, Slice]]
    degenerate: Optional[dict[str, Degenerate]] = None
    answer_room: Optional[dict[str, Any]] = None
    sample: Optional[Sample] = None
    retrieval: Optional[dict[str, Any]] = None
    arms: Optional[dict[str, Any]] = None
    without_retrieval: Optional["EvalSummary"] = None
    validity: Optional[dict[str, dict[str, Any]]] = None
    tone_probe: Optional[dict[str, Any]] = None
    judge: Optional[dict[str, Any]] = None
    """With ``eval.judge.enabled``: the judge (model, endpoint, fingerprint), its cost (requests, cached replies,
    tokens), unparsed replies and, pairwise, the position-bias rate."""

    def extended(self, **fields: Any) -> "EvalSummary":
        """This summary with more of its fields set (validated as when read)."""
        return EvalSummary.model_validate(self.model_dump(exclude_unset=True) | fields)

    def primary(self, metric: str | None) -> str:
        """``metric`` when it was measured, else the first metric (the gate's metric may not be in the pack)."""
        return metric if metric in self.metrics else next(iter(self.metrics))

    @classmethod
    def read(cls, root: Path = Path(".")) -> "EvalSummary":
        return read_result(cls, root / EVAL_METRICS, "evaluate", "the evaluate stage's summary")


@dataclass
class Decision:
    """The gate's verdict: promote or refuse, with the reasons and the figures behind them."""

    promote: bool
    reasons: list[str]
    against: str
    """What the candidate was compared with: ``production vN``, or the base model when there is no production."""
    figures: dict[str, Any] = field(default_factory=dict)
    """The comparison that decided: metric, reference and candidate means, gain and its 95% interval."""
    failures: list[str] = field(default_factory=list)
    """The reasons that refused (a subset of ``reasons``, in the same order); empty when it promotes."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Decision":
        return cls(**data)


@dataclass
class Signoff:
    """A reviewer's answer to an approval request (``registry.gate.require_approval``)."""

    reviewer: str
    comment: str = ""
    approved: bool = False


@dataclass
class Promotion:
    """What a promote, a refusal, a reviewer's rejection or a rollback did to a registered model's ``production``."""

    name: str
    version: str
    """The version judged (promote, refuse, reject) or now in production (rollback)."""
    previous: Optional[str]
    """The production version before (None: there was none)."""
    promoted: bool
    """``production`` points at ``version`` now (also when it already did)."""
    forced: bool = False
    reason: Optional[str] = None
    decision: Optional[Decision] = None
    passed: Optional[bool] = None
    """Only for a dry run (what a reviewer is shown): whether the gate would promote."""
    approval: Optional[Signoff] = None
    rollback: bool = False

    @property
    def unchanged(self) -> bool:
        """Promoted to where it already was: a no-op rerun."""
        return self.promoted and self.previous == self.version

    def to_dict(self) -> dict[str, Any]:
        """As JSON (``loraops promote --json``, the audit trail, a flow run's state): unset optional parts left out."""
        out = asdict(self)
        for key in ("passed", "approval"):
            if out[key] is None:
                del out[key]
        if not self.rollback:
            del out["rollback"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Promotion":
        data = dict(data)
        if data.get("decision") is not None:
            data["decision"] = Decision.from_dict(data["decision"])
        if data.get("approval") is not None:
            data["approval"] = Signoff(**data["approval"])
        return cls(**data)
