"""The `loraops` command line (Typer), one module per command group; each command is a thin shell over library code.

- ``stages``: the DVC stages ``prepare``, ``train``, ``evaluate`` and ``score`` (what ``dvc.yaml`` runs);
- ``flows``: ``run`` and ``deploy`` (the Prefect flows), ``init-data``;
- ``models``: ``promote``, ``rollback``, ``ask``, ``reproduce`` (the registry);
- ``review``: the human rubric review sheets;
- ``judge``: ``judge calibrate`` (the LLM judge's agreement with the raters);
- ``serving``: ``serve`` (OpenAI-compatible API), ``demo`` (Gradio comparison + ratings), ``export``.

Only the module of the command being run is imported (:data:`COMMANDS`, :func:`load_commands`), so a DVC stage's
code dependencies are its own. Every command works from any directory of a project (the root is the nearest folder above with
``params.yaml`` and ``dvc.yaml``, or ``--project`` / ``LORAOPS_PROJECT``), takes ``--params FILE`` and
repeated ``--set dotted.key=value``. Expected failures (bad data, bad params, missing models or versions,
a failed stage) print one message and exit 2, without a traceback; a refused promotion exits 1.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from loraops.core.config import Params, load_params
from loraops.core.errors import ConfigError, LoraopsError
from loraops.core.paths import PARAMS

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Domain Q&A data → a gated, traceable LoRA adapter.")

ParamsOpt = typer.Option(PARAMS, "--params", help="Params file (relative to where you are, else to the project root).")
SetOpt = typer.Option(None, "--set", help="Override a param: dotted.key=value (repeatable).")

_ORIGIN = [Path.cwd()]
"""Where the command was started (set per invocation); file arguments are read relative to it."""


def find_project(start: Path) -> Path | None:
    """The nearest folder at or above ``start`` holding both ``params.yaml`` and ``dvc.yaml``."""
    for folder in [start, *start.parents]:
        if (folder / PARAMS).is_file() and (folder / "dvc.yaml").is_file():
            return folder
    return None


def user_path(path: Path) -> Path:
    """A path the user typed: relative to where the command started when it exists there, else to the project root."""
    if path.is_absolute() or not (_ORIGIN[0] / path).exists():
        return path
    return (_ORIGIN[0] / path).resolve()


@app.callback()
def _project(project: Optional[Path] = typer.Option(
        None, "--project", envvar="LORAOPS_PROJECT",
        help="Project folder (params.yaml + dvc.yaml); default: the nearest one above the current directory.")) -> None:
    """Run in the project root, with library noise a user cannot act on turned down."""
    _ORIGIN[0] = Path.cwd()
    root = find_project(project.resolve() if project else Path.cwd())
    if root is None and project is not None:
        typer.secho(f"error: {project}: no params.yaml and dvc.yaml here or above (--project / LORAOPS_PROJECT)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    if root is not None and root != Path.cwd():
        os.chdir(root)
    quiet_libraries()


def quiet_libraries() -> None:
    """Warnings and INFO lines from MLflow, transformers, Prefect's client and friends that say nothing to act on."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    if os.environ.get("LORAOPS_SHOW_WARNINGS"):
        return
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Successfully registered model …": loraops says it
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("mlflow", "alembic", "httpx", "transformers", "peft", "accelerate", "urllib3", "filelock", "bm25s"):
        logging.getLogger(name).setLevel(logging.ERROR)


def friendly(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected errors (every ``LoraopsError``) into one line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except LoraopsError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except Exception as exc:  # noqa: BLE001 - only the tracking server's refusals are expected; others re-raise
            refusal = _server_refusal(exc) or _disk_full(exc)
            if refusal is None:
                raise
            typer.secho(f"error: {refusal}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def _server_refusal(exc: Exception) -> str | None:
    """An MLflow server's 401/403 as one line naming the user, or None for any other error."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return None
    denied = exc.error_code == "PERMISSION_DENIED" or "error code 403" in exc.message
    unknown = exc.error_code == "UNAUTHENTICATED" or "error code 401" in exc.message
    if not (denied or unknown):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "anonymous (MLFLOW_TRACKING_USERNAME not set)"
    what = "is not allowed to do this" if denied else "could not sign in"
    return (f"the MLflow server refused: user {user} {what} ({exc.message.splitlines()[0][:200]}); in locked-down "
            "team mode only the loraops service account may register models and move aliases")


def _disk_full(exc: Exception) -> str | None:
    """Disk full (or over a quota or file-size limit) as one line, or None for any other error.

    Python says OSError ENOSPC/EDQUOT/EFBIG; torch ("file write failed") and safetensors ("os error 28") say it in
    their own exception's message.
    """
    import errno

    codes = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    markers = ("No space left on device", "Disk quota exceeded", "File too large", "os error 28", "os error 27",
               "file write failed")  # safetensors and torch name the OS error only in their message
    full = (isinstance(exc, OSError) and exc.errno in codes) or any(m in str(exc) for m in markers)
    if not full:
        return None
    where = getattr(exc, "filename", None) or Path.cwd()
    return (f"no space left writing {where} ({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}); free space "
            "(df -h) and rerun. Outputs are written aside and moved into place, so nothing half-written was kept.")


def params_of(path: Path, overrides: Optional[list[str]]) -> Params:
    """Load and validate the params file (typed by the user) with ``--set`` overrides."""
    return load_params(user_path(path), overrides or [])


def registry_params(path: Path, overrides: Optional[list[str]]) -> Params:
    """:func:`params_of` for the commands that work from the registry alone (``ask``, ``serve``, ``demo``): on a host
    with no project (no params.yaml here or above, the default file not given), the defaults with ``--set``
    overrides, since each registered version carries its own prompt and generation settings."""
    from loraops.core.config import apply_overrides, validate

    if path == Path(PARAMS) and not user_path(path).exists() and find_project(Path.cwd()) is None:
        return validate(apply_overrides({}, overrides or []))
    return params_of(path, overrides)


COMMANDS: dict[str, str] = {
    **dict.fromkeys(("prepare", "augment", "index", "retrieve", "train", "evaluate", "score"), "stages"),
    **dict.fromkeys(("run", "sweep", "deploy", "init-data"), "flows"),
    **dict.fromkeys(("promote", "rollback", "ask", "reproduce"), "models"),
    **dict.fromkeys(("serve", "demo", "export"), "serving"),
    "review": "review",
    **dict.fromkeys(("data", "hooks"), "data"),
    "judge": "judge",
}
"""Each command and the ``loraops.cli`` module that defines it. A command imports only its own module when it runs, so
a DVC stage (``cmd: loraops train``) depends on the stage commands' module, not on the demo's or the server's."""


def load_commands(command: str | None = None) -> typer.Typer:
    """Register ``command``'s module on :data:`app` (every module for None or an unknown name, e.g. ``--help``);
    return the app. In-process callers (tests) use ``load_commands()`` before invoking it."""
    import importlib

    for module in sorted({COMMANDS[command]} if command in COMMANDS else set(COMMANDS.values())):
        importlib.import_module(f"loraops.cli.{module}")
    return app


def _command_of(argv: list[str]) -> str | None:
    """The command name in ``argv``: the first word that is not a global option or its value."""
    words = iter(argv)
    for word in words:
        if word == "--project":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def invoke(argv: list[str]) -> int:
    """`loraops ARGV` in this process; returns its exit code. The finetune flow runs its DVC stages' commands
    (``loraops train``…) this way (``loraops.orchestration.workspace.run_stage``): the command's own code, without a new
    interpreter and its imports per stage."""
    import sys

    command = typer.main.get_command(load_commands(_command_of(argv)))
    try:
        code = command.main(args=list(argv), prog_name="loraops", standalone_mode=False)
    except SystemExit as exc:
        if isinstance(exc.code, str):  # sys.exit("message"): printed, exit status 1, as Python does
            print(exc.code, file=sys.stderr)
            return 1
        code = exc.code
    except typer.TyperException as exc:  # a usage error: what the console entry prints, and its exit code
        print(f"error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", 2))
    except typer.Abort:
        return 1
    return code if isinstance(code, int) else 0


__all__ = ["app", "friendly", "invoke", "load_commands", "params_of", "registry_params", "user_path", "ConfigError",
           "COMMANDS"]


def main() -> None:  # pragma: no cover - console entry
    """The ``loraops`` console entry. Once the command has finished and Python's exit handlers have run (files
    closed, logs and MLflow flushed, Prefect's temporary server stopped), the process ends without tearing down
    every module one by one: torch, transformers and the Korean analyser take seconds to unload for nothing."""
    import sys

    try:
        load_commands(_command_of(sys.argv[1:]))()
    except SystemExit as done:
        _exit_now(done.code)
    _exit_now(0)


def _exit_now(code: Any) -> None:  # pragma: no cover - ends the process
    import atexit
    import sys
    import threading

    if isinstance(code, str):
        print(code, file=sys.stderr)
    status = code if isinstance(code, int) else (0 if code is None else 1)
    threading._shutdown()  # type: ignore[attr-defined]  # what the interpreter does first: thread pools told to stop, threads joined
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
