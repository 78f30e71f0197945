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

    # object storage: every artifact is in the bucket (listed through the S3 API), none on this host's disk
    keys = _bucket(servers["s3"], "mlflow/")
    for r in runs:
        mine = [k for k in keys if f"/{r.info.run_id}/" in k or r.info.run_id in k]
        assert any(k.endswith("stages/train.json") for k in mine) and any(k.endswith("lineage.json") for k in mine)
    assert any(k.endswith("adapter_model.safetensors") for k in keys) and any(k.endswith("MLmodel") for k in keys)
    assert not (servers["tmp"] / "artifacts").exists() and not (ws / "mlruns").exists()

    # another host: only the server URL, its own HOME and folder, no S3 credentials: loads v1 and answers
    other = tmp_path / "other-host"
    other.mkdir()
    host_env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_S3"))}
    host_env |= {"HOME": str(other), "MLFLOW_TRACKING_URI": servers["mlflow"], "HF_HUB_OFFLINE": "1"}
    code = ("import mlflow; m = mlflow.pyfunc.load_model('models:/interior-qa-lora/1'); "
            "print(repr(m.predict(['벽지에 곰팡이가 생기는 원인은 무엇인가요?'])[0]))")
    answered = subprocess.run([sys.executable, "-c", code], cwd=other, env=host_env, capture_output=True, text=True,
                              timeout=300)
    assert answered.returncode == 0 and answered.stdout.strip().startswith("'"), answered.stderr[-2000:]

    # the DVC remote on the same store: one clone pushes, another clone (its own cache) pulls the same data
    dvc = str(BIN / "dvc")
    s3_env = {**os.environ, **team_stack.S3_KEYS}
    for args in (["remote", "add", "-f", "-d", "store", f"s3://{team_stack.BUCKET}/dvc"],
                 ["remote", "modify", "store", "endpointurl", servers["s3"]], ["push", "-q", "-r", "store"]):
        subprocess.run([dvc, *args], cwd=ws, env=s3_env, check=True, capture_output=True, text=True)
    assert any(k.startswith("dvc/files/md5/") for k in _bucket(servers["s3"], "dvc/"))
    clone = tmp_path / "clone"
    subprocess.run(["git", "-C", str(ws), "commit", "-qam", "DVC remote on the object store"], check=True)
    subprocess.run(["git", "clone", "-q", str(ws), str(clone)], check=True)
    pulled = subprocess.run([dvc, "pull", "-q", "-r", "store", "data/raw/interior_qa.csv.dvc"], cwd=clone, env=s3_env,
                            capture_output=True, text=True)
    assert pulled.returncode == 0, pulled.stderr
    assert (clone / "data/raw/interior_qa.csv").read_bytes() == (ws / "data/raw/interior_qa.csv").read_bytes()
    assert not list((ws / ".loraops" / "runs").glob("*"))  # workspaces removed
    assert not (ws / "data/prepared/train.jsonl").exists() and not (ws / "models").exists()  # main tree untouched
