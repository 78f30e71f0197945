"""Every file and folder the loop reads or writes, relative to the project root, named once.

Stages, tracking, lineage, reproduce and the flows take their paths from here; ``dvc.yaml`` spells the
same paths for DVC, and ``tests/test_paths.py`` checks that the two agree stage by stage.
"""

from __future__ import annotations

import os
from pathlib import Path

STAGES = ("prepare", "augment", "index", "train", "evaluate")
"""The DVC stages, in order; each is `src/loraops/<stage>.py`, `loraops <stage>` and a Prefect task of that name."""

PARAMS = Path("params.yaml")
DVC_LOCK = Path("dvc.lock")

PREPARED_DIR = Path("data/prepared")
SPLITS = ("train", "validation", "test")
DATA_CARD = PREPARED_DIR / "card.json"


def split(name: str, folder: Path = PREPARED_DIR) -> Path:
    """A split: ``data/prepared/<name>.jsonl``, or the same split with its passages in ``data/retrieved``."""
    return folder / f"{name}.jsonl"


AUGMENTED_DIR = Path("data/augmented")
"""Stage `augment`: the prepared train rows (``source: original``) plus the added ones (``rule``, ``teacher``,
``document``); with ``augment.enabled`` off, the prepared train split byte for byte."""
AUGMENT_CARD = AUGMENTED_DIR / "card.json"

INDEX_DIR = Path("data/index")
"""Stage `index`: the chunks, the BM25 index and (for dense/hybrid) the vectors of the domain documents."""
INDEX_CHUNKS = INDEX_DIR / "chunks.jsonl"
INDEX_VECTORS = INDEX_DIR / "vectors.npy"
INDEX_CARD = INDEX_DIR / "card.json"
RETRIEVED_DIR = Path("data/retrieved")
"""Stage `index`: the prepared splits with each question's passages (``context``, ``sources``) and the prompt
that train and evaluate use (``rag.template``; ``prompt_plain`` is the one without retrieval). With
``rag.enabled`` off they are the prepared rows unchanged, so a document edit does not retrain."""



def prompts_folder(name: str, rag_enabled: bool, augment_enabled: bool = False) -> Path:
    """Where train and evaluate read split ``name``: with its passages when ``rag.enabled``; else the augmented train
    rows (``augment.enabled``) or the split as prepared. Without retrieval ``data/retrieved`` holds these same rows,
    so `loraops prepare` then `loraops train` needs neither an index nor an augment run."""
    if rag_enabled:
        return RETRIEVED_DIR
    return AUGMENTED_DIR if name == "train" and augment_enabled else PREPARED_DIR


BASE_DIR = Path("models/base")
"""The tiny base built from the training corpus (``model.base: tiny-ko``); a hub base lives in the HF cache."""
ADAPTER_DIR = Path("models/adapter")
CHECKPOINT_DIR = Path("models/checkpoints")
TRAIN_METRICS = Path("metrics/train.json")
TRAIN_LOG = Path("metrics/train_log.csv")

EVAL_METRICS = Path("metrics/eval.json")
EVAL_REPORT = Path("reports/eval.md")
EVAL_TABLE = Path("reports/eval_questions.csv")
PLOTS_DIR = Path("reports/plots")

FEEDBACK = Path("data/feedback/corrections.jsonl")
"""Corrected answers approved in ``loraops demo`` (question, answer, category), tracked with ``dvc add``."""

MLRUNS = Path("mlruns")
"""The default local MLflow store: ``mlruns/mlflow.db`` and its artifacts."""
MLFLOW_DB = MLRUNS / "mlflow.db"
MLFLOW_ARTIFACTS = MLRUNS / "artifacts"
LOCKS_DIR = MLRUNS / ".locks"
WORKSPACES_DIR = Path(".loraops/runs")
"""Git worktrees of flow runs started from a deployment, and of sweep trials."""
SWEEPS_DIR = Path(".loraops/sweeps")
"""Optuna journal files of sweeps (the flow and each trial's train stage share one)."""

STAGE_OUTPUTS: dict[str, dict[str, list[Path]]] = {
    "prepare": {"outs": [split(s) for s in SPLITS], "metrics": [DATA_CARD], "plots": []},
    "augment": {"outs": [split("train", AUGMENTED_DIR)], "metrics": [AUGMENT_CARD], "plots": []},
    "index": {"outs": [INDEX_DIR, *(split(s, RETRIEVED_DIR) for s in SPLITS)], "metrics": [], "plots": []},
    "train": {"outs": [BASE_DIR, ADAPTER_DIR], "metrics": [TRAIN_METRICS], "plots": [TRAIN_LOG]},
    "evaluate": {"outs": [EVAL_TABLE, EVAL_REPORT, PLOTS_DIR], "metrics": [EVAL_METRICS], "plots": []},
}
"""What each DVC stage writes, by kind (``outs`` go to the DVC cache; ``metrics``/``plots`` are kept by git)."""

TEMPLATES_DIR = Path("prompts")
"""The project's own chat templates (``data.chat_template: prompts/<file>.jinja``)."""
STAGE_INPUTS: dict[str, list[Path]] = {
    "prepare": [],  # plus ${data.path}
    "augment": [split(s) for s in SPLITS],  # plus ${rag.docs_path} (augment.documents)
    "index": [split("train"), split("train", AUGMENTED_DIR), split("validation"), split("test")],
    # plus ${rag.docs_path}; rag.corpus: train indexes the prepared training answers
    "train": [split("train", RETRIEVED_DIR), split("validation", RETRIEVED_DIR), TEMPLATES_DIR],
    "evaluate": [BASE_DIR, ADAPTER_DIR, split("test", RETRIEVED_DIR)],
}
"""The stage outputs each DVC stage reads (besides its code, params and the raw data)."""

RUN_OUTPUTS = [p for kinds in STAGE_OUTPUTS.values() for p in kinds["metrics"] + kinds["plots"]]
"""Files a run rewrites that git tracks (``cache: false`` in dvc.yaml): not counted as uncommitted code."""


def user_cache(kind: str) -> Path:
    """A folder for results that depend only on their inputs (measured metric validity, judge and teacher replies,
    an empty migrated MLflow store), shared by every project of this user: ``LORAOPS_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/loraops``, else ``~/.cache/loraops``; ``kind`` names the subfolder."""
    root = os.environ.get("LORAOPS_CACHE_DIR")
    if not root:
        root = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loraops")
    return Path(root) / kind
