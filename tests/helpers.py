"""Helpers the tests import (constants and builders); fixtures live in conftest.py."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx

REPO = Path(__file__).resolve().parents[1]

# Settings that keep a whole train + evaluate in seconds on two CPU cores, and still learn: 150 steps
# take ~4 s and lift morph_f1 from 0 (the untrained base answers garbage) to ~0.12 with a 95% interval
# above 0, so the default gate (significance required) promotes it; a run that learns nothing is refused.
TINY = [
    "model.tiny.layers=1", "model.tiny.vocab_size=1000", "model.max_length=96", "lora.r=8", "lora.alpha=16",
    "train.max_steps=150", "train.eval_steps=50", "train.learning_rate=0.005", "train.logging_steps=10",
    "eval.max_samples=30", "eval.max_new_tokens=32", "eval.bootstrap_samples=200",
    "registry.gate.min_test_size=5",
]


def tiny_overrides(*extra: str) -> list[str]:
    return [*TINY, *extra]


SMALL_LOOP = ["eval.self_test=false", "eval.metrics=[morph_f1]"]
"""The orchestration profile: for tests that check states, files and outcomes rather than what the metrics say. The
tiny model still learns enough to be promoted; the validity self-test (tests/test_validity.py) and the encoder
metrics (tests/test_metrics.py) have tests of their own."""


def small_loop_overrides(*extra: str) -> list[str]:
    return [*TINY, *SMALL_LOOP, *extra]


def _run(cmd: list[str], cwd: Path) -> None:
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)


def make_workspace(dest: Path, overrides: list[str] | None = None) -> Path:
    """A git + DVC copy of the project's tracked files, with the sample data pulled and params set."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        src = REPO / name
        if src.is_file() and not name.startswith(("mlruns/", "dvc-remote/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    _run(["git", "init", "-q", "-b", "main"], dest)
    _run(["git", "config", "user.email", "ci@loraops.invalid"], dest)
    _run(["git", "config", "user.name", "loraops-ci"], dest)
    dvc = str(Path(sys.executable).parent / "dvc")
    _run([dvc, "remote", "modify", "sample", "url", str(REPO / "dvc-remote")], dest)
    _run([dvc, "pull", "-q", "data/raw/interior_qa.csv.dvc", "data/docs.dvc", "data/raw/copy_briefs.csv.dvc"], dest)
    if overrides:
        from loraops.orchestration.workspace import write_params

        write_params("params.yaml", overrides, dest)
    _run(["git", "add", "-A"], dest)
    _run(["git", "commit", "-qm", "workspace"], dest)
    return dest


def run_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`loraops ARGS` in this process (Typer's test runner), for tests of what a command prints and returns rather than
    of a process's life: no interpreter start, torch import or Kiwi load per call. Returns what subprocess.run would."""
    from typer.testing import CliRunner

    from loraops.cli import load_commands

    with contextlib.chdir(cwd):  # the command may chdir to the project root; the test's own directory comes back
        result = CliRunner().invoke(load_commands(), [str(a) for a in args], env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(["loraops", *map(str, args)], result.exit_code, result.stdout, result.stderr)


def copy_project(src: Path, dest: Path) -> Path:
    """A trained project copied to ``dest`` for a test to change: files, git, DVC cache and the MLflow store, whose
    artifact locations (absolute file URIs) are rewritten to the copy's own folder."""
    import sqlite3

    shutil.copytree(src, dest, symlinks=True, ignore=shutil.ignore_patterns("tmp"))  # .dvc/tmp: locks, state
    old, new = str(src.resolve()), str(dest.resolve())
    with contextlib.closing(sqlite3.connect(dest / "mlruns/mlflow.db")) as db, db:
        for (table,) in db.execute("select name from sqlite_master where type = 'table'").fetchall():
            for column in [c[1] for c in db.execute(f"pragma table_info('{table}')") if c[2].upper() in ("TEXT", "VARCHAR")
                           or c[2].upper().startswith("VARCHAR")]:
                db.execute(f'update "{table}" set "{column}" = replace("{column}", ?, ?) where instr("{column}", ?) > 0',
                           (old, new, old))
    return dest


@dataclass
class Golden:
    """The session's trained project (tests/conftest.py `golden`): v1 production, v2 refused, v3 candidate."""
    root: Path
    runs: list[subprocess.CompletedProcess]


_DRIVER = """
import json, shutil, sys
from pathlib import Path
from loraops.cli import invoke

commands, keep, kept = json.loads(sys.argv[1]), json.loads(sys.argv[2]), Path(sys.argv[3])
codes = []
for number, argv in enumerate(commands):
    for stream in (sys.stdout, sys.stderr):
        print(f"\\n=== command {number} ===", file=stream, flush=True)
    codes.append(invoke(argv))
    for name in keep:
        if Path(name).is_file():
            (kept / str(number) / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(name, kept / str(number) / name)
for stream in (sys.stdout, sys.stderr):
    print("\\n=== exit codes " + json.dumps(codes), file=stream, flush=True)
"""


def loraops_in_one_process(cwd: Path, commands: list[list[str]], env: dict[str, str] | None = None,
                           keep: tuple[str, ...] = (), kept: Path | None = None,
                           timeout: int = 1800) -> list[subprocess.CompletedProcess]:
    """`loraops ARGS` for each of ``commands``, one after another in one new process (`loraops.cli.invoke`, the
    commands' own code): the later `loraops run`s use the first one's imports and its temporary Prefect server
    instead of starting their own. Returns each command's output and exit code; after each, the files named in
    ``keep`` (relative to ``cwd``) are copied to ``kept/N/``, for checks of what that command left."""
    import json
    import re

    done = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(commands), json.dumps(list(keep)), str(kept or cwd)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    ended = re.search(r"=== exit codes (\[.*\])", done.stdout)
    assert done.returncode == 0 and ended, done.stdout[-3000:] + done.stderr[-3000:]
    outs, errs = (re.split(r"\n=== command \d+ ===\n", text)[1:] for text in (done.stdout, done.stderr))
    return [subprocess.CompletedProcess(["loraops", *argv], code, out, err)
            for argv, code, out, err in zip(commands, json.loads(ended.group(1)), outs, errs)]


# Servers the integration tests start on loopback and stop themselves


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, seconds: float = 120, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited: {log.read_text()[-2000:] if log else ''}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {seconds}s")


def start_server(cmd: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """A server in its own process group (stop_server ends all of it). An MLflow server starts without its job runner,
    as scripts/team_stack.py starts it: loraops submits no MLflow jobs, and with the runner's polling consumers a server
    took 30 s of CPU in its first minute here, not 7 (unless ``env`` says otherwise)."""
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop_server(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def prefect_api(method: str, url: str, **kwargs) -> Any:
    """One Prefect REST call, retried as Prefect's own client does: a 503 means "retry" (its SQLite database was
    busy with the runs' own writes); anything else that is not 2xx raises. Returns the JSON body."""
    for wait in (1, 2, 4, 8, 16, 0):
        response = httpx.request(method, url, timeout=10, **kwargs)
        if response.status_code != 503 or not wait:
            return response.raise_for_status().json()
        time.sleep(wait)


@contextlib.contextmanager
def prefect_with_deployments(tmp: Path, ws: Path) -> Iterator[dict[str, Any]]:
    """A Prefect server with its UI on loopback, and the project's flows served on it by `loraops deploy`."""
    bin_dir = Path(sys.executable).parent
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_API_URL": api}
    env.pop("PREFECT_API_URL", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    server = start_server([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                          tmp / "prefect.log", tmp, env)
    deploy = None
    try:
        wait_http(f"{api}/health", 180, server, tmp / "prefect.log")
        deploy = start_server([sys.executable, "-m", "loraops.cli", "deploy"], tmp / "deploy.log", ws,
                              {**env, "PREFECT_API_URL": api})
        deadline = time.time() + 180
        while len(prefect_api("POST", f"{api}/deployments/filter", json={})) < 4:
            assert deploy.poll() is None and time.time() < deadline, (tmp / "deploy.log").read_text()[-3000:]
            time.sleep(2)
        yield {"api": api, "ui": f"http://127.0.0.1:{port}", "ws": ws, "log": tmp / "deploy.log", "tmp": tmp,
               "env": {**env, "PREFECT_API_URL": api}}
    finally:
        if deploy is not None:
            stop_server(deploy)
        stop_server(server)


def trigger_finetune(api: str, learning_rate: float) -> str:
    """What the UI's Run → Custom run does: read the deployment's defaults, change a field, create a flow run."""
    dep = prefect_api("GET", f"{api}/deployments/name/finetune/finetune-interior-qa-lora")
    parameters = dep["parameters"]
    parameters["learning_rate"] = learning_rate  # the form's first group: the settings people change most
    return prefect_api("POST", f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters})["id"]


def wait_flow_runs(api: str, ids: list[str], seconds: float) -> dict[str, dict]:
    deadline, states = time.time() + seconds, {}
    while time.time() < deadline:
        states = {i: prefect_api("GET", f"{api}/flow_runs/{i}") for i in ids}
        if all(s["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in states.values()):
            return states
        time.sleep(3)
    raise TimeoutError(f"flow runs not finished: { {i: s['state_type'] for i, s in states.items()} }")


OUTCOME_TYPES = {"Promoted": "COMPLETED", "Registered": "COMPLETED", "Unchanged": "COMPLETED", "Approved": "COMPLETED",
                 "Refused": "FAILED", "Worse than base": "FAILED", "Rejected": "FAILED", "Timed out": "FAILED"}
"""A finished run's state name → its type: an outcome that is no success is a Failed-type state (red in the UI)."""


def ended_with_an_outcome(state: dict) -> bool:
    """The flow run ended with one of loraops' outcomes (not crashed, not failed by an error), typed as it should be."""
    return OUTCOME_TYPES.get(state["state_name"]) == state["state_type"]
