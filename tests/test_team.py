"""Team mode: PostgreSQL-backed MLflow server and Prefect server on loopback, deployments served, three
finetune runs triggered through the Prefect REST API exactly as the UI does, checked on the servers.

Everything started here is stopped here. `.ci/run` installs PostgreSQL when it is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from helpers import (ended_with_an_outcome, make_workspace, small_loop_overrides, start_server, stop_server,
                     trigger_finetune, wait_flow_runs)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
BIN = Path(sys.executable).parent


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import team_stack  # noqa: E402 - the one-box stack script (make team-up): the tests start the same parts


@pytest.fixture(scope="module")
def postgres():
    folder = Path(tempfile.mkdtemp(prefix="loraops-pg-", dir="/tmp"))
    try:
        db = team_stack.postgres(folder)
    except FileNotFoundError:
        pytest.skip("PostgreSQL server binaries not installed (.ci/run installs them)")
    try:
        yield db
    finally:
        team_stack.postgres_stop(folder)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def servers(postgres, tmp_path_factory):
    """PostgreSQL, SeaweedFS (S3), MLflow with artifacts proxied to s3://loraops/mlflow, Prefect: what
    `make team-up` starts, on loopback."""
    tmp = tmp_path_factory.mktemp("team")
    weed, endpoint = team_stack.seaweedfs(tmp / "seaweedfs")
    procs = [weed]
    try:
        mlflow_proc, mlflow_url = team_stack.mlflow_server(tmp, f"postgresql+psycopg2://{postgres}/mlflow", endpoint)
        procs.append(mlflow_proc)
        prefect_proc, prefect_api = team_stack.prefect_server(tmp, f"postgresql+asyncpg://{postgres}/prefect")
        procs.append(prefect_proc)
        yield {"mlflow": mlflow_url, "prefect": prefect_api, "s3": endpoint, "tmp": tmp}
    finally:
        for proc in procs:
            team_stack.stop(proc.pid)


def _bucket(endpoint: str, prefix: str) -> list[str]:
    """Every key under ``prefix`` in the stack's bucket, listed through the S3 API."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=team_stack.S3_KEYS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=team_stack.S3_KEYS["AWS_SECRET_ACCESS_KEY"], region_name="us-east-1")
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=team_stack.BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def test_team_mode_three_concurrent_runs_on_two_hosts(servers, tmp_path):
    """The team stack on loopback, used as a team uses it: `loraops deploy --pool` puts the five deployments on a
    process work pool; two "hosts" (own HOME, Prefect home, folder and host name; sharing only PostgreSQL, SeaweedFS,
    MLflow and Prefect) each run `prefect worker start --pool`, which clones the project and pulls its data from the
    DVC remote in the object store. Three runs submitted at once through the API, as the UI does, all complete: two
    on one host (its `gpu-<host>` limit makes their training take turns), one on the other. Everything they register
    is in the bucket, none of it on a runner's disk, and a third host with only the server URL answers with it."""
    import json

    import mlflow

    # states and places are checked here, not what is learnt: short training and a short evaluation
    ws = make_workspace(tmp_path / "ws", small_loop_overrides("registry.auto_promote=false", "train.max_steps=20",
                                                                  "train.eval_steps=10", "eval.max_samples=10",
                                                                  "eval.max_new_tokens=16", "registry.gate.min_test_size=5"))
    s3_env = {**os.environ, **team_stack.S3_KEYS}
    dvc = str(BIN / "dvc")
    for args in (["remote", "add", "-f", "-d", "store", f"s3://{team_stack.BUCKET}/dvc"],
                 ["remote", "modify", "store", "endpointurl", servers["s3"]], ["push", "-q", "-r", "store"]):
        subprocess.run([dvc, *args], cwd=ws, env=s3_env, check=True, capture_output=True, text=True)
    assert any(k.startswith("dvc/files/md5/") for k in _bucket(servers["s3"], "dvc/"))
    subprocess.run(["git", "-C", str(ws), "commit", "-qam", "the DVC remote on the object store"], check=True)
    team = {"MLFLOW_TRACKING_URI": servers["mlflow"], "PREFECT_API_URL": servers["prefect"], **team_stack.S3_KEYS}
    deployed = subprocess.run([sys.executable, "-m", "loraops.cli", "deploy", "--pool", "gpu-hosts"], cwd=ws,
                              env={**os.environ, **team, "PREFECT_HOME": str(tmp_path / "deployer-home")},
                              capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert "prefect worker start --pool gpu-hosts" in deployed.stdout
    api = servers["prefect"]
    names = {d["name"]: d for d in httpx.post(f"{api}/deployments/filter", json={}, timeout=10).json()}
    flow_names = {"finetune", "promote", "rollback", "reproduce", "sweep"}
    assert set(names) == {f"{flow}-interior-qa-lora" for flow in flow_names}  # five deployments that read apart
    assert {d["work_pool_name"] for d in names.values()} == {"gpu-hosts"}

    workers = []
    for host, limit in (("host-a", "2"), ("host-b", "1")):  # 3 runs: host-a takes two at most, host-b the rest
        home = tmp_path / host
        home.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL")}
        env |= {**team, "HOME": str(home), "PREFECT_HOME": str(home / ".prefect"), "LORAOPS_HOST": host,
                "LORAOPS_GPU_SLOTS": "1", "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2",
                "XDG_CACHE_HOME": str(home / ".cache")}
        workers.append(start_server([str(BIN / "prefect"), "worker", "start", "--pool", "gpu-hosts", "--limit", limit,
                                     "--name", host], home / "worker.log", home, env))
    try:
        deadline = time.time() + 120
        while len([w for w in httpx.post(f"{api}/work_pools/gpu-hosts/workers/filter", json={}, timeout=10).json()
                   if w["status"] == "ONLINE"]) < 2:
            assert time.time() < deadline and all(w.poll() is None for w in workers), "workers did not come online"
            time.sleep(1)
        rates = [0.004, 0.002, 0.001]
        ids = [trigger_finetune(api, lr) for lr in rates]
        states = wait_flow_runs(api, ids, 900)
        logs = "".join((tmp_path / h / "worker.log").read_text()[-3000:] for h in ("host-a", "host-b"))
        assert all(ended_with_an_outcome(s) for s in states.values()), logs
    finally:
        for worker in workers:
            stop_server(worker)

    client = mlflow.MlflowClient(tracking_uri=servers["mlflow"], registry_uri=servers["mlflow"])
    runs = client.search_runs([client.get_experiment_by_name("interior-qa-lora").experiment_id])
    assert sorted(float(r.data.params["train.learning_rate"]) for r in runs) == sorted(rates)
    assert {r.data.tags["prefect.flow_run_id"] for r in runs} == set(ids)
    assert len({r.data.tags["lineage.adapter_sha256"] for r in runs}) == 3
    assert all(r.data.tags["lineage.prefect_deployment"] == "finetune-interior-qa-lora" for r in runs)
    keys = [sorted(k for k in r.data.metrics if k.startswith(("gate/", "tuned/"))) for r in runs]
    assert keys[0] == keys[1] == keys[2] and "tuned/morph_f1" in keys[0]
    assert len(client.search_model_versions("name = 'interior-qa-lora'")) == 3

    # hosts: both ran runs, each under its own limit; the two runs of one host trained one after the other
    hosts = sorted(r.data.tags["loraops.host"] for r in runs)
    assert hosts == ["host-a", "host-a", "host-b"], hosts
    limits = {limit["name"] for limit in httpx.post(f"{api}/v2/concurrency_limits/filter", json={}, timeout=10).json()}
    assert {"gpu-host-a", "gpu-host-b"} <= limits
    windows = []
    for r in runs:
        if r.data.tags["loraops.host"] == "host-a":
            figures = json.loads(Path(client.download_artifacts(r.info.run_id, "stages/train.json", str(tmp_path))).read_text())
            windows.append((figures["started_at"], figures["finished_at"]))
    windows.sort()
    assert windows[0][1] <= windows[1][0], windows

    # object storage: every artifact is in the bucket (listed through the S3 API), none on a runner's disk
    keys = _bucket(servers["s3"], "mlflow/")
    for r in runs:
        assert any(r.info.run_id in k and k.endswith("stages/train.json") for k in keys)
        assert any(r.info.run_id in k and k.endswith("lineage.json") for k in keys)
    assert any(k.endswith("adapter_model.safetensors") for k in keys) and any(k.endswith("MLmodel") for k in keys)
    assert not (servers["tmp"] / "artifacts").exists() and not (ws / "mlruns").exists()
    assert not (ws / "models").exists() and not (ws / ".loraops" / "runs").exists()  # the project folder untouched

    # another host: no project, its own HOME and folder, the server URL only (no S3 credentials): `loraops ask` loads
    # v1 from the registry through the server and answers
    other = tmp_path / "other-host"
    other.mkdir()
    host_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
    host_env |= {"HOME": str(other), "MLFLOW_TRACKING_URI": servers["mlflow"], "HF_HUB_OFFLINE": "1"}
    answered = subprocess.run([sys.executable, "-m", "loraops.cli", "ask", "--model", "models:/interior-qa-lora/1",
                               "벽지에 곰팡이가 생기는 원인은 무엇인가요?"], cwd=other, env=host_env, capture_output=True,
                              text=True, timeout=300)
    assert answered.returncode == 0 and answered.stdout.strip(), answered.stdout + answered.stderr[-2000:]
    assert {p.name for p in other.iterdir()} <= {".cache"}  # nothing kept on that host but caches
