"""What the finetune flow does between its Prefect tasks: DVC stages, MLflow logging, lineage, registration.

Kept here, not in flows/, so the flow file is wiring only and the same steps are testable without Prefect.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from loraops.errors import StageError
from loraops.config import DEFAULT_PARAMS, ConfigError, Params, load_params, parse_override
from loraops.errors import RegistryError

STAGES = ("prepare", "train", "evaluate")


def write_params(params_file: str, overrides: list[str], root: Path = Path(".")) -> Params:
    """Validate, then record the run's params in ``params.yaml`` for DVC (as ``dvc exp run -S`` does).

    Overrides are written key by key, keeping the file's comments; a different params file replaces it.
    """
    from dvc.utils.serialize import modify_yaml

    params = load_params(root / params_file, overrides)
    target = root / DEFAULT_PARAMS
    if (root / params_file).resolve() != target.resolve():
        from loraops.config import dump_params

        dump_params(params, target)
        return params
    if overrides:
        with modify_yaml(target) as tree:
            for text in overrides:
                key, value = parse_override(text)
                node = tree
                *parents, leaf = key.split(".")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
    return params


def section_overrides(params_file: Path, sections: dict[str, Any]) -> list[str]:
    """``dotted.key=value`` overrides for every form value that differs from the params file.

    The Prefect form sends whole sections (pydantic models); only real changes become overrides, so a
    run from the form records exactly what the user changed, like a CLI run with ``--set``.
    """
    import json

    from loraops.config import _flatten

    current = load_params(params_file).model_dump(mode="json")
    out = []
    for name, section in sections.items():
        given = section.model_dump(mode="json") if hasattr(section, "model_dump") else dict(section)
        before = _flatten(current[name], f"{name}.")
        for key, value in _flatten(given, f"{name}.").items():
            if before.get(key) != value:
                out.append(f"{key}={json.dumps(value, ensure_ascii=False)}")
    return out


GPU_LIMIT = "gpu"


def ensure_gpu_limit(slots: int | None = None) -> int:
    """Create the Prefect global concurrency limit ``gpu`` if missing (slots from LORAOPS_GPU_SLOTS, default 1)."""
    from loraops.concurrency import ensure_limit

    return ensure_limit(GPU_LIMIT, slots or int(os.environ.get("LORAOPS_GPU_SLOTS", "1")))


def gpu_slot(say: Any = print, holder: dict[str, Any] | None = None) -> Any:
    """Hold one leased slot of the ``gpu`` limit: training and generation of concurrent runs take turns.

    While waiting it says who holds the slot and since when; in local mode it frees slots of dead holders.
    """
    from loraops.concurrency import waiting_slot

    return waiting_slot(GPU_LIMIT, say, holder)


@contextlib.contextmanager
def isolated_workspace(repo: Path, name: str, data_path: str) -> Iterator[Path]:
    """A git worktree of HEAD for one flow run, sharing the repo's DVC cache; removed afterwards.

    Concurrent runs each get their own params.yaml, dvc.lock and stage outputs; DVC's cache is shared,
    so unchanged stages and data are not recomputed or copied twice.
    """
    import shutil
    import subprocess

    repo = repo.resolve()
    tree = repo / ".loraops" / "runs" / name
    tree.parent.mkdir(parents=True, exist_ok=True)
    dvc = str(Path(sys.executable).parent / "dvc")

    def sh(*cmd: str, cwd: Path = tree) -> None:
        out = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
        if out.returncode != 0:
            raise StageError(f"workspace {tree}: {' '.join(cmd[:3])} failed: {out.stderr.strip()[-500:]}")

    sh("git", "worktree", "add", "--detach", str(tree), "HEAD", cwd=repo)
    try:
        sh(dvc, "cache", "dir", "--local", str(repo / ".dvc" / "cache"))
        if (repo / "dvc-remote").is_dir():
            sh(dvc, "remote", "modify", "--local", "sample", "url", str(repo / "dvc-remote"))
        if (tree / f"{data_path}.dvc").exists():
            sh(dvc, "pull", "-q", f"{data_path}.dvc")
        elif not (tree / data_path).exists() and (repo / data_path).is_file():
            (tree / data_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / data_path, tree / data_path)  # an untracked local file the user pointed at
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=repo, capture_output=True)
        shutil.rmtree(tree, ignore_errors=True)


def reproduce_stage(stage: str, root: Path = Path(".")) -> bool:
    """Run one DVC stage (and anything stale upstream) with `dvc repro`; return whether it ran.

    DVC skips a stage whose code, params sections and inputs are unchanged (dvc.lock, run cache).
    """
    from dvc.repo import Repo

    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    if (root / "src" / "loraops").is_dir():  # a workspace runs its own checkout's code
        os.environ["PYTHONPATH"] = str((root / "src").resolve())
    from dvc.exceptions import DvcException

    try:
        # DVC resolves stage paths against the working directory, so run it from the workspace root
        with contextlib.chdir(root), Repo(".") as repo:
            ran = repo.reproduce(targets=[stage])
    except DvcException as exc:
        raise StageError(f"stage {stage} failed: {exc} (the stage's own error is printed above)") from None
    return any(getattr(s, "addressing", str(s)).endswith(stage) for s in ran or [])


def check_clean(lineage: dict[str, Any], allow_dirty: bool) -> None:
    """Refuse to register from a dirty tree unless allowed (the diff is then stored in the lineage card).

    Raises:
        RegistryError: when tracked files other than params.yaml/dvc.lock have uncommitted changes.
    """
    if lineage["git_dirty"] and not allow_dirty:
        files = ", ".join(lineage["git_dirty_files"][:5])
        raise RegistryError(f"refusing to register from a dirty tree ({files}); commit first or pass allow_dirty / --allow-dirty")


def summary_markdown(params: Params, summary: dict[str, Any], run_id: str, tracking_uri: str,
                     registered: dict[str, Any], gate: dict[str, Any] | None, ran: dict[str, bool],
                     experiment_id: str = "0") -> str:
    """The Prefect markdown artifact: headline scores, stages run, registration and gate decision."""
    link = f"[`{run_id}`]({tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id})" \
        if tracking_uri.startswith("http") else f"`{run_id}` (store {tracking_uri}; open it with `make ui-mlflow`)"
    lines = [f"# finetune: {params.registry.model_name} v{registered['version']}", "",
             f"MLflow run {link}; experiment `{params.registry.model_name}`.", "",
             "| stage | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES),
             "| ran | " + " | ".join("yes" if ran[s] else "skipped (unchanged)" for s in STAGES) + " |", "",
             "| metric | base | tuned | Δ | 95% CI | valid on Korean |", "|---|---|---|---|---|---|"]
    validity = summary.get("validity", {})
    for metric, s in summary["metrics"].items():
        valid = "—" if metric not in validity else ("yes" if validity[metric]["valid"] else "no")
        lines.append(f"| {metric} | {s['base']:.4f} | {s['tuned']:.4f} | {s['delta']:+.4f} | "
                     f"[{s['ci95'][0]:+.4f}, {s['ci95'][1]:+.4f}] | {valid} |")
    degenerate = summary.get("degenerate")
    if degenerate:
        lines += ["", f"Degenerate answers (scored 0): base {degenerate['base']['count']}, tuned "
                      f"{degenerate['tuned']['count']} of {summary['n']}; gate metric `{params.registry.gate.metric}`."]
    reused = " (same adapter as an existing version)" if registered.get("reused") else ""
    lines += ["", f"Registered `{registered['name']}` version {registered['version']}{reused}, alias `candidate`."]
    if gate is not None:
        verdict = "promoted to `production`" if gate["promoted"] else "not promoted"
        lines += ["", f"Gate vs {gate['decision']['against']}: **{verdict}**", ""]
        lines += [f"- {reason}" for reason in gate["decision"]["reasons"]]
    return "\n".join(lines) + "\n"


def top_losses(root: Path, metric: str, n: int = 10, width: int = 120) -> list[dict[str, Any]]:
    """The ``n`` questions where tuned lost most to base on ``metric`` (for a Prefect table artifact).

    Only real losses, one row per question (its worst reference), answers cut to ``width`` characters.
    """
    from loraops.evaluate import read_table

    table = read_table(root)
    table["delta"] = table[f"tuned_{metric}"] - table[f"base_{metric}"]
    worst = table[table["delta"] < 0].sort_values("delta").drop_duplicates("question").head(n)
    cut = lambda text: text if len(text) <= width else text[: width - 1] + "…"  # noqa: E731
    return [{"delta": round(float(r["delta"]), 4), "question": cut(r["question"]), "base": cut(r["base_answer"]),
             "tuned": cut(r["tuned_answer"])} for _, r in worst.iterrows()]


__all__ = ["write_params", "reproduce_stage", "check_clean", "summary_markdown", "top_losses", "load_params", "ConfigError"]
