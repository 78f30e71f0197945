"""Where a flow run works and how it runs a DVC stage there: params written for DVC, git worktrees, `dvc repro`.

The finetune flow (``loraops.flows.finetune``) is wiring only; these are the steps it wires, testable without Prefect.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO, cast

from loraops.core.config import Params, dump_params, load_params, parse_override
from loraops.core.errors import LoraopsError, RegistryError, StageError
from loraops.core.paths import DVC_LOCK, PARAMS, STAGES, WORKSPACES_DIR
from loraops.core.remote import pull_inputs
from loraops.core.results import TrainFigures
from loraops.core.secrets import redact_text


def write_params(params_file: str, overrides: list[str], root: Path = Path(".")) -> Params:
    """Validate, then record the run's params in ``params.yaml`` for DVC (as ``dvc exp run -S`` does).

    Overrides are written key by key, keeping the file's comments; a different params file replaces it.
    """
    from dvc.utils.serialize import modify_yaml

    params = load_params(root / params_file, overrides)
    target = root / PARAMS
    if (root / params_file).resolve() != target.resolve():
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


@contextlib.contextmanager
def isolated_workspace(repo: Path, name: str, inputs: list[str], revision: str = "HEAD") -> Iterator[Path]:
    """A git worktree of ``revision`` (default HEAD) for one flow run, sharing the repo's DVC cache; removed afterwards.

    Concurrent runs each get their own params.yaml, dvc.lock and stage outputs; DVC's cache is shared,
    so unchanged stages and data are not recomputed or copied twice.
    """
    import shutil

    repo = repo.resolve()
    tree = repo / WORKSPACES_DIR / name
    tree.parent.mkdir(parents=True, exist_ok=True)
    dvc = str(Path(sys.executable).parent / "dvc")

    def sh(*cmd: str, cwd: Path = tree) -> None:
        out = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True)
        if out.returncode != 0:
            raise StageError(f"workspace {tree}: {' '.join(cmd[:3])} failed: {out.stderr.strip()[-500:]}")

    sh("git", "worktree", "add", "--detach", str(tree), revision or "HEAD", cwd=repo)
    try:
        sh(dvc, "cache", "dir", "--local", str(repo / ".dvc" / "cache"))
        if (repo / "dvc-remote").is_dir():
            sh(dvc, "remote", "modify", "--local", "sample", "url", str(repo / "dvc-remote"))
        for data_path in inputs:  # data.path, rag.docs_path
            pull_inputs(tree, data_path, lambda _: None)
            if not (tree / data_path).exists() and (repo / data_path).exists():  # untracked local files the user pointed at
                (tree / data_path).parent.mkdir(parents=True, exist_ok=True)
                if (repo / data_path).is_dir():
                    shutil.copytree(repo / data_path, tree / data_path)
                else:
                    shutil.copy2(repo / data_path, tree / data_path)
        yield tree
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=repo, capture_output=True)
        shutil.rmtree(tree, ignore_errors=True)


def _stage_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    if bindir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if (root / "src" / "loraops").is_dir():  # a workspace runs its own checkout's code
        env["PYTHONPATH"] = str((root / "src").resolve())
    env["LORAOPS_PROGRESS"] = "lines"  # progress as log lines (step, loss, lr; answers generated), not bars
    return env


TERMINAL_ADVICE = ("To track the changes with git, run:", "git add ", "To enable auto staging, run:",
                   "dvc config core.autostage", "Use `dvc push` to send your updates")
"""What `dvc repro` tells a person at a terminal after each stage; in a run (often a throw-away worktree) the
flow commits nothing and pushes nothing itself, so these lines are dropped from the run's log."""


CommandRunner = Callable[[list[str]], int]
"""Runs ``loraops ARGS`` in this process and returns its exit code (``loraops.cli.invoke``)."""


@contextlib.contextmanager
def imports_outside_the_collector() -> Iterator[None]:
    """The run's imports with Python's cyclic garbage collector off, then frozen (``gc.freeze``).

    Importing Prefect, MLflow, DVC, torch and transformers leaves about a million long-lived objects. Left to the
    collector, each full collection during the run walks all of them again: a dozen collections, 2.3 s of a quick
    run, none of which frees anything (measured, docs/decisions.md). Frozen, they are never walked; what the stages
    create afterwards is collected as usual."""
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def import_what_runs_use() -> None:
    """Import what a finetune run's tasks would import one by one (torch for the checks, DVC for the stages, MLflow's
    local store, the trainer's libraries), inside ``imports_outside_the_collector``: `loraops run` does it while
    Prefect's temporary server starts on the other core, a run started by a deployment when its flow starts."""
    import datasets  # noqa: F401 - imported for later use, see above
    import dvc.repo  # noqa: F401 - as above
    import peft  # noqa: F401 - as above
    import torch  # noqa: F401 - as above
    import transformers.trainer  # noqa: F401 - as above

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401 - as above
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401 - as above


def run_stage(stage: str, root: Path = Path("."), say: Callable[[str], Any] = print,
              env: dict[str, str] | None = None, in_process: CommandRunner | None = None) -> bool:
    """Run one DVC stage as `dvc repro --single-item` does; return whether its command ran.

    Only the stage itself: the flows run the stages in their order, so checking every upstream stage again before
    each one would only repeat the previous task's work (about 0.3 s a stage).

    DVC skips a stage whose code, params sections and inputs are unchanged (dvc.lock, run cache). Every
    line DVC and the stage print goes to ``say`` (the Prefect run logger in a flow) as it comes; ``env`` adds
    environment variables (a sweep trial's Optuna study).

    With ``in_process``, DVC runs in this process (its Python API) and a stage whose command is ``loraops …`` runs
    through ``in_process`` instead of a new interpreter, when this process runs the same loraops code as ``root``
    would (its checkout's ``src/loraops``) and no other stage is running here: the same command, the same lock file
    and cache, without an interpreter start and torch import per stage. Anything else goes through `dvc repro`.

    Raises:
        StageError: the stage failed; the message carries its error lines.
    """
    if in_process is not None and runs_this_code(root) and _IN_PROCESS.acquire(blocking=False):
        try:
            return _repro_in_process(stage, root, say, env or {}, in_process)
        finally:
            _IN_PROCESS.release()
    return _repro_subprocess(stage, root, say, env or {})


def _repro_subprocess(stage: str, root: Path, say: Callable[[str], Any], env: dict[str, str]) -> bool:
    dvc = str(Path(sys.executable).parent / "dvc")
    proc = subprocess.Popen([dvc, "repro", "--single-item", stage], cwd=root, env=_stage_env(root) | env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8",
                            errors="replace", bufsize=1)
    ran, errors = False, []
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line.strip() or line.strip().startswith(TERMINAL_ADVICE):
                continue
            ran = ran or f"Running stage '{stage}'" in line
            if line.lower().startswith("error"):
                errors.append(line)
            say(redact_text(line))
        code = proc.wait()
    except BaseException:  # interrupted: stop the stage too
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        raise
    if code != 0:
        detail = "; ".join(errors[-3:]) or f"dvc repro exited with {code}"
        raise StageError(f"stage {stage} failed: {detail}")
    return ran


_IN_PROCESS = threading.Lock()
"""One in-process stage at a time: a stage changes the process's directory, environment and output streams (threads
such as a sweep's concurrent trials take the `dvc repro` path)."""


def runs_this_code(root: Path) -> bool:
    """Whether `loraops` started in ``root`` would run the code this process runs: ``root`` has no checkout of its
    own (the installed package runs), or its ``src/loraops`` holds the same files (a worktree of the same commit)."""
    import loraops

    here, theirs = Path(loraops.__file__).parent, root / "src" / "loraops"
    if not theirs.is_dir() or theirs.resolve() == here.resolve():
        return True
    return _tree_digest(theirs) == _tree_digest(here)


def _tree_digest(folder: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _repro_in_process(stage: str, root: Path, say: Callable[[str], Any], env: dict[str, str],
                      invoke: CommandRunner) -> bool:
    """`dvc repro STAGE` through DVC's Python API, with DVC's command runner swapped, for this call only, for one
    that runs ``loraops …`` commands through ``invoke`` (others still start their shell command)."""
    import shlex
    import traceback

    import dvc.dvcfile as dvcfile
    import dvc.stage.run as dvc_run
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.stage.exceptions import StageCmdFailedError

    ran: list[str] = []
    errors: list[str] = []
    shell_run = dvc_run._run

    def run_command(executable: Any, cmd: str, **kwargs: Any) -> None:
        ran.append(kwargs["env"].get("DVC_STAGE", ""))
        argv = shlex.split(cmd)
        if argv[:1] != ["loraops"]:
            return shell_run(executable, cmd, **kwargs)
        stage_vars = {key: kwargs["env"][key] for key in ("DVC_ROOT", "DVC_STAGE") if key in kwargs["env"]}
        with _environment(stage_vars), contextlib.chdir(kwargs["cwd"] or root), _own_print():
            try:
                code = invoke(argv[1:])
            except Exception:  # noqa: BLE001 - a bug in a stage fails the stage, as a crashed process would
                sys.stderr.write(traceback.format_exc())
                code = 1
        _free_accelerator_memory()
        if code != 0:
            raise StageCmdFailedError(cmd, code)
        return None

    dvc_logger = logging.getLogger("dvc")  # `import dvc` gives it handlers that print to the terminal
    handlers, level, propagate = dvc_logger.handlers, dvc_logger.level, dvc_logger.propagate
    dvc_logger.handlers, dvc_logger.level, dvc_logger.propagate = [_SayHandler(say)], logging.INFO, False
    dvc_run._run = run_command
    dvc_modify_yaml, dvcfile.modify_yaml = dvcfile.modify_yaml, _lock_read_fast(dvcfile.modify_yaml)
    try:
        with _environment(_stage_env(root) | env), contextlib.chdir(root), _lines_to(say, errors), \
                Repo(".") as repo:
            repo.reproduce(stage, single_item=True)  # targets are relative to the working directory, as at a terminal
    except DvcException as exc:
        cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
        detail = "; ".join(errors[-3:]) or f"{exc}{cause}"
        raise StageError(f"stage {stage} failed: {detail}") from exc
    finally:
        dvc_run._run = shell_run
        dvcfile.modify_yaml = dvc_modify_yaml
        dvc_logger.handlers, dvc_logger.level, dvc_logger.propagate = handlers, level, propagate
    return stage in ran


def _lock_read_fast(modify_yaml: Any) -> Any:
    """DVC's ``modify_yaml`` (read a YAML file, let the caller change it, write it back), reading ``dvc.lock`` with
    YAML's C parser instead of the round-trip one that keeps comments: DVC writes that file, without comments.

    DVC rewrites the lock after every stage; the round-trip parser takes 0.13 s of the 0.6 s of DVC bookkeeping
    around a stage, the C one 0.02 s. What is written is the same: the same writer, given the same values
    (tests/test_paths.py checks it byte for byte on the project's lock). Any other file goes to ``modify_yaml``."""

    @contextlib.contextmanager
    def modify(path: Any, fs: Any = None) -> Iterator[Any]:
        if os.path.basename(os.fspath(path)) != DVC_LOCK.name:
            with modify_yaml(path, fs=fs) as data:
                yield data
            return
        from dvc.utils.serialize._common import _modify_data
        from dvc.utils.serialize._yaml import _dump, parse_yaml

        with _modify_data(path, parse_yaml, _dump, fs=fs) as data:
            yield data

    return modify


_PRINT = builtins.print
"""The interpreter's own ``print``, kept before a flow with ``log_prints`` replaces it with one that logs."""


@contextlib.contextmanager
def _own_print() -> Iterator[None]:
    """The interpreter's ``print`` for an in-process stage, as in a stage process of its own: what the stage prints
    reaches the run log through the stage's redirected output anyway, and libraries that capture ``sys.stdout``
    around a print (dill disassembles functions that way while `datasets` fingerprints them) keep it to themselves
    instead of having Prefect log it."""
    patched, builtins.print = builtins.print, _PRINT
    try:
        yield
    finally:
        builtins.print = patched


class _SayHandler(logging.Handler):
    """DVC's log records (``Running stage 'x':``, ``> loraops x``, ``Updating lock file``) as lines for ``say``."""

    def __init__(self, say: Callable[[str], Any]) -> None:
        super().__init__(logging.INFO)
        self.say = say

    def emit(self, record: logging.LogRecord) -> None:
        for line in record.getMessage().splitlines():
            if line.strip() and not line.strip().startswith(TERMINAL_ADVICE):
                self.say(redact_text(line))


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set for the block, as it was afterwards."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _LineWriter(io.TextIOBase):
    """A text stream that hands each complete line to ``say`` (``\\r`` ends a line too, as in a subprocess's text
    output), keeping the lines that start with "error" in ``error_lines``."""

    encoding = "utf-8"

    def __init__(self, say: Callable[[str], Any], errors: list[str], fallback: Any) -> None:
        self.say, self.error_lines, self.fallback, self.pending, self.busy = say, errors, fallback, "", False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if self.busy:  # ``say`` itself writes to this stream (a logging handler on sys.stderr): let it through
            return self.fallback.write(text)
        self.pending += text
        *lines, self.pending = self.pending.replace("\r", "\n").split("\n")
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        if self.pending:
            line, self.pending = self.pending, ""
            self._emit(line)

    def _emit(self, line: str) -> None:
        line = line.rstrip()
        if not line.strip() or line.strip().startswith(TERMINAL_ADVICE):
            return
        if line.lower().startswith("error"):
            self.error_lines.append(line)
        self.busy = True
        try:
            self.say(redact_text(line))
        finally:
            self.busy = False


@contextlib.contextmanager
def _lines_to(say: Callable[[str], Any], errors: list[str]) -> Iterator[None]:
    out, err = _LineWriter(say, errors, sys.__stdout__), _LineWriter(say, errors, sys.__stderr__)
    try:
        with contextlib.redirect_stdout(cast(TextIO, out)), contextlib.redirect_stderr(cast(TextIO, err)):
            yield
    finally:
        out.flush()
        err.flush()


def _free_accelerator_memory() -> None:
    """After an in-process stage: what its models held on the GPU goes back (the next stage loads its own)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


@contextlib.contextmanager
def restored_on_failure(path: Path) -> Iterator[None]:
    """Put ``path`` (params.yaml) back as it was when the block fails, so a failed run leaves no value behind."""
    before = path.read_bytes() if path.exists() else None
    try:
        yield
    except BaseException:
        if before is not None and path.exists() and path.read_bytes() != before:
            path.write_bytes(before)
        raise


_FOUND_CHANGED: set[tuple[str, str, str]] = set()
"""(project, params, dvc.lock) that this process already found changed: `loraops run` asks before Prefect starts and
its flow asks again (for the runs a deployment starts); within one run the second answer is the first."""


def unchanged(root: Path, params: Params, registry_first: bool = False) -> str | None:
    """Say so when a run would change nothing: every stage up to date and its adapter already registered and gated.

    Returns the message for the user, or None when something changed (or was never registered). A None is kept for
    the same project, params and dvc.lock, so the flow of a `loraops run` does not ask DVC again (0.5 s): a stale
    None can only make a run go on, and then DVC skips what is up to date and ``already_decided`` ends it.

    ``registry_first``: ask MLflow whether the current adapter was ever registered before asking DVC whether every
    stage is up to date, for a caller that has MLflow imported and its store open anyway (the flow): one query
    instead of DVC's half second when the answer is no (a fresh clone or worktree). `loraops run` asks before it
    imports MLflow, so DVC first.
    """
    import hashlib

    lock_file = root / DVC_LOCK
    key = (str(root.resolve()), params.model_dump_json(),
           hashlib.md5(lock_file.read_bytes()).hexdigest() if lock_file.is_file() else "")
    if key in _FOUND_CHANGED:
        return None
    same = _unchanged(root, params, registry_first)
    if same is None:
        _FOUND_CHANGED.add(key)
    return same


def _unchanged(root: Path, params: Params, registry_first: bool) -> str | None:
    try:
        sha = TrainFigures.read(root).adapter_sha256  # figures of another version's format: not the same run
    except LoraopsError:
        return None
    if sha is None:  # no adapter recorded: nothing registered can be it
        return None
    if registry_first:
        found = _registered_as(root, params, sha)
        if not found or _stages_changed(root):
            return None
    else:
        if _stages_changed(root):
            return None
        found = _registered_as(root, params, sha)
        if not found:
            return None
    import hashlib

    import mlflow

    # The same adapter bytes registered from an older dvc.lock (only stages or code around training changed, e.g.
    # a new stage) would be registered as that same version again: nothing new either.
    lock = hashlib.md5((root / DVC_LOCK).read_bytes()).hexdigest()
    same = [v for v in found if v.tags.get("lineage.dvc_lock_md5") == lock] or found
    if params.registry.auto_promote and "gate.verdict" not in same[0].tags:
        return None
    version, client, name = same[0], mlflow.MlflowClient(), params.registry.model_name
    try:
        production = f"v{client.get_model_version_by_alias(name, 'production').version}"
    except mlflow.exceptions.MlflowException:
        production = "no production yet"
    verdict = version.tags.get("gate.verdict", "not gated (auto_promote off)")
    what = ("code, params and data are those of" if version.tags.get("lineage.dvc_lock_md5") == lock
            else "every stage is up to date and its adapter is, byte for byte, that of")
    return (f"unchanged: {what} {name} v{version.version} (MLflow run {version.run_id}); "
            f"nothing to run. Its gate verdict: {verdict}; production: {production}.")


def _stages_changed(root: Path) -> bool:
    """Whether DVC finds any stage out of date (or cannot tell: not a DVC project, a broken dvc.yaml)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with contextlib.chdir(root), Repo(".") as repo:
            return bool(repo.status(targets=list(STAGES)))
    except DvcException:  # the run itself will say what is wrong
        return True


def _registered_as(root: Path, params: Params, sha: str) -> list[Any]:
    """The registered versions of ``params.registry.model_name`` whose adapter is ``sha`` (none when MLflow says
    no or cannot say)."""
    import mlflow

    from loraops.registry.tracking import tracking_setup
    from loraops.registry.versions import SHA_TAG

    tracking_setup(root)
    name = params.registry.model_name
    try:
        return list(mlflow.MlflowClient().search_model_versions(f"name = '{name}' and tags.`{SHA_TAG}` = '{sha}'"))
    except mlflow.exceptions.MlflowException:
        return []


def already_decided(root: Path, params: Params, version: str) -> str | None:
    """Say so when a run's adapter turned out to be, byte for byte, that of a version already decided on (gated,
    waiting for a reviewer, or registered without auto-promotion) from the same code, params and data (its lineage's
    dvc.lock): the same data version published again, a UI run with unchanged settings. None when that version still
    needs the gate, or when something around the adapter changed (an evaluation setting: the gate judges anew)."""
    import hashlib

    import mlflow

    client, name = mlflow.MlflowClient(), params.registry.model_name
    found = client.get_model_version(name, version)
    lock = hashlib.md5((root / DVC_LOCK).read_bytes()).hexdigest() if (root / DVC_LOCK).is_file() else None
    if lock is None or found.tags.get("lineage.dvc_lock_md5") != lock:
        return None
    approval = params.registry.gate.require_approval
    if "gate.verdict" not in found.tags and params.registry.auto_promote and not approval:
        return None
    verdict = found.tags.get("gate.verdict") or ("waiting for a reviewer (registry.gate.require_approval)" if approval
                                                 else "not gated (auto_promote off)")
    try:
        production = f"v{client.get_model_version_by_alias(name, 'production').version}"
    except mlflow.exceptions.MlflowException:
        production = "no production yet"
    return (f"unchanged: the adapter trained is, byte for byte, that of {name} v{version} (MLflow run "
            f"{found.run_id}); not judged again. Its gate verdict: {verdict}; production: {production}.")


def check_clean(lineage: dict[str, Any], allow_dirty: bool) -> None:
    """Refuse to register from a dirty tree unless allowed (the diff is then stored in the lineage card).

    Raises:
        RegistryError: when tracked files other than params.yaml/dvc.lock have uncommitted changes.
    """
    if lineage["git_dirty"] and not allow_dirty:
        files = ", ".join(lineage["git_dirty_files"][:5])
        raise RegistryError(f"refusing to register from a dirty tree ({files}); commit first or pass allow_dirty / --allow-dirty")
