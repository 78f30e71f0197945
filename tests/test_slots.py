"""No concurrency slot outlives its holder: a run killed while holding `gpu` does not hang the next one.

Real processes on Prefect's ephemeral API (local mode, as `loraops run` uses it), killed with SIGKILL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

HOLD = """
import signal, sys, time, uuid
signal.signal(signal.SIGINT, signal.default_int_handler)  # a parent that ignores SIGINT (a background job, an
# xdist worker) passes that on; this holder must leave on SIGINT as at a terminal
from loraops.core import concurrency
from loraops.cli.flows import prefect_defaults
prefect_defaults()
concurrency.ensure_gpu_limit()
with concurrency.gpu_slot(print, {"type": "flow_run", "id": sys.argv[1]}):
    print("HELD", flush=True)
    time.sleep(600)
"""
TAKE = """
from loraops.core import concurrency
from loraops.cli.flows import prefect_defaults
prefect_defaults()
concurrency.ensure_gpu_limit()
with concurrency.gpu_slot(lambda m: print(m, flush=True)):
    print("ACQUIRED", flush=True)
"""


def _env(home, **extra):
    env = {**os.environ, "PREFECT_HOME": str(home), "LORAOPS_SLOT_LEASE_SECONDS": "60",
           "LORAOPS_SLOT_WAIT_STEP_SECONDS": "3", **extra}
    env.pop("PREFECT_API_URL", None)
    return env


def _hold_then_kill(home, **extra) -> str:
    holder = str(uuid.uuid4())
    proc = subprocess.Popen([sys.executable, "-c", HOLD, holder], env=_env(home, **extra), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    for line in proc.stdout:  # ends at EOF if the holder failed
        if line.strip() == "HELD":
            break
    assert proc.poll() is None, "the holder never took the slot"
    os.killpg(proc.pid, signal.SIGKILL)  # the holder and its ephemeral server die without any cleanup
    proc.wait()
    return holder


def test_a_killed_holders_slot_is_freed_and_the_wait_is_explained(tmp_path):
    holder = _hold_then_kill(tmp_path)
    take = subprocess.run([sys.executable, "-c", TAKE], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert take.returncode == 0, take.stderr[-2000:]
    assert "ACQUIRED" in take.stdout
    # the lease had not expired when the next run started: it says who holds the slot and since when,
    # then frees the slot once the lease (60 s, never renewed by the dead holder) has expired
    assert f"held by flow_run {holder} since" in take.stdout, take.stdout
    assert take.stdout.index("waiting") < take.stdout.index("ACQUIRED")


def test_a_slot_leaked_without_any_lease_is_freed(tmp_path):
    """A run killed under Prefect's in-memory lease storage leaves a counted slot and no lease at all."""
    _hold_then_kill(tmp_path, PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="prefect.server.concurrency.lease_storage.memory")
    take = subprocess.run([sys.executable, "-c", TAKE], env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert take.returncode == 0 and "ACQUIRED" in take.stdout, take.stderr[-2000:]
    assert "freed 1 slot(s) of the Prefect concurrency limit 'gpu' whose holder is gone" in take.stdout


def test_sigterm_ends_a_waiting_run_cleanly(workspace):
    """A `loraops run` waiting for the gpu slot says so, and SIGTERM ends it: exit 130, its MLflow run closed."""
    env = _env(workspace.parent / "prefect-home")
    hold = subprocess.Popen([sys.executable, "-c", HOLD, str(uuid.uuid4())], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        assert hold.stdout.readline().strip() == "HELD"
        run = subprocess.Popen([sys.executable, "-m", "loraops.cli", "run"], cwd=workspace, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        seen = []
        for line in run.stdout:
            seen.append(line)
            if "waiting" in line and "'gpu'" in line:
                break
        assert run.poll() is None, "".join(seen)[-3000:]
        run.send_signal(signal.SIGTERM)
        rest, _ = run.communicate(timeout=120)
        assert run.returncode == 130, "".join(seen)[-2000:] + rest[-2000:]
        assert "stopped (SIGTERM)" in rest
    finally:
        os.killpg(hold.pid, signal.SIGKILL)
    import mlflow

    from loraops.registry.tracking import tracking_setup

    tracking_setup(workspace)
    client = mlflow.MlflowClient()
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("interior-qa-lora").experiment_id])
    assert mlflow_run.info.status in ("KILLED", "FAILED")


QUEUE = """
import sys, time, uuid
from loraops.core import concurrency
from loraops.cli.flows import prefect_defaults
prefect_defaults()
concurrency.ensure_gpu_limit()
with concurrency.gpu_slot(lambda m: print(m, flush=True), {"type": "flow_run", "id": str(uuid.uuid4())}):
    print("ACQUIRED", sys.argv[1], time.time(), flush=True)
    time.sleep(1)
"""


def test_waiters_take_the_slot_in_the_order_they_asked_for_it(tmp_path):
    """A holder and three runs that ask one after another: when the holder leaves, they get the slot first come,
    first served (Prefect alone hands it to whichever polls first), and the waits name the holder's project and run."""
    import time

    env = _env(tmp_path, LORAOPS_SLOT_WAIT_STEP_SECONDS="2")
    line = tmp_path / "loraops-slots" / "gpu"
    holder = str(uuid.uuid4())
    hold = subprocess.Popen([sys.executable, "-c", HOLD, holder], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    waiters = []
    try:
        assert hold.stdout.readline().strip() == "HELD"
        for name in ("first", "second", "third"):
            waiters.append(subprocess.Popen([sys.executable, "-c", QUEUE, name], env=env, stdout=subprocess.PIPE,
                                            stderr=subprocess.STDOUT, text=True, start_new_session=True))
            deadline = time.time() + 120
            while len(list(line.glob("wait-*.json"))) < len(waiters):  # in line before the next one starts
                assert time.time() < deadline and waiters[-1].poll() is None, waiters[-1].stdout.read()[-2000:]
                time.sleep(0.2)
        time.sleep(6)  # every waiter has polled a few times while the slot was held
    finally:
        os.kill(hold.pid, signal.SIGINT)  # the holder leaves (KeyboardInterrupt: its slot is released)
        hold.wait()
    outputs = [w.communicate(timeout=300)[0] for w in waiters]
    assert all(w.returncode == 0 for w in waiters), outputs
    got = sorted((float(line.split()[2]), line.split()[1]) for out in outputs for line in out.splitlines()
                 if line.startswith("ACQUIRED"))
    assert [name for _, name in got] == ["first", "second", "third"], outputs
    assert "run(s) ahead in line" in outputs[2] and f"held by {Path.cwd().resolve()} · flow_run {holder} for" in outputs[0]


def test_the_temporary_server_of_a_run_answers_keeps_local_mode_and_stops(tmp_path, monkeypatch):
    """`loraops run` serves Prefect's API itself (orchestration.temporary_server): a real uvicorn process over the
    local database; with it the run stays in local mode, a server named by the user does not; stop ends it."""
    from prefect.client.orchestration import get_client

    from loraops.core.concurrency import TEMPORARY_API, local_mode
    from loraops.orchestration.temporary_server import TemporaryServer

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    for name in ("PREFECT_API_URL", TEMPORARY_API):  # recorded first, so the test's end restores them (unset)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    server = TemporaryServer().start()
    try:
        url = server.ready(120)
        assert os.environ["PREFECT_API_URL"] == url and local_mode()
        assert server.warmed.wait(60), "the read-only warm-up calls were not all answered"
        with get_client(sync_client=True) as client:  # Prefect's own client, pointed at it by ready()
            assert client.api_url.host == "127.0.0.1" and client.api_healthcheck() is None
        monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")  # a team server the user named
        assert not local_mode()
    finally:
        process = server.process
        server.stop()
        from prefect.context import refresh_global_settings_context

        for name in ("PREFECT_API_URL", TEMPORARY_API):
            os.environ.pop(name, None)
        refresh_global_settings_context()  # later tests in this worker must not talk to the stopped server
    assert process is not None and process.poll() is not None
    assert "PREFECT_API_URL" not in os.environ


def test_a_runs_imports_are_frozen_out_of_the_collector_and_its_own_server_gets_no_heartbeats():
    """`loraops run`: what its imports leave is frozen out of Python's collector, which is on again afterwards (and stays
    off if it was off); a flow on the run's own temporary server sends no heartbeats, another server keeps them."""
    import gc

    from prefect.settings import get_current_settings

    from loraops.cli.flows import _without_heartbeats
    from loraops.orchestration.workspace import imports_outside_the_collector

    frozen = gc.get_freeze_count()
    try:
        with imports_outside_the_collector():
            assert not gc.isenabled()
            kept = [[index] for index in range(1000)]  # lists: objects the collector tracks
        assert gc.isenabled() and gc.get_freeze_count() >= frozen + len(kept)
        gc.disable()
        with imports_outside_the_collector():
            pass
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
    before = get_current_settings().flows.heartbeat_frequency
    with _without_heartbeats():
        assert get_current_settings().flows.heartbeat_frequency is None
    assert get_current_settings().flows.heartbeat_frequency == before and before is not None


def test_a_killed_runs_temporary_server_ends_with_it(tmp_path):
    """SIGKILL on the process that started the temporary server (a machine's OOM killer, `kill -9` on a run) ends the
    server too: nothing is left holding Prefect's database."""
    import time

    import psutil

    code = ("import sys; from loraops.orchestration.temporary_server import TemporaryServer; s = TemporaryServer()"
            ".start(); print(s.process.pid, flush=True); s.ready(120); print('READY', flush=True); sys.stdin.read()")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    run = subprocess.Popen([sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           stderr=subprocess.DEVNULL, text=True)
    assert run.stdout is not None
    server = int(run.stdout.readline())
    assert run.stdout.readline().strip() == "READY" and psutil.pid_exists(server)
    run.kill()
    run.wait()
    deadline = time.time() + 30
    while psutil.pid_exists(server) and psutil.Process(server).status() != psutil.STATUS_ZOMBIE:
        assert time.time() < deadline, "the temporary server outlived its run"
        time.sleep(0.2)
