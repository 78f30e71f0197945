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


def _weight(items) -> float:
    """A module's expected cost from its marks: a test that starts servers or runs the loop costs most."""
    return sum(3 if item.get_closest_marker("integration") else 1 if item.get_closest_marker("slow") else 0.05
               for item in items)


def pytest_collection_modifyitems(config, items):
    """The order `make test` hands modules to its two workers (`--dist loadfile --no-loadscope-reorder`: a module
    runs on one worker, so its module fixtures are built once).

    The golden project takes ~3 minutes to build, once, under a lock; a second worker that needs it meanwhile
    only waits. So one worker starts with the heaviest module on the golden project (and builds it), the other
    with the heaviest module that does not need it; the modules that do not need it follow, heaviest first, and
    the other golden modules come last, when the project is there. Heaviest first keeps the last module short."""
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    golden = sorted((m for m in modules.values() if any(_GOLDEN_FIXTURES & set(i.fixturenames) for i in m)),
                    key=_weight, reverse=True)
    others = sorted((m for m in modules.values() if not any(_GOLDEN_FIXTURES & set(i.fixturenames) for i in m)),
                    key=_weight, reverse=True)
    order = golden[:1] + others + golden[1:]
    items[:] = [item for module in order for item in module]


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
    from loraops.core.config import load_params

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
    """The trained project built once per session by three real `loraops run`s (GOLDEN_RUNS, one after another in
    one process: the later runs use the first one's imports and temporary Prefect server), kept as built: tests
    never change it; they read it, or change a copy (`golden_copy`). Its `runs` are the three runs' outputs.

    The first worker that needs it builds it under a lock; the other worker waits for it and reads the same one."""
    import fcntl
    import json
    import subprocess

    from helpers import Golden, loraops_in_one_process

    folder, done_file = _SESSION / "golden", _SESSION / "golden.json"
    with open(_SESSION / "golden.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done_file.exists():
            root = make_workspace(folder / "ws", tiny_overrides())
            env = {**os.environ, "LORAOPS_API_KEY": "", "HF_HUB_OFFLINE": "1"}
            env.pop("MLFLOW_TRACKING_URI", None)
            done = loraops_in_one_process(root, [["run", *extra] for _, extra in GOLDEN_RUNS], env)
            for (what, _), run in zip(GOLDEN_RUNS, done):
                assert run.returncode in (0, 3, 4), f"{what}: " + run.stdout[-3000:] + run.stderr[-3000:]
            runs = [{"args": run.args, "returncode": run.returncode, "stdout": run.stdout, "stderr": run.stderr}
                    for run in done]
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
