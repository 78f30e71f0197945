"""Team mode: PostgreSQL-backed MLflow server and Prefect server on loopback, deployments served, three
finetune runs triggered through the Prefect REST API exactly as the UI does, checked on the servers.

Everything started here is stopped here. `.ci/run` installs PostgreSQL when it is missing.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from helpers import make_workspace, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, seconds: float = 120, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
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
    port = _port()
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


def _start(cmd: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    with pytest.raises(ProcessLookupError) if proc.poll() is not None else _noop():
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


class _noop:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope="module")
def servers(postgres, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("team")
    mlflow_port, prefect_port = _port(), _port()
    env = {**os.environ, "PREFECT_HOME": str(tmp / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"postgresql+asyncpg://{postgres}/prefect"}
    env.pop("PREFECT_API_URL", None)
    procs = [
        _start([str(BIN / "mlflow"), "server", "--backend-store-uri", f"postgresql+psycopg2://{postgres}/mlflow",
                "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(mlflow_port),
                "--workers", "1"], tmp / "mlflow.log", tmp, env),
        _start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
               tmp / "prefect.log", tmp, env),
    ]
    try:
        _wait(f"http://127.0.0.1:{mlflow_port}/health", 180, procs[0], tmp / "mlflow.log")
        _wait(f"http://127.0.0.1:{prefect_port}/api/health", 180, procs[1], tmp / "prefect.log")
        yield {"mlflow": f"http://127.0.0.1:{mlflow_port}", "prefect": f"http://127.0.0.1:{prefect_port}/api", "tmp": tmp}
    finally:
        for proc in procs:
            _stop(proc)


def _trigger(api: str, learning_rate: float) -> str:
    """What the UI's Run → Custom run does: read the deployment's defaults, change a field, create a flow run."""
    dep = httpx.get(f"{api}/deployments/name/finetune/loraops", timeout=10).raise_for_status().json()
    parameters = dep["parameters"]
    parameters["train"]["learning_rate"] = learning_rate
    run = httpx.post(f"{api}/deployments/{dep['id']}/create_flow_run", json={"parameters": parameters}, timeout=10)
    return run.raise_for_status().json()["id"]


def _wait_runs(api: str, ids: list[str], seconds: float) -> dict[str, dict]:
    deadline, states = time.time() + seconds, {}
    while time.time() < deadline:
        states = {i: httpx.get(f"{api}/flow_runs/{i}", timeout=10).json() for i in ids}
        if all(s["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in states.values()):
            return states
        time.sleep(3)
    raise TimeoutError(f"flow runs not finished: { {i: s['state_type'] for i, s in states.items()} }")


def test_team_mode_three_concurrent_runs(servers, tmp_path):
    import mlflow

    ws = make_workspace(tmp_path / "ws", tiny_overrides("registry.auto_promote=false"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": servers["mlflow"], "PREFECT_API_URL": servers["prefect"],
           "PREFECT_HOME": str(servers["tmp"] / "client-home"), "LORAOPS_GPU_SLOTS": "1"}
    deploy = _start([sys.executable, "-m", "loraops.cli", "deploy"], tmp_path / "deploy.log", ws, env)
    api = servers["prefect"]
    try:
        deadline = time.time() + 120
        while len(httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()) < 4:
            assert deploy.poll() is None and time.time() < deadline, (tmp_path / "deploy.log").read_text()[-3000:]
            time.sleep(2)
        names = {d["name"] for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()}
        flows = {f["id"]: f["name"] for f in httpx.post(f"{api}/flows/filter", json={}, timeout=10).json()}
        assert names == {"loraops"} and set(flows.values()) == {"finetune", "promote", "rollback", "reproduce"}
        rates = [0.004, 0.002, 0.001]
        ids = [_trigger(api, lr) for lr in rates]
        states = _wait_runs(api, ids, 900)
        assert all(s["state_type"] == "COMPLETED" for s in states.values()), (tmp_path / "deploy.log").read_text()[-4000:]
    finally:
        _stop(deploy)

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
    assert all(r.data.tags["lineage.prefect_deployment"] == "loraops" for r in runs)
    keys = [sorted(k for k in r.data.metrics if k.startswith("eval/")) for r in runs]
    assert keys[0] == keys[1] == keys[2] and "eval/cosine/tuned" in keys[0]
    versions = client.search_model_versions("name = 'interior-qa-lora'")
    assert len(versions) == 3
    assert not list((ws / ".loraops" / "runs").glob("*"))  # workspaces removed
    assert "data/prepared" not in {str(p.relative_to(ws)) for p in ws.glob("data/prepared")}  # main tree untouched
