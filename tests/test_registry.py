"""Registry refusals that need no trained model: concurrent promotions, unknown names, force without reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pandas as pd
import pytest

from helpers import REPO
from loraops.core.config import load_params
from loraops.registry import versions as registry


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


def test_a_second_promote_waits_then_times_out_naming_the_holder(store):
    with registry._lock("m"):
        with pytest.raises(registry.RegistryError, match=r"another promote/rollback of 'm' is in progress \(pid \d+, user:"):
            with registry._lock("m", timeout=0.2):
                pass
    with registry._lock("m", timeout=0.2):  # released afterwards
        pass


def test_a_lock_of_a_dead_process_is_free_and_a_torn_holder_file_is_no_crash(store):
    """The OS releases a dead holder's lock; a half-written holder file is reported, never parsed into a crash."""
    code = "import os; from loraops.registry import versions as registry; registry._lock('m').__enter__(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], cwd=store, check=True)
    (store / "mlruns/.locks/m.holder.json").write_text('{"pid": 12', encoding="utf-8")
    with registry._lock("m", timeout=2):
        assert json.loads((store / "mlruns/.locks/m.holder.json").read_text())["pid"] == os.getpid()


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return list(model_input)


class _Garbage(mlflow.pyfunc.PythonModel):
    """A version that answers as an untrained model does: fragments of real words around U+FFFD."""

    def answer_raw(self, model_input):
        return ["벽지\ufffd\ufffd가 들\ufffd뜨는 습\ufffd기" for _ in range(len(model_input))]

    def predict(self, context, model_input, params=None):
        return [a.replace("\ufffd", "") for a in self.answer_raw(model_input)]


def _register(store, name: str, tuned: float, base: float = 0.3, n: int = 30, prefix: str = "q",
              model: mlflow.pyfunc.PythonModel | None = None) -> str:
    """A registered version whose run carries an eval table (no training needed to judge it)."""
    from loraops.registry.tracking import experiment_for, tracking_setup

    tracking_setup(store)
    table = pd.DataFrame({"question": [f"{prefix}{i}" for i in range(n)],
                          "reference": ["벽지가 들뜨는 원인은 습기입니다."] * n,
                          "category": ["a", "b", "c"] * (n // 3), "base_morph_f1": [base] * n,
                          "tuned_morph_f1": [tuned + 0.01 * (i % 3) for i in range(n)],
                          "base_degenerate": [False] * n, "tuned_degenerate": [False] * n,
                          "base_answer": ["모르겠습니다"] * n, "tuned_answer": ["습기 때문입니다"] * n})
    with mlflow.start_run(experiment_id=experiment_for(name, store)):
        mlflow.log_text(table.to_csv(index=False), "eval/eval_questions.csv")
        info = mlflow.pyfunc.log_model(name="model", python_model=model or _Echo(), pip_requirements=["mlflow"])
    return str(mlflow.register_model(info.model_uri, name).version)


def test_a_refusal_is_recorded_on_the_refused_candidate(store):
    params = load_params(REPO / "params.yaml", ["registry.gate.min_test_size=5"])
    assert registry.promote("m", _register(store, "m", 0.6), params).promoted
    worse = _register(store, "m", 0.4)
    result = registry.promote("m", worse, params)
    assert not result.promoted
    client = mlflow.MlflowClient()
    mv = client.get_model_version("m", worse)
    assert mv.tags["gate.verdict"] == "refused" and mv.tags["gate.against"] == "production v1"
    assert mv.description.startswith("## Gate: REFUSED vs production v1") and "not measurably better" in mv.description
    audits = {k: json.loads(v) for k, v in mv.tags.items() if k.startswith("audit ")}
    assert [(k.endswith(" refuse"), v["action"], v["version"], v["production stays"]) for k, v in audits.items()] == [
        (True, "refuse", worse, "1")]  # a refusal says what it judged and that production stayed, not from/to
    assert not any(k.startswith("audit ") and "refuse" in v for k, v in client.get_model_version("m", "1").tags.items())
    names = [r.info.run_name for r in client.search_runs([client.get_experiment_by_name("m-audit").experiment_id],
                                                         order_by=["attributes.start_time ASC"])]
    assert names == ["promote v-→v1", "refuse v2 (production v1)"]
    described = client.get_experiment_by_name("m-audit").tags["mlflow.note.content"]  # the experiment page says what
    assert described.startswith("Audit trail of the registered model `m`")


def test_production_re_evaluated_on_new_questions_is_judged_like_the_candidate(store):
    """Production answering garbage on the candidate's new questions scores 0 there and counts as degenerate,
    as it would in evaluate; its cleaned answers would otherwise score like real text."""
    params = load_params(REPO / "params.yaml", ["registry.gate.min_test_size=5"])
    assert registry.promote("m", _register(store, "m", 0.6, model=_Garbage()), params).promoted
    candidate = _register(store, "m", 0.5, prefix="new")  # questions production's eval table does not have
    result = registry.promote("m", candidate, params)
    decision = result.decision
    assert decision is not None and decision.against == "production v1 (re-evaluated)"
    assert decision.figures["reference"] == 0.0 and decision.figures["degenerate_rate"]["reference"] == 1.0
    assert result.promoted


def test_two_promotions_at_once_leave_one_consistent_production_and_two_audit_entries(store):
    first, second = _register(store, "m", 0.6), _register(store, "m", 0.8)
    cmd = [sys.executable, "-m", "loraops.cli", "promote", "m", "--params", str(REPO / "params.yaml"),
           "--set", "registry.gate.min_test_size=5", "--version"]
    procs = [subprocess.Popen([*cmd, v], cwd=store, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for v in (first, second)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert all("Traceback" not in err for _, err in outputs), outputs
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("m", "production").version) == second  # whichever ran first
    trail = registry.audit_trail("m")
    assert len(trail) == 2 and sorted(t["to"] for t in trail) == sorted([first, second])
    history = json.loads(client.get_registered_model("m").tags[registry.HISTORY_TAG])
    assert history[-1] == second and len(history) == len(set(history))


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

    from loraops.registry.tracking import close_runs_of, experiment_for, tracking_setup

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

    from loraops.registry.tracking import experiment_for, tracking_setup

    tracking_setup(store)
    run = mlflow.MlflowClient().create_run(experiment_for("m", store))
    with pytest.raises(registry.RegistryError, match=r"no lineage.json; without its lineage card"):
        from loraops.registry.reproduce import _lineage

        _lineage(run.info.run_id)


@pytest.mark.slow
def test_no_answer_within_the_approval_timeout_rejects_and_moves_nothing(store):
    """require_approval: the promote flow pauses after the gate passes; nobody answering is a rejection, audited."""
    from prefect import flow

    from loraops.review.approval import with_approval

    params = load_params(REPO / "params.yaml", ["registry.gate.min_test_size=5", "registry.gate.require_approval=true",
                                                "registry.gate.approval_timeout_hours=0.0006"])  # about 2 seconds
    version = _register(store, "m", 0.6)

    @flow
    def promote_with_approval() -> dict:
        return with_approval("m", version, params).to_dict()

    result = promote_with_approval()
    assert result["promoted"] is False and result["approval"] == {"reviewer": "(nobody)", "approved": False,
                                                                   "comment": "no approval within 0.0006 h"}
    assert registry.alias_version(registry.mlflow_client(), "m", "production") is None
    assert [(a["action"], a["to"], a["comment"]) for a in registry.audit_trail("m")] == [
        ("reject", version, "no approval within 0.0006 h")]  # the reason is in the audit trail, not only in the log
    assert mlflow.MlflowClient().get_model_version("m", version).tags["gate.verdict"] == "rejected by reviewer"


def test_no_production_names_the_candidate_and_its_verdict_and_a_forced_broken_version_is_flagged(store):
    params = load_params(REPO / "params.yaml", ["registry.gate.min_test_size=5"])
    version = _register(store, "m", 0.29)  # no better than its base (0.30 on average): refused
    client = mlflow.MlflowClient()
    client.set_registered_model_alias("m", "candidate", version)
    assert not registry.promote("m", None, params).promoted
    with pytest.raises(registry.RegistryError) as err:
        registry.version_of("models:/m@production")
    assert "no alias @production; v1 is the candidate (gate: refused: mean morph_f1 gain" in str(err.value)
    assert "--model models:/m@candidate" in str(err.value)
    assert registry.version_of("models:/m/1") == ("m", "1") and registry.version_of("runs:/x/model") is None

    assert registry.floor_warning("m", "1") is None  # registered without the tag (an older version): no flag
    client.set_model_version_tag("m", "1", registry.QUALITY_TAG, "mostly broken: 77.8% of the answers are degenerate")
    assert "below the gate's quality floors (mostly broken: 77.8%" in registry.floor_warning("m", "1")
    client.set_model_version_tag("m", "1", registry.QUALITY_TAG, "ok")
    assert registry.floor_warning("m", "1") is None
    assert registry.floor_notice("m", "1", "not measured") is None  # no eval table at registration: nothing to say


def test_a_new_local_store_starts_from_the_migrated_empty_one_and_is_the_same_store(tmp_path, monkeypatch):
    """A fresh project's MLflow store is a copy of an empty store this MLflow version migrated once (in the user
    cache), with its Default experiment's artifacts under the project: the same tables and rows MLflow makes."""
    import sqlite3
    import time

    from loraops.core.paths import MLFLOW_DB, user_cache
    from loraops.registry import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("LORAOPS_CACHE_DIR", str(tmp_path / "cache"))
    assert user_cache("x") == tmp_path / "cache/x"
    first, second = tmp_path / "first", tmp_path / "second"
    for project in (first, second):
        project.mkdir()
        start = time.perf_counter()
        tracking.tracking_setup(project)
        took = time.perf_counter() - start
    assert took < 0.5, f"a second new store took {took:.2f}s: not copied from the empty one"
    assert (tmp_path / "cache/mlflow-store" / f"empty-mlflow-{mlflow.__version__}.db").is_file()

    def rows(project, table):
        with sqlite3.connect(project / MLFLOW_DB) as db:
            return db.execute(f"SELECT * FROM {table}").fetchall()  # noqa: S608 - table names from this test

    assert rows(second, "alembic_version") == rows(first, "alembic_version")
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    artifacts = (second / "mlruns/artifacts").resolve().as_uri()
    made = SqlAlchemyStore(f"sqlite:///{tmp_path / 'made.db'}", artifacts)  # the store MLflow itself makes there
    made.engine.dispose()
    experiment = mlflow.MlflowClient().get_experiment("0")
    assert experiment.artifact_location == made.get_experiment("0").artifact_location == f"{artifacts}/0"
    tables = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    with sqlite3.connect(second / MLFLOW_DB) as copied, sqlite3.connect(tmp_path / "made.db") as own:
        assert copied.execute(tables).fetchall() == own.execute(tables).fetchall()
        assert [r[:3] for r in copied.execute("SELECT * FROM experiments")] == \
            [r[:3] for r in own.execute("SELECT * FROM experiments")]  # id, name, artifact location
    with mlflow.start_run(experiment_id=tracking.experiment_for("m", second)) as run:
        mlflow.log_metric("a", 1.0)
    assert mlflow.MlflowClient().get_run(run.info.run_id).data.metrics == {"a": 1.0}
    for key in ("LORAOPS_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache("judge") == tmp_path / "xdg/loraops/judge"
