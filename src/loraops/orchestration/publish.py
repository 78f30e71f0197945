"""A committed data version, announced: `loraops data publish` and the git hook that runs it (`loraops hooks install`).

DVC has no event of its own when data changes (only git hooks, `dvc install`). After ``dvc add`` and a git commit,
publishing sends ``loraops.data.updated`` to the Prefect server with the path, the git revision and DVC's content
hash, so an automation or a deployment trigger can start training on exactly that version.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

from loraops.core import events
from loraops.core.config import Params
from loraops.core.errors import ConfigError, StageError

FEEDBACK = "data/feedback/corrections.jsonl"
"""Approved corrections from the demo (DVC-tracked): data too."""
HOOK_MARK = "# loraops: publish committed data versions"


def default_paths(params: Params) -> list[str]:
    """The project's data: the training data, the documents, the approved corrections."""
    return [params.data.path, params.rag.docs_path, FEEDBACK]


def _git(root: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError(f"git {' '.join(args)} failed in {root}: {out.stderr.strip()[-300:]}")
    return out.stdout.strip()


def changed_in(root: Path, revision: str) -> list[str]:
    """The DVC-tracked paths whose ``.dvc`` file the commit ``revision`` changed (what the hook publishes); paths
    with spaces or non-ASCII names come through whole (git's NUL-separated output)."""
    out = _git(root, "diff-tree", "--root", "--no-commit-id", "--name-only", "-r", "-z", revision, "--", "*.dvc")
    return [name.removesuffix(".dvc") for name in out.split("\0") if name.endswith(".dvc")]


def data_version(root: Path, path: str) -> dict[str, Any]:
    """What identifies a committed data version of ``path``: its ``.dvc`` file's content hash, size and file count,
    and the git commit that holds it.

    Raises:
        ConfigError: ``path`` is not DVC-tracked, or its ``.dvc`` file has changes that are not committed.
    """
    dvc_file = f"{path.rstrip('/')}.dvc"
    if not (root / dvc_file).is_file():
        raise ConfigError(f"{path}: not tracked by DVC (no {dvc_file}); track it with `dvc add {path}` and commit")
    if _git(root, "status", "--porcelain", "--", dvc_file):
        raise ConfigError(f"{dvc_file} has changes that are not committed: `git add {dvc_file} && git commit` first, "
                          "so the version published is one a run can check out")
    outs = (yaml.safe_load((root / dvc_file).read_text(encoding="utf-8")) or {}).get("outs") or [{}]
    md5 = outs[0].get("md5") or outs[0].get("hash")
    if not md5:
        raise ConfigError(f"{dvc_file}: no content hash (outs[0].md5); run `dvc add {path}` again")
    revision = _git(root, "log", "-n", "1", "--format=%H", "--", dvc_file) or _git(root, "rev-parse", "HEAD")
    return {"path": path, "dvc_file": dvc_file, "md5": str(md5), "size": outs[0].get("size"),
            "nfiles": outs[0].get("nfiles"), "revision": _git(root, "rev-parse", "HEAD"), "data_commit": revision}


def publish(root: Path, params: Params, paths: list[str] | None, push: bool = False,
            say: Callable[[str], Any] = print) -> list[dict[str, Any]]:
    """Emit ``loraops.data.updated`` for each path (default: the project's tracked data); with ``push``, `dvc push`
    them first so a run on another machine can pull that version. Returns what was published.

    Raises:
        ConfigError: no Prefect server configured, or a path that is not a committed DVC version (nothing is sent).
        StageError: `dvc push` failed.
    """
    if not events.server_configured():
        raise ConfigError("no Prefect server to publish to: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api). "
                          "Without one a run's temporary server would receive the event and forget it")
    chosen = paths or [p for p in default_paths(params) if (root / f"{p.rstrip('/')}.dvc").is_file()]
    versions = [data_version(root, p) for p in chosen]  # every path checked before anything is sent
    if push and versions:
        dvc = str(Path(sys.executable).parent / "dvc")
        out = subprocess.run([dvc, "push", "-q", *[v["dvc_file"] for v in versions]], cwd=root, capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise StageError(f"dvc push failed: {(out.stderr or out.stdout).strip()[-500:]}")
    model = params.registry.model_name
    for version in versions:
        version["event_id"] = events.emit(events.DATA_UPDATED, events.project_resource(model),
                                          {"model": model, **version},
                                          related=[{"prefect.resource.id": f"loraops.data.{model}.{version['path']}",
                                                    "prefect.resource.role": "data",
                                                    "prefect.resource.name": version["path"]}])
        say(f"published {events.DATA_UPDATED}: {version['path']} md5 {version['md5']} at {version['revision'][:12]}"
            f" (event {version['event_id']})")
    return versions


def install_hook(root: Path, force: bool = False) -> Path:
    """A git ``post-commit`` hook that publishes the ``.dvc`` files a commit changed.

    post-commit, not pre-push: the version exists once committed, and a run on this machine (its worktree is made
    from this repository) can check it out at once; a team whose runners clone from a shared remote publishes from
    CI after the push instead (`loraops data publish` there). A hook cannot block the commit; without a server it
    says what to run.

    Raises:
        ConfigError: a post-commit hook that is not loraops' is already there (``force`` replaces it).
    """
    hooks = Path(_git(root, "rev-parse", "--git-path", "hooks"))
    hook = (hooks if hooks.is_absolute() else root / hooks) / "post-commit"
    if hook.exists() and HOOK_MARK not in hook.read_text(encoding="utf-8", errors="replace") and not force:
        raise ConfigError(f"{hook} exists and is not loraops'; merge it by hand or pass --force to replace it")
    hook.parent.mkdir(parents=True, exist_ok=True)
    hook.write_text(f"""#!/bin/sh
{HOOK_MARK} (loraops hooks install)
git diff-tree --root --no-commit-id --name-only -r HEAD -- '*.dvc' | grep -q . || exit 0
if [ -z "$PREFECT_API_URL" ]; then
  echo "loraops: this commit changed data; set PREFECT_API_URL and run: loraops data publish --changed-in HEAD" >&2
  exit 0
fi
"{sys.executable}" -m loraops.cli data publish --changed-in HEAD ||
  echo "loraops: publishing failed; run: loraops data publish --changed-in HEAD" >&2
exit 0
""", encoding="utf-8")
    hook.chmod(0o755)
    return hook


PUBLISHED = "published"
"""The finetune flow's ``data_revision`` for "the newest version published for this project" (what the data trigger
passes: the run starts after the debounce window, so it trains the last version of the burst, not the first)."""


def latest_published(model: str, paths: list[str] | None = None) -> dict[str, Any] | None:
    """The payload of the newest ``loraops.data.updated`` event of this project (of ``paths`` when given) on the
    Prefect server, with the event's id and time; None when there is none."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOrder, EventResourceFilter

    query = EventFilter(event=EventNameFilter(name=[events.DATA_UPDATED]),
                        resource=EventResourceFilter(id=[events.project_resource(model)["prefect.resource.id"]]),
                        order=EventOrder.DESC)
    with get_client(sync_client=True) as client:
        page = client.read_events(filter=query, limit=50)
    for event in page.events:
        if not paths or event.payload.get("path") in paths:
            return dict(event.payload) | {"event_id": str(event.id), "occurred": event.occurred.isoformat()}
    return None


def revision_to_train(requested: str, params: Params, say: Callable[[str], Any] = print) -> str:
    """The git commit a finetune run trains: ``requested``, or for :data:`PUBLISHED` the newest data version announced
    for this project (of ``retrain.paths``) on the Prefect server: a burst of publishes starts one run after the
    debounce window, which trains the last one of the burst.

    Raises:
        ConfigError: nothing was published for this project.
    """
    if requested != PUBLISHED:
        return requested
    found = latest_published(params.registry.model_name, params.retrain.paths or None)
    if found is None:
        raise ConfigError(f"no data version of {params.registry.model_name} was published on this Prefect server "
                          "(`loraops data publish`)")
    say(f"training the data version published last: {found['path']} md5 {found['md5']} at {found['revision'][:12]} "
        f"(event {found['event_id']}, {found['occurred']})")
    return str(found["revision"])
