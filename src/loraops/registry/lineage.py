"""The lineage card: everything that made an adapter, recorded on its run and its registered version."""

from __future__ import annotations

import hashlib
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from loraops.core.config import Params
from loraops.core.paths import AUGMENTED_DIR, DVC_LOCK, PARAMS, PREPARED_DIR, RUN_OUTPUTS
from loraops.core.secrets import redact
from loraops.core.utils import sha256_dir
from loraops.modeling.prompting import PromptFormat

# Files whose content the card records itself (params resolved, dvc.lock digest) and the metrics and plots
# a run rewrites (git keeps them for `dvc exp show`), so `--set` or `dvc repro` does not make the tree dirty.
_RECORDED = {str(PARAMS), str(DVC_LOCK), *(str(path) for path in RUN_OUTPUTS)}
PACKAGES = ("torch", "transformers", "peft", "datasets", "mlflow", "prefect", "dvc", "bert-score", "sentence-transformers")


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
    return out.stdout.rstrip("\n") if out.returncode == 0 else ""


def git_state(root: Path) -> dict[str, Any]:
    """Commit, dirty flag (ignoring files the card records by content) and the diff when dirty."""
    commit = _git(root, "rev-parse", "HEAD")
    changed = [line[3:] for line in _git(root, "status", "--porcelain", "--untracked-files=no").splitlines()]
    dirty = [path for path in changed if path not in _RECORDED]
    return {"git_commit": commit or None, "git_dirty": bool(dirty), "git_dirty_files": dirty,
            "git_diff": _git(root, "diff", "HEAD", "--", *dirty) if dirty else ""}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for pkg in PACKAGES:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return platform.processor() or platform.machine()


def base_identity(params: Params, location: str) -> dict[str, Any]:
    """Base model id and resolved revision; for a local directory, a content hash of its weights."""
    path = Path(location)
    if path.is_dir():
        return {"base_model": params.model.base, "base_revision": "sha256:" + sha256_dir(path, "*.safetensors"),
                "tokenizer_sha256": sha256_dir(path, "tokenizer*")}
    revision = params.model.revision
    try:
        from huggingface_hub import HfApi

        revision = HfApi().model_info(params.model.base, revision=params.model.revision).sha
    except Exception:  # offline or unknown: keep the configured revision, say so
        revision = f"{params.model.revision or 'main'} (unresolved: hub not reachable)"
    return {"base_model": params.model.base, "base_revision": revision, "tokenizer_sha256": None}


def card(params: Params, root: Path, base_location: str, adapter_dir: Path, mlflow_run_id: str | None,
         flow_run: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the lineage card for the current workspace."""
    data_files = {}
    augmented = sorted((root / AUGMENTED_DIR).glob("*")) if params.augment.enabled else []
    for path in [root / params.data.path, *sorted((root / PREPARED_DIR).glob("*")), *augmented]:
        if path.is_file():
            key = params.data.path if path == root / params.data.path else str(path.relative_to(root))
            data_files[key] = _md5(path)
    lock = root / "dvc.lock"
    return redact({
        **git_state(root),
        "dvc_lock_md5": _md5(lock) if lock.exists() else None,
        "data_md5": data_files,
        "params": params.model_dump(mode="json"),
        **base_identity(params, base_location),
        "adapter_sha256": sha256_dir(adapter_dir, "*.safetensors"),
        "prompt": PromptFormat.read(adapter_dir).describe,  # what training rendered; the format itself is next to
        "prompt_format": PromptFormat.read(adapter_dir).to_json(),  # the adapter, which serving reads
        "seed": params.base.seed,
        "versions": _versions(),
        "device": _device(),
        "prefect_flow_run_id": (flow_run or {}).get("id"),
        "prefect_deployment": (flow_run or {}).get("deployment"),
        "mlflow_run_id": mlflow_run_id,
    })


def card_tags(lineage: dict[str, Any]) -> dict[str, str]:
    """The card's scalar fields as MLflow tags (``lineage.<key>``)."""
    return {f"lineage.{k}": str(v)[:5000] for k, v in lineage.items()
            if not isinstance(v, (dict, list)) and k != "git_diff"}
