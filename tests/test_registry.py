"""Registry refusals that need no trained model: concurrent promotions, unknown names, force without reason."""

from __future__ import annotations

import json
import os

import pytest

from conftest import REPO
from loraops import registry
from loraops.config import load_params


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_a_second_promote_of_the_same_model_is_refused_while_one_runs(store):
    with registry._lock("m"):
        with pytest.raises(registry.RegistryError, match=r"another promote/rollback of 'm' is in progress \(pid \d+"):
            with registry._lock("m"):
                pass
    with registry._lock("m"):  # released afterwards
        pass


def test_a_stale_lock_of_a_dead_process_is_taken_over(store):
    path = store / "mlruns/.locks/m.lock"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": 2 ** 22 + 12345, "since": "earlier"}))
    with registry._lock("m"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()


def test_unknown_model_and_force_without_reason(store):
    params = load_params(REPO / "params.yaml")
    with pytest.raises(registry.RegistryError, match="no registered model 'ghost'"):
        registry.promote("ghost", None, params)
    with pytest.raises(registry.RegistryError, match="--force needs --reason"):
        registry.promote("ghost", "1", params, force=True)
    with pytest.raises(registry.RegistryError, match="no registered model 'ghost'"):
        registry.rollback("ghost", params)


def test_runs_of_a_cancelled_flow_run_are_marked_killed(store):
    import mlflow

    from loraops.tracking import close_runs_of, experiment_for, tracking_setup

    tracking_setup(store)
    experiment = experiment_for("m", store)
    running = mlflow.MlflowClient().create_run(experiment, tags={"prefect.flow_run_id": "fr-1"})
    other = mlflow.MlflowClient().create_run(experiment, tags={"prefect.flow_run_id": "fr-2"})
    assert close_runs_of("fr-1", "KILLED") == 1
    client = mlflow.MlflowClient()
    assert client.get_run(running.info.run_id).info.status == "KILLED"
    assert client.get_run(other.info.run_id).info.status == "RUNNING"


def test_missing_run_artifact_says_what_it_blocks(store):
    import mlflow

    from loraops.tracking import experiment_for, tracking_setup

    tracking_setup(store)
    run = mlflow.MlflowClient().create_run(experiment_for("m", store))
    with pytest.raises(registry.RegistryError, match=r"no lineage.json; without its lineage card"):
        from loraops.reproduce import _lineage

        _lineage(run.info.run_id)
