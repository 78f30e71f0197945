"""Shared fixtures: offline settings, tiny params, and isolated workspaces (git + DVC); builders live in helpers.py."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import REPO, make_workspace, tiny_overrides

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.pop("MLFLOW_TRACKING_URI", None)
# `make test` runs on two workers (pytest-xdist), which inherit the environment of the process that starts them:
# one session folder for them all (the golden project, the cache of deterministic measurements such as metric
# validity, not ~/.cache), and a Prefect home per worker, so runs without a server keep their local slots and
# database to their own worker.
_OWNS_SESSION = "LORAOPS_TEST_SESSION" not in os.environ
if _OWNS_SESSION:
    os.environ["LORAOPS_TEST_SESSION"] = tempfile.mkdtemp(prefix="loraops-tests-")
_SESSION = Path(os.environ["LORAOPS_TEST_SESSION"])
os.environ.setdefault("LORAOPS_CACHE_DIR", str(_SESSION / "cache"))
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="prefect-home-", dir=_SESSION)
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
if "PYTEST_XDIST_WORKER" in os.environ:  # two workers on two cores: one compute thread each, not two fighting over both
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

_GOLDEN_FIXTURES = {"golden", "golden_copy", "served_project"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items):
    """The tests on the golden project first, and xdist groups (`--dist loadgroup`): the golden tests one group, each
    module its own. (2026-12-04: pytest 9.2 derives `nodeid` from `_id`, so pytest-xdist 3.8, the newest, cannot add
    its `@group` suffix and loadgroup hands tests out one by one; the golden project is still built once, under the
    lock in `golden`.)"""
    golden = [item for item in items if _GOLDEN_FIXTURES & set(item.fixturenames)]
    others = [item for item in items if not _GOLDEN_FIXTURES & set(item.fixturenames)]
    for item in golden:
        item.add_marker(pytest.mark.xdist_group("golden"))
    for item in others:
        item.add_marker(pytest.mark.xdist_group(item.module.__name__ if item.module else item.nodeid))
    items[:] = golden + others


def pytest_sessionfinish(session, exitstatus):
    if _OWNS_SESSION and "PYTEST_XDIST_WORKER" not in os.environ:
        import shutil

        shutil.rmtree(_SESSION, ignore_errors=True)


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks():
    """MLflow exports the URIs it is given (MLFLOW_TRACKING_URI, MLFLOW_REGISTRY_URI) to os.environ; a test that
    pointed MLflow at its store must not point the next test's subprocesses there too."""
    yield
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(key, None)


@pytest.fixture
def tiny_params():
    from loraops.config import load_params

    return load_params(REPO / "params.yaml", tiny_overrides())


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An isolated project copy (tiny settings) as the working directory."""
    root = make_workspace(tmp_path / "ws", tiny_overrides())
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # mlflow exports the last URI it was given
    return root


GOLDEN_RUNS = (
    ("v1, promoted to production", []),
    ("v2, learns nothing: refused", ["--set", "train.learning_rate=1e-6"]),
    ("v3, registered as candidate, not gated", ["--set", "train.learning_rate=0.003", "--set", "registry.auto_promote=false"]),
)


@pytest.fixture(scope="session")
def golden():
    """The trained project built once per session by three real `loraops run`s (GOLDEN_RUNS), kept as built: tests
    never change it; they read it, or change a copy (`golden_copy`). Its `runs` are the three runs' outputs.

    The first worker that needs it builds it under a lock; the other worker waits for it and reads the same one."""
    import fcntl
    import json
    import subprocess

    from helpers import Golden

    folder, done_file = _SESSION / "golden", _SESSION / "golden.json"
    with open(_SESSION / "golden.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done_file.exists():
            root = make_workspace(folder / "ws", tiny_overrides())
            env = {**os.environ, "LORAOPS_API_KEY": "", "HF_HUB_OFFLINE": "1"}
            env.pop("MLFLOW_TRACKING_URI", None)
            runs = []
            for what, extra in GOLDEN_RUNS:
                run = subprocess.run([sys.executable, "-m", "loraops.cli", "run", *extra], cwd=root, env=env,
                                     capture_output=True, text=True, timeout=900)
                assert run.returncode in (0, 3, 4), f"{what}: " + run.stdout[-3000:] + run.stderr[-3000:]
                runs.append({"args": run.args, "returncode": run.returncode, "stdout": run.stdout,
                             "stderr": run.stderr})
            done_file.write_text(json.dumps(runs))
    runs = [subprocess.CompletedProcess(**run) for run in json.loads(done_file.read_text())]
    return Golden(folder / "ws", runs)


@pytest.fixture
def golden_copy(golden, tmp_path, monkeypatch):
    """A copy of the golden project as the working directory, for a test that changes it."""
    from helpers import copy_project

    root = copy_project(golden.root, tmp_path / "ws")
    monkeypatch.chdir(root)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


@pytest.fixture(scope="session")
def served_project(golden, tmp_path_factory):
    """One copy of the golden project shared by the serving, demo and export tests (v1 production, v3 candidate);
    they may add ratings and feedback, which the golden project itself never sees."""
    from helpers import copy_project

    return copy_project(golden.root, tmp_path_factory.mktemp("served") / "ws")
