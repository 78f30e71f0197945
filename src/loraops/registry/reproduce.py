"""`loraops reproduce`: rebuild a run from its lineage card in an isolated worktree and compare.

The worktree is checked out at the recorded commit (with the recorded diff applied when the run was
registered from a dirty tree); the data comes from DVC at the version that commit pins; the params are
the recorded, fully resolved ones; the stages run with that commit's code. The report gives per metric
the original value, the new one and the difference, and whether the adapter tensors are identical.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from mlflow.exceptions import MlflowException

from loraops.core.config import Params
from loraops.core.results import EvalSummary, TrainFigures
from loraops.registry.versions import RegistryError, mlflow_client, resolve, run_artifact


def run_id_of(ref: str) -> str:
    """The MLflow run behind a run id, ``models:/name/version`` or ``models:/name@alias``.

    Raises:
        RegistryError: unknown model, version, alias or run.
    """
    client = mlflow_client()
    if ref.startswith("models:/"):
        body = ref[len("models:/"):]
        if "@" in body:
            name, alias = body.split("@", 1)
            mv = resolve(client, name, alias=alias)
        else:
            name, _, version = body.partition("/")
            mv = resolve(client, name, version=version or None, alias=None if version else "production")
        if not mv.run_id:
            raise RegistryError(f"{ref}: the version has no MLflow run, so no lineage card")
        return mv.run_id
    try:
        client.get_run(ref)
    except MlflowException:
        raise RegistryError(f"{ref}: no such MLflow run (give a run id, models:/name/version or models:/name@alias)") from None
    return ref


def _lineage(run_id: str) -> dict[str, Any]:
    path = run_artifact(run_id, "lineage.json", "without its lineage card the run cannot be reproduced")
    return json.loads(path.read_text(encoding="utf-8"))


def _original_metrics(run_id: str) -> dict[str, float]:
    metrics = mlflow_client().get_run(run_id).data.metrics
    return {k: v for k, v in metrics.items() if k.startswith(("gate/", "tuned/", "vs_base/"))}


def _sh(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, what: str = "") -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise RegistryError(f"reproduce: {what or ' '.join(cmd[:3])} failed: {' / '.join(tail)}")
    return out.stdout


def _checkout(card: dict[str, Any], repo: Path, where: Path) -> Path:
    """A detached worktree at the recorded commit, its diff applied, the recorded data pulled from DVC."""
    commit = card.get("git_commit")
    if not commit:
        raise RegistryError("the lineage card records no git commit")
    tree = where / "tree"
    _sh(["git", "worktree", "add", "--detach", str(tree), commit], repo, what=f"checking out commit {commit[:12]}")
    if card.get("git_diff"):
        patch = where / "dirty.patch"
        patch.write_text(card["git_diff"] + "\n", encoding="utf-8")
        _sh(["git", "apply", str(patch)], tree, what="applying the recorded uncommitted diff")
    dvc = str(Path(sys.executable).parent / "dvc")
    remote = repo / "dvc-remote"
    if remote.is_dir():  # the shipped local remote is relative to the checkout; point at the one that has the data
        _sh([dvc, "remote", "modify", "--local", "sample", "url", str(remote)], tree, what="configuring the DVC remote")
    data_path = card["params"]["data"]["path"]
    if (tree / f"{data_path}.dvc").exists():
        _sh([dvc, "pull", "-q", f"{data_path}.dvc"], tree,
            what=f"dvc pull {data_path} (the recorded data version may be gone from the DVC remote)")
    docs_path = card["params"].get("rag", {}).get("docs_path")
    if docs_path and (tree / f"{docs_path}.dvc").exists():  # the `index` stage's documents
        _sh([dvc, "pull", "-q", f"{docs_path}.dvc"], tree, what=f"dvc pull {docs_path}")
    recorded = card.get("data_md5", {}).get(data_path)
    if recorded:
        import hashlib

        actual = hashlib.md5((tree / data_path).read_bytes()).hexdigest()
        if actual != recorded:
            raise RegistryError(f"reproduce: {data_path} at commit {commit[:12]} has md5 {actual}, the run used {recorded}")
    return tree


def reproduce(ref: str, params: Params, repo: Path = Path(".")) -> dict[str, Any]:
    """Rebuild ``ref`` and compare; see the module docstring. Returns the report."""
    run_id = run_id_of(ref)
    card = _lineage(run_id)
    where = Path(tempfile.mkdtemp(prefix="loraops-reproduce-"))
    try:
        tree = _checkout(card, repo.resolve(), where)
        (tree / "params.yaml").write_text(yaml.safe_dump(card["params"], allow_unicode=True, sort_keys=False), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        for stage in ("prepare", "train", "evaluate"):
            _sh([sys.executable, "-m", "loraops.cli", stage], tree, env=env, what=f"stage {stage}")
        new_sha = TrainFigures.read(tree).adapter_sha256 or ""
        summary = EvalSummary.read(tree)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(where / "tree")], cwd=repo, capture_output=True)
        shutil.rmtree(where, ignore_errors=True)
    return compare(card, _original_metrics(run_id), summary, new_sha, params.registry.reproduce_tolerance, run_id)


def compare(card: dict[str, Any], original: dict[str, float], summary: EvalSummary, new_sha: str,
            tolerance: float, run_id: str) -> dict[str, Any]:
    """The reproduce report (pure): per-metric original/new/difference and the verdict."""
    from loraops.judge.report import flat_metrics

    new = flat_metrics(summary)
    metrics = {key: {"original": value, "reproduced": new.get(key), "difference": None if new.get(key) is None
                     else round(new[key] - value, 9)} for key, value in sorted(original.items())}
    identical = new_sha == card["adapter_sha256"]
    worst = max((abs(m["difference"]) for m in metrics.values() if m["difference"] is not None), default=0.0)
    on_gpu = "cuda" in str(card.get("device", "")).lower() or "nvidia" in str(card.get("device", "")).lower()
    reproduced = identical and worst == 0.0 if not on_gpu else worst <= tolerance
    return {"ref_run_id": run_id, "identical": identical, "original_sha256": card["adapter_sha256"],
            "reproduced_sha256": new_sha, "max_metric_difference": worst, "tolerance": None if not on_gpu else tolerance,
            "reproduced": bool(reproduced), "git_commit": card["git_commit"], "metrics": metrics}


def describe(report: dict[str, Any]) -> str:
    """Human summary of a reproduce report."""
    verdict = "REPRODUCED" if report["reproduced"] else "NOT REPRODUCED"
    lines = [f"{verdict}: run {report['ref_run_id']} at commit {report['git_commit'][:12]}",
             f"  adapter tensors identical: {report['identical']} ({report['original_sha256'][:12]} vs {report['reproduced_sha256'][:12]})",
             f"  largest metric difference: {report['max_metric_difference']:.3g}"]
    for key, m in report["metrics"].items():
        if key.startswith("tuned/"):
            lines.append(f"  {key:<28} {m['original']:.6f} → {m['reproduced']:.6f}  ({m['difference']:+.2g})")
    return "\n".join(lines)
