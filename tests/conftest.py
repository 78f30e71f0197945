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
# One cache of deterministic measurements (metric validity) for the session and its subprocesses, not ~/.cache
os.environ.setdefault("LORAOPS_CACHE_DIR", tempfile.mkdtemp(prefix="loraops-test-cache-"))
os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")


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
def golden(tmp_path_factory):
    """The trained project built once per session by three real `loraops run`s (GOLDEN_RUNS), kept as built: tests
    never change it; they read it, or change a copy (`golden_copy`). Its `runs` are the three runs' outputs."""
    import subprocess

    from helpers import Golden

    root = make_workspace(tmp_path_factory.mktemp("golden") / "ws", tiny_overrides())
    env = {**os.environ, "LORAOPS_API_KEY": "", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    runs = []
    for what, extra in GOLDEN_RUNS:
        done = subprocess.run([sys.executable, "-m", "loraops.cli", "run", *extra], cwd=root, env=env,
                              capture_output=True, text=True, timeout=900)
        assert done.returncode in (0, 3, 4), f"{what}: " + done.stdout[-3000:] + done.stderr[-3000:]
        runs.append(done)
    return Golden(root, runs)


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
