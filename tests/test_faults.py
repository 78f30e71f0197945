"""Faults a long GPU job meets, injected for real: the process killed with SIGKILL mid-training (integration tier)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from helpers import make_workspace, small_loop_overrides, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_run_killed_mid_training_resumes_closes_its_mlflow_run_and_frees_the_slot(tmp_path):
    ws = make_workspace(tmp_path / "ws", small_loop_overrides("train.early_stopping_patience=0"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAOPS_SLOT_LEASE_SECONDS": "60"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run = [sys.executable, "-m", "loraops.cli", "run"]
    # the train stage SIGKILLs its process group (the run, its `dvc repro`, the stage) once checkpoint-50 is written:
    # a machine dying at a known step, not a race against a timer
    first = subprocess.run(run, cwd=ws, env={**env, "LORAOPS_FAULT_AFTER_CHECKPOINT": "50:kill"},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, timeout=900)
    assert first.returncode == -signal.SIGKILL and (ws / "models/checkpoints/checkpoint-50/rng_state.pth").exists()
    with sqlite3.connect(ws / "mlruns/mlflow.db") as db:
        assert db.execute("select status from runs").fetchall() == [("RUNNING",)]  # what a crash leaves

    second = subprocess.run(run, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "resuming from checkpoint-50" in out, out[-4000:]
    assert "was left RUNNING by a process that died; marked KILLED" in out
    assert "registered interior-qa-lora v1" in second.stdout
    with sqlite3.connect(ws / "mlruns/mlflow.db") as db:
        statuses = db.execute("select r.status from runs r join experiments e on e.experiment_id = r.experiment_id "
                              "where e.name = 'interior-qa-lora' order by r.start_time").fetchall()
    assert statuses == [("KILLED",), ("FINISHED",)]  # the killed run closed, the resumed one finished


HOST_SCRIPT = r'''
import json, sys
import mlflow, pandas as pd
from loraops.registry import versions as registry
from loraops.core.config import load_params
from loraops.registry.tracking import experiment_for, tracking_setup

mode, params_file = sys.argv[1], sys.argv[2]
params = load_params(params_file, ["registry.gate.min_test_size=5"])
tracking_setup()


class Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return list(model_input)


if mode == "setup":
    for tuned in (0.5, 0.6, 0.7):
        n = 30
        table = pd.DataFrame({"question": [f"q{i}" for i in range(n)], "reference": ["벽지가 들뜨는 원인은 습기입니다."] * n,
                              "category": ["a", "b", "c"] * 10, "base_morph_f1": [0.3] * n,
                              "tuned_morph_f1": [tuned] * n, "base_degenerate": [False] * n, "tuned_degenerate": [False] * n})
        with mlflow.start_run(experiment_id=experiment_for("m")):
            mlflow.log_text(table.to_csv(index=False), "eval/eval_questions.csv")
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
        mlflow.register_model(info.model_uri, "m")
    sys.exit(0)

host, done = mode, []
for i in range(8):
    try:
        if i % 3 == 2:
            result = registry.rollback("m", params)
        else:
            result = registry.promote("m", str((i + len(host)) % 3 + 1), params, force=True, reason=f"{host} op {i}")
        done.append({"op": i, "to": result.version, "from": result.previous, "moved": result.previous != result.version})
    except registry.RegistryError as exc:
        done.append({"op": i, "refused": str(exc)})
print(json.dumps(done))
'''


def test_concurrent_promotions_and_rollbacks_from_two_hosts_leave_one_audited_production(tmp_path):
    """Two "hosts" (separate processes and folders, so no shared file lock) promote and roll back against one
    MLflow tracking server; the Prefect server's `promote-m` limit serialises them. Every move is audited,
    each move starts where the previous one ended, and production is the last move's target."""
    from helpers import REPO, free_port, start_server, stop_server, wait_http

    bin_dir = os.path.dirname(sys.executable)
    mlflow_port, prefect_port = free_port(), free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}", "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api"}
    servers = [
        start_server([os.path.join(bin_dir, "mlflow"), "server", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
                      "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                      "--port", str(mlflow_port), "--workers", "1"], tmp_path / "mlflow.log", tmp_path, env),
        start_server([os.path.join(bin_dir, "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                     tmp_path / "prefect.log", tmp_path, env),
    ]
    try:
        wait_http(f"http://127.0.0.1:{mlflow_port}/health", 180, servers[0], tmp_path / "mlflow.log")
        wait_http(f"http://127.0.0.1:{prefect_port}/api/health", 180, servers[1], tmp_path / "prefect.log")
        script = tmp_path / "host.py"
        script.write_text(HOST_SCRIPT, encoding="utf-8")
        params = str(REPO / "params.yaml")
        subprocess.run([sys.executable, str(script), "setup", params], cwd=tmp_path, env=env, check=True, timeout=300)
        hosts = []
        for host in ("host-a", "host-bb"):
            (tmp_path / host).mkdir()
            hosts.append(subprocess.Popen([sys.executable, str(script), host, params], cwd=tmp_path / host, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [proc.communicate(timeout=600) for proc in hosts]
        for proc, (out, err) in zip(hosts, outputs):
            assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
        ops = [op for out, _ in outputs for op in json.loads(out.splitlines()[-1])]
        moves = sum(1 for op in ops if op.get("moved"))

        check = ("import json; from loraops.registry import versions as registry; from loraops.registry.tracking import tracking_setup; tracking_setup(); "
                 "c = registry.mlflow_client(); print(json.dumps({'trail': registry.audit_trail('m'), "
                 "'production': registry.alias_version(c, 'm', 'production'), 'history': registry._history(c, 'm')}))")
        state = json.loads(subprocess.run([sys.executable, "-c", check], cwd=tmp_path, env=env, check=True,
                                                        capture_output=True, text=True).stdout.splitlines()[-1])
    finally:
        for proc in servers:
            stop_server(proc)
    trail = [t for t in state["trail"] if t["action"] in ("promote", "rollback")]
    assert len(trail) == moves > 4
    for before, after in zip(trail, trail[1:]):
        assert after["from"] == before["to"], trail  # no move was lost or made from a stale production
    assert state["production"] == trail[-1]["to"] == state["history"][-1]
    assert {t["by"] for t in trail} and all(t["by"] for t in trail)


def test_locked_down_team_mode_only_the_service_account_moves_production(tmp_path):
    """MLflow's basic-auth app (everyone READ by default): a read-only user can read the registry but cannot set
    `production`, not through MLflow and not through `loraops promote`; the service account can. The Prefect
    server with an auth string refuses clients without it."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic-auth app needs Flask-WTF (the dev extra installs it)")
    import httpx

    from helpers import REPO, free_port, start_server, stop_server, wait_http

    bin_dir = os.path.dirname(sys.executable)
    port, prefect_port = free_port(), free_port()
    (tmp_path / "auth.ini").write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{tmp_path}/auth.db\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n", encoding="utf-8")
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "MLFLOW_REGISTRY_", "PREFECT_API"))}
    server_env = {**base_env, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-pw-1234",
                  "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-csrf-key",
                  "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                  "PREFECT_SERVER_API_AUTH_STRING": "loraops:prefect-pw"}
    # the registry the service account releases from: three versions, written into the store before the auth app
    # serves it (the app checks a salted scrypt hash on every request: logging them through it costs ~25 s of CPU)
    (tmp_path / "host.py").write_text(HOST_SCRIPT, encoding="utf-8")
    setup = subprocess.run([sys.executable, str(tmp_path / "host.py"), "setup", str(REPO / "params.yaml")], cwd=tmp_path,
                           env={**base_env, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"},
                           capture_output=True, text=True, timeout=300)
    assert setup.returncode == 0, setup.stderr[-3000:]
    servers = [
        start_server([os.path.join(bin_dir, "mlflow"), "server", "--app-name", "basic-auth", "--backend-store-uri",
                      f"sqlite:///{tmp_path}/mlflow.db", "--artifacts-destination", str(tmp_path / "artifacts"),
                      "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], tmp_path / "mlflow.log", tmp_path, server_env),
        start_server([os.path.join(bin_dir, "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
                     tmp_path / "prefect.log", tmp_path, server_env),
    ]
    uri = f"http://127.0.0.1:{port}"

    def as_user(user: str, password: str) -> dict[str, str]:
        return {**base_env, "MLFLOW_TRACKING_URI": uri, "MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}

    def python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    project = tmp_path / "project"
    project.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        (project / name).write_bytes((REPO / name).read_bytes())
    try:
        wait_http(f"{uri}/health", 180, servers[0], tmp_path / "mlflow.log")
        # the admin creates the two accounts and lets the service account manage the model and its experiment (its
        # runs carry the audit tags); everyone else has the default, READ
        admin = python("import mlflow; from mlflow.server.auth.client import AuthServiceClient as C; c = C('%s'); "
                       "c.create_user('loraops-service', 'service-pw-1234'); c.create_user('viewer', 'viewer-pw-1234'); "
                       "c.grant_user_permission('loraops-service', 'registered_model', 'm', 'MANAGE'); "
                       "[c.grant_user_permission('loraops-service', 'experiment', e.experiment_id, 'MANAGE') "
                       "for e in mlflow.MlflowClient().search_experiments()]" % uri, as_user("admin", "admin-pw-1234"))
        assert admin.returncode == 0, admin.stderr[-2000:]
        service, viewer = as_user("loraops-service", "service-pw-1234"), as_user("viewer", "viewer-pw-1234")

        promote = [sys.executable, "-m", "loraops.cli", "promote", "m", "--version", "2", "--force", "--reason", "release 2"]
        by_viewer = python("import mlflow; c = mlflow.MlflowClient(); print(c.get_registered_model('m').name); "
                           "c.set_registered_model_alias('m', 'production', '1')", viewer)
        assert by_viewer.stdout.strip() == "m" and "403" in by_viewer.stderr  # reads, cannot move
        refused = subprocess.run(promote, cwd=project, env=viewer, capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-2000:]
        assert "user viewer is not allowed" in refused.stderr and "service account" in refused.stderr
        done = subprocess.run(promote, cwd=project, env=service, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        production = python("import mlflow; print(mlflow.MlflowClient().get_model_version_by_alias('m', 'production').version)",
                            viewer)
        assert production.stdout.strip() == "2"
        anonymous = httpx.get(f"{uri}/api/2.0/mlflow/registered-models/get", params={"name": "m"}, timeout=10)
        assert anonymous.status_code == 401

        wait_http_auth = f"http://127.0.0.1:{prefect_port}/api/health"
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if httpx.get(wait_http_auth, auth=("loraops", "prefect-pw"), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        flows = f"http://127.0.0.1:{prefect_port}/api/flows/filter"
        assert httpx.post(flows, json={}, timeout=10).status_code == 401
        assert httpx.post(flows, json={}, auth=("loraops", "prefect-pw"), timeout=10).status_code == 200
    finally:
        for proc in servers:
            stop_server(proc)


def _wait_for(path, proc, seconds=600):
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, f"the run ended before {path} appeared"
        time.sleep(0.1)


def test_tracking_server_down_mid_run_fails_clearly_registers_nothing_and_a_rerun_completes(tmp_path):
    from helpers import free_port, start_server, stop_server, wait_http

    ws = make_workspace(tmp_path / "ws", small_loop_overrides())
    port = free_port()
    mlflow_cmd = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "server", "--backend-store-uri",
                  f"sqlite:///{tmp_path}/mlflow.db", "--artifacts-destination", str(tmp_path / "artifacts"),
                  "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"}
    env.pop("PREFECT_API_URL", None)
    server = start_server(mlflow_cmd, tmp_path / "mlflow.log", tmp_path, env)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180, server, tmp_path / "mlflow.log")
        run = [sys.executable, "-m", "loraops.cli", "run"]
        go = tmp_path / "go"
        # one HTTP retry per request (the default is 3 with backoff): the step's own retries are what is tested
        first = subprocess.Popen(run, cwd=ws, env={**env, "LORAOPS_FAULT_AFTER_CHECKPOINT": f"50:wait:{go}",
                                                   "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"},
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _wait_for(tmp_path / "go.waiting", first)  # the train stage paused after checkpoint-50
        stop_server(server)  # the tracking server goes away while the run trains
        go.touch()
        stopped = time.time()
        out, err = first.communicate(timeout=900)
        assert first.returncode == 2, out[-2000:] + err[-3000:]
        assert "did not answer while" in err and "Traceback" not in err, err[-3000:]
        assert time.time() - stopped < 300  # bounded retries, not MLflow's default minutes per request
        with sqlite3.connect(tmp_path / "mlflow.db") as db:
            assert db.execute("select count(*) from model_versions").fetchone() == (0,)  # nothing half-registered

        server = start_server(mlflow_cmd, tmp_path / "mlflow2.log", tmp_path, env)
        wait_http(f"http://127.0.0.1:{port}/health", 180, server, tmp_path / "mlflow2.log")
        second = subprocess.run(run, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
        assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
        assert "registered interior-qa-lora v1" in second.stdout
        assert "DVC stage train: skipped" in second.stdout + second.stderr  # finished stages are not run again
        check = ("import json, mlflow; c = mlflow.MlflowClient(); v = c.get_model_version('interior-qa-lora', '1'); "
                 "print(json.dumps(sorted(a.path for a in c.list_artifacts(v.run_id)) + "
                 "sorted(a.path for a in c.list_artifacts(v.run_id, 'eval'))))")
        listed = json.loads(subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True,
                                           check=True).stdout.splitlines()[-1])
        assert "lineage.json" in listed and "eval/eval_questions.csv" in listed
    finally:
        stop_server(server)
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        statuses = sorted(s for (s,) in db.execute("select r.status from runs r join experiments e on "
                                                    "e.experiment_id = r.experiment_id where e.name = 'interior-qa-lora'"))
    assert statuses in (["FAILED", "FINISHED"], ["FINISHED", "KILLED"])  # the broken run closed, never left RUNNING


def test_a_prefect_server_restart_mid_run_is_survived_and_the_run_reported(tmp_path):
    import httpx

    from helpers import free_port, start_server, stop_server, wait_http

    ws = make_workspace(tmp_path / "ws", small_loop_overrides())
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           # team mode's server setting (README): leases on disk survive the restart, so the gpu slot is released
           "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect.server.concurrency.lease_storage.filesystem"}
    env.pop("MLFLOW_TRACKING_URI", None)
    prefect_cmd = [os.path.join(os.path.dirname(sys.executable), "prefect"), "server", "start", "--host", "127.0.0.1",
                   "--port", str(port)]
    server = start_server(prefect_cmd, tmp_path / "prefect.log", tmp_path, env)
    try:
        wait_http(f"{api}/health", 180, server, tmp_path / "prefect.log")
        go = tmp_path / "go"
        run = subprocess.Popen([sys.executable, "-m", "loraops.cli", "run"], cwd=ws, stdout=subprocess.PIPE,
                               env={**env, "LORAOPS_FAULT_AFTER_CHECKPOINT": f"50:wait:{go}"}, stderr=subprocess.PIPE, text=True)
        _wait_for(tmp_path / "go.waiting", run)  # the train stage paused after checkpoint-50
        stop_server(server)  # restarted while the run trains
        time.sleep(3)
        server = start_server(prefect_cmd, tmp_path / "prefect2.log", tmp_path, env)
        wait_http(f"{api}/health", 180, server, tmp_path / "prefect2.log")
        go.touch()
        out, err = run.communicate(timeout=900)
        assert run.returncode == 0, out[-3000:] + err[-3000:]
        assert "registered interior-qa-lora v1" in out
        (flow_run,) = httpx.post(f"{api}/flow_runs/filter", json={}, timeout=30).raise_for_status().json()
        assert flow_run["state"]["type"] == "COMPLETED" and flow_run["state"]["name"] == "Promoted"
        tasks = httpx.post(f"{api}/task_runs/filter", json={}, timeout=30).raise_for_status().json()
        assert {t["name"].rsplit("-", 1)[0] for t in tasks if t["state"]["type"] == "COMPLETED"} >= {"train", "evaluate", "register"}
    finally:
        stop_server(server)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs to fill (needs root, as on CI); None where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], capture_output=True).returncode:
        yield None
        return
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def _fill(disk, leave: int) -> None:
    """Take all but ``leave`` bytes of the disk's free space."""
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(disk / "ballast", "wb") as fh:
        fh.truncate(0)
        fh.write(b"\0" * max(0, free - leave))


def _limited(limit: int):
    """Where no small disk can be mounted: the same failure from a file-size limit (EFBIG instead of ENOSPC)."""
    import resource

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.parametrize("stage", ["prepare", "train"])
def test_disk_full_during_a_stage_is_a_clear_error_and_leaves_no_partial_output(stage, small_disk, tmp_path):
    root = (small_disk or tmp_path) / "ws"
    root.mkdir()
    ws = make_workspace(root, tiny_overrides("eval.self_test=false"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    loraops = [sys.executable, "-m", "loraops.cli"]
    if stage == "train":
        subprocess.run([*loraops, "prepare"], cwd=ws, env=env, check=True, capture_output=True)
    before = sorted(p.relative_to(ws).as_posix() for p in ws.rglob("*") if ".git" not in p.parts and ".dvc" not in p.parts)
    if small_disk is not None:
        _fill(small_disk, leave=48 * 1024)
        preexec = None
    else:
        preexec = _limited(48 * 1024)
    done = subprocess.run([*loraops, stage], cwd=ws, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=preexec)
    if small_disk is not None:
        (small_disk / "ballast").unlink()
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert "no space left writing" in done.stderr and "Traceback" not in done.stderr, done.stderr[-3000:]
    after = sorted(p.relative_to(ws).as_posix() for p in ws.rglob("*") if ".git" not in p.parts and ".dvc" not in p.parts)
    added = [p for p in after if p not in before and not p.startswith("models/checkpoints")]
    assert added in ([], ["models"], ["models", "models/checkpoints"]), added  # no output, no temporary folder left
    if stage == "train":
        assert not list((ws / "models/checkpoints").glob("checkpoint-*"))  # nothing cut short to resume from
