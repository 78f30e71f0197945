"""Team mode: PostgreSQL-backed MLflow server and Prefect server on loopback, deployments served, three
finetune runs triggered through the Prefect REST API exactly as the UI does, checked on the servers.

Everything started here is stopped here. `.ci/run` installs PostgreSQL when it is missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from helpers import (ended_with_an_outcome, free_port, make_workspace, small_loop_overrides, start_server, stop_server,
                     trigger_finetune, wait_flow_runs, wait_http)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@pytest.fixture(scope="module")
def postgres():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        pytest.skip("PostgreSQL server binaries not installed (.ci/run installs them)")
    base = Path(tempfile.mkdtemp(prefix="loraops-pg-", dir="/tmp"))
    base.chmod(0o755)
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(base, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, initdb, "-D", str(base / "data"), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(base / "data"), "-w", "-l", str(base / "log"), "-o",
                    f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    try:
        for db in ("mlflow", "prefect"):
            subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", f"CREATE DATABASE {db}"],
                           check=True, capture_output=True)
        yield f"postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(base / "data"), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def servers(postgres, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("team")
    mlflow_port, prefect_port = free_port(), free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{postgres}/prefect"}
    env.pop("PREFECT_API_URL", None)
    procs = [
        start_server([str(BIN / "mlflow"), "server", "--backend-store-uri", f"postgresql+psycopg2://{postgres}/mlflow",
                "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(mlflow_port),
                "--workers", "1"], tmp / "mlflow.log", tmp, env),
        start_server([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
               tmp / "prefect.log", tmp, env),
    ]
    try:
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", 180, procs[0], tmp / "mlflow.log")
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 180, procs[1], tmp / "prefect.log")
        yield {"mlflow": f"http://127.0.0.1:{mlflow_port}", "prefect": f"http://127.0.0.1:{prefect_port}/api", "tmp": tmp}
    finally:
        for proc in procs:
            stop_server(proc)


def test_team_mode_three_concurrent_runs(servers, tmp_path):
    import mlflow

    ws = make_workspace(tmp_path / "ws", small_loop_overrides("registry.auto_promote=false", "train.max_steps=40",
                                                                  "train.eval_steps=20"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": servers["mlflow"], "PREFECT_API_URL": servers["prefect"],
           "PREFECT_HOME": str(servers["tmp"] / "client-home"), "LORAOPS_GPU_SLOTS": "1"}
    deploy = start_server([sys.executable, "-m", "loraops.cli", "deploy"], tmp_path / "deploy.log", ws, env)
    api = servers["prefect"]
    try:
        deadline = time.time() + 120
        while len(httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()) < 4:
            assert deploy.poll() is None and time.time() < deadline, (tmp_path / "deploy.log").read_text()[-3000:]
            time.sleep(2)
        names = {d["name"] for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()}
        flows = {f["id"]: f["name"] for f in httpx.post(f"{api}/flows/filter", json={}, timeout=10).json()}
        flow_names = {"finetune", "promote", "rollback", "reproduce", "sweep"}
        assert names == {f"{flow}-interior-qa-lora" for flow in flow_names}  # five deployments that read apart
        assert set(flows.values()) == flow_names
        rates = [0.004, 0.002, 0.001]
        ids = [trigger_finetune(api, lr) for lr in rates]
        states = wait_flow_runs(api, ids, 900)
        assert all(ended_with_an_outcome(s) for s in states.values()), (tmp_path / "deploy.log").read_text()[-4000:]
    finally:
        stop_server(deploy)

    assert httpx.post(f"{api}/v2/concurrency_limits/filter", json={}, timeout=10).json()[0]["name"] == "gpu"
    client = mlflow.MlflowClient(tracking_uri=servers["mlflow"], registry_uri=servers["mlflow"])
    experiment = client.get_experiment_by_name("interior-qa-lora")
    runs = client.search_runs([experiment.experiment_id])

    # the gpu limit serialised training: the three training windows do not overlap
    import json

    windows = []
    for r in runs:
        figures = json.loads(Path(client.download_artifacts(r.info.run_id, "stages/train.json", str(tmp_path))).read_text())
        windows.append((figures["started_at"], figures["finished_at"]))
    windows.sort()
    assert len(windows) == 3 and all(a[1] <= b[0] for a, b in zip(windows, windows[1:])), windows
    assert sorted(float(r.data.params["train.learning_rate"]) for r in runs) == sorted(rates)
    assert {r.data.tags["prefect.flow_run_id"] for r in runs} == set(ids)
    assert len({r.data.tags["lineage.adapter_sha256"] for r in runs}) == 3
    assert all(r.data.tags["lineage.prefect_deployment"] == "finetune-interior-qa-lora" for r in runs)
    keys = [sorted(k for k in r.data.metrics if k.startswith(("gate/", "tuned/"))) for r in runs]
    assert keys[0] == keys[1] == keys[2] and "tuned/morph_f1" in keys[0]
    versions = client.search_model_versions("name = 'interior-qa-lora'")
    assert len(versions) == 3
    assert not list((ws / ".loraops" / "runs").glob("*"))  # workspaces removed
    assert not (ws / "data/prepared/train.jsonl").exists() and not (ws / "models").exists()  # main tree untouched
