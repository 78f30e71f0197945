"""`loraops run | sweep | deploy | init-data`: the Prefect flows, and a params file for a new dataset."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Optional, cast

import typer

from loraops.cli import ParamsOpt, SetOpt, app, friendly, params_of, user_path
from loraops.core.errors import LoraopsError
from loraops.core.paths import PARAMS


def prefect_defaults() -> None:
    """Offline-friendly Prefect settings unless the user set them: no telemetry, a patient ephemeral start."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    from loraops.core.concurrency import local_defaults

    local_defaults()


def start_temporary_server() -> Callable[[], contextlib.AbstractContextManager[object]]:
    """Start Prefect's temporary server now when the run will need one (no PREFECT_API_URL), so it comes up while
    this process imports the flow, MLflow and the rest. Returns the call that waits until it answers, points
    Prefect at it (``orchestration.temporary_server``) and gives the settings to run the flow with."""
    from loraops.orchestration.temporary_server import TemporaryServer

    if os.environ.get("PREFECT_API_URL"):
        return contextlib.nullcontext
    server = TemporaryServer().start()  # before importing Prefect: its settings import alone takes a second
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if PREFECT_API_URL.value():  # a Prefect profile names a server
        server.stop()
        return contextlib.nullcontext

    def ready() -> contextlib.AbstractContextManager[object]:
        server.ready(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        return _without_heartbeats()

    return ready


def _without_heartbeats() -> contextlib.AbstractContextManager[object]:
    """Prefect's settings for a flow on the run's own temporary server: no flow-run heartbeats. They exist so a
    server can tell that a run's process died; this server dies with it. (Their thread also sleeps in one-second
    steps, and the flow's end waits for it: half a second a run.)"""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    return temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})


def _quiet_expected_tracebacks() -> None:
    """Prefect logs every task failure with its traceback; for expected errors the message is enough."""
    import logging

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and isinstance(record.exc_info[1], LoraopsError):
                record.exc_info, record.exc_text = None, None
            return True

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_Filter())


@app.command()
@friendly
def run(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt,
        allow_dirty: bool = typer.Option(False, "--allow-dirty", help="Register from uncommitted code (the diff is recorded).")) -> None:
    """Run the whole finetune flow on Prefect (prepare → train → evaluate → register → gate).

    The run's params are written to params.yaml for DVC (as `dvc exp run -S` does); when validation or a
    stage fails, params.yaml is put back as it was. Nothing changed since the last registered run → "unchanged".
    """
    from loraops.orchestration import workspace

    path = user_path(params)
    resolved = params_of(params, set_)  # refuse bad params (and a base that cannot load) before Prefect starts
    from loraops.modeling.model import check_base

    check_base(resolved.model)
    if not set_ and path.resolve() == PARAMS.resolve():
        same = workspace.unchanged(Path("."), resolved)
        if same is not None:
            typer.echo(same)
            return
    prefect_defaults()
    with workspace.imports_outside_the_collector():  # Prefect's settings too; the rest while the server starts
        server_ready = start_temporary_server()
        from loraops.flows.finetune import finetune

        _quiet_expected_tracebacks()
        _terminate_cleanly()
        workspace.import_what_runs_use()
    with server_ready(), workspace.restored_on_failure(PARAMS):
        try:
            result = _outcome_of(finetune(params_file=str(path), overrides=list(set_ or []), allow_dirty=allow_dirty,
                                          isolate=False, use_form=False, return_state=True))
        except KeyboardInterrupt as stop:
            typer.secho(f"stopped ({stop or 'interrupted'}): the MLflow run is closed and the gpu slot released",
                        err=True, fg=typer.colors.YELLOW)
            raise typer.Exit(130) from None
    typer.echo(result["summary_text"])
    _exit_for(result["outcome"])


def _outcome_of(state: Any) -> dict[str, Any]:
    """A flow run's result, whether its outcome ended it Completed or Failed-type (a refusal is red in the UI: see
    ``flows/finetune.final_state``); a run that really failed raises its error."""
    from loraops.core.outcomes import NOT_SUCCESS

    if state.is_failed() and state.name in NOT_SUCCESS:
        return cast(dict[str, Any], state.result(raise_on_failure=False))
    return cast(dict[str, Any], state.result())


def _exit_for(outcome: str) -> None:
    """Exit with the documented code of the run's outcome (0 promoted/registered/unchanged, 3 refused, 4 worse than
    base; README "Exit codes")."""
    from loraops.judge.report import exit_code

    code = exit_code(outcome)
    if code:
        raise typer.Exit(code)


@app.command()
@friendly
def sweep(params: Path = ParamsOpt, set_: Optional[list[str]] = SetOpt,
          allow_dirty: bool = typer.Option(False, "--allow-dirty", help="Register from uncommitted code (the diff is recorded).")) -> None:
    """Search the settings (sweep.space) with Optuna: sweep.trials trials, each a tracked MLflow child run in its own
    worktree; the best by the validation objective is evaluated, registered as candidate and gated.

    The trials start from the committed project (git worktrees) with the params file and --set values applied;
    params.yaml is not changed.
    """
    path = user_path(params)
    # refuse bad params (an unknown or empty search range, sweep.trials <= 0, a base that cannot load) before Prefect
    from loraops.modeling.model import check_base

    check_base(params_of(params, set_).model)
    from loraops.orchestration import workspace

    prefect_defaults()
    with workspace.imports_outside_the_collector():  # as `loraops run`
        server_ready = start_temporary_server()
        from loraops.flows.sweep import sweep_flow

        _quiet_expected_tracebacks()
        _terminate_cleanly()
        workspace.import_what_runs_use()
    with contextlib.suppress(ValueError):
        path = path.resolve().relative_to(Path.cwd().resolve())
    try:
        with server_ready():
            result = _outcome_of(sweep_flow(params_file=str(path), overrides=list(set_ or []),
                                            allow_dirty=allow_dirty, use_form=False, return_state=True))
    except KeyboardInterrupt as stop:
        typer.secho(f"stopped ({stop or 'interrupted'}): the MLflow runs are closed and the gpu slot released",
                    err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(130) from None
    typer.echo(result["summary_text"])
    _exit_for(result["outcome"])


def _terminate_cleanly() -> None:
    """SIGTERM ends `loraops run` as Ctrl-C does: the running stage is stopped, context managers release the
    gpu slot, the flow's crash hooks mark its MLflow run KILLED. (Python's default SIGTERM skips all that.)"""
    import signal

    def stop(signum: int, _frame: Any) -> None:
        import psutil

        for child in psutil.Process().children(recursive=True):  # `dvc repro` and its `loraops train`, not Prefect's server
            with contextlib.suppress(psutil.Error):
                command = " ".join(child.cmdline())
                if ("loraops" in command or "dvc" in command) and "uvicorn" not in command and "prefect" not in command:
                    child.terminate()
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, stop)


@app.command()
@friendly
def deploy(params: Path = ParamsOpt,
           pool: Optional[str] = typer.Option(None, "--pool", help="Put the deployments on this Prefect process work "
                                                                   "pool (created if missing) instead of serving them "
                                                                   "here; `prefect worker start --pool NAME` on each "
                                                                   "GPU host runs them."),
           source: Optional[str] = typer.Option(None, "--source", help="With --pool: the git URL workers clone "
                                                                       "(default: the remote origin).")) -> None:
    """Serve the project's Prefect deployments (finetune, promote, rollback, reproduce, sweep), each named after the
    flow and the registered model: finetune/finetune-interior-qa-lora, promote/promote-interior-qa-lora, …; or, with
    --pool, register them on a work pool for workers on several hosts."""
    prefect_defaults()
    chosen = user_path(params)
    with contextlib.suppress(ValueError):
        chosen = chosen.resolve().relative_to(Path.cwd())  # the form shows the project-relative name
    if pool:
        from loraops.flows.deploy import deploy_to_pool
        from loraops.orchestration.pool import project_source

        url, branch = project_source(Path("."))
        names = deploy_to_pool(pool, str(chosen), source)
        typer.echo(f"deployed {', '.join(names)} on the work pool {pool}: workers clone {source or url} at branch "
                   f"{branch} (push your commits there) and pull the data from the DVC remote. On each GPU host: "
                   f"prefect worker start --pool {pool}")
        return
    from loraops.flows.deploy import serve_all

    serve_all(str(chosen))


@app.command("init-data")
@friendly
def init_data(data: Path = typer.Argument(..., help="Your data file (CSV, TSV, JSONL, JSON or Parquet)."),
              out: Optional[Path] = typer.Option(None, "--out", help="Params file to write (default configs/<data name>.yaml)."),
              model_name: Optional[str] = typer.Option(None, "--model-name", help="registry.model_name (default <data name>-lora)."),
              force: bool = typer.Option(False, "--force", help="Overwrite an existing params file."),
              params: Path = ParamsOpt) -> None:
    """Write a params file for a new dataset: format and question/answer/category columns guessed from the file."""
    from loraops.stages import datainit

    source = user_path(data)
    target = user_path(out.parent) / out.name if out else Path("configs") / f"{source.stem}.yaml"
    written, guessed = datainit.write_params_for(source, target, params_of(params, None), model_name, force)
    for key, value in guessed.items():
        typer.echo(f"  {key}: {value}")
    typer.echo(f"wrote {written}; check the guesses above, then: loraops run --params {written}")
