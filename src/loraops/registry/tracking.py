"""MLflow run contents: params, curves, eval metrics, the per-question table, reports and plots."""

from __future__ import annotations

import contextlib
import datetime
import csv
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import mlflow
import mlflow.exceptions
from mlflow.entities import Metric

from loraops.core.paths import (AUGMENT_CARD, DATA_CARD, EVAL_METRICS, EVAL_REPORT, EVAL_TABLE, LOCKS_DIR,
                                MLFLOW_ARTIFACTS, MLFLOW_DB, MLRUNS, PLOTS_DIR, TRAIN_LOG, TRAIN_METRICS, user_cache)
from loraops.core.results import TrainFigures

_BATCH = 900  # MLflow accepts up to 1000 metrics per log_batch
_USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
"""A tracking server that is down fails a request after ~10 s, not MLflow's default ~4 min; the flow's I/O
retries (``flows/finetune.py``) then try the step again a few times. Set the variables to change either."""


def tracking_setup(root: Path = Path(".")) -> str:
    """Point MLflow at ``MLFLOW_TRACKING_URI`` (as set by the user) or the local sqlite store under ``mlruns/``.

    MLflow exports the URI it is given to the environment; the user's own value is remembered at import,
    so a later call in another directory does not inherit a store chosen for the previous one.
    """
    uri = _USER_TRACKING_URI
    if uri and uri.startswith("http"):
        for key, value in HTTP_RETRIES.items():
            os.environ.setdefault(key, value)
    if not uri:
        (root / MLRUNS).mkdir(exist_ok=True)
        uri = f"sqlite:///{(root / MLFLOW_DB).resolve()}"
        _create_store_once(uri, root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def unreachable(exc: BaseException) -> bool:
    """Whether an MLflow error means the tracking server did not answer (down, restarting, unreachable)."""
    import requests

    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return True
    return (isinstance(exc, mlflow.exceptions.MlflowException) and "API request to" in exc.message
            and any(s in exc.message for s in ("Max retries exceeded", "Connection refused", "timed out", "Connection aborted")))


@contextlib.contextmanager
def reachable(doing: str) -> Iterator[None]:
    """Turn "the tracking server did not answer" into one clear TrackingError; other errors pass unchanged."""
    from loraops.core.errors import TrackingError

    try:
        yield
    except Exception as exc:
        if not unreachable(exc):
            raise
        retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
        raise TrackingError(f"the MLflow tracking server {mlflow.get_tracking_uri()} did not answer while {doing} "
                            f"({retries} retries per request, then the step's own retries). Rerun when it is back: "
                            "finished stages are not run again.") from None


_READY: set[str] = set()


def _create_store_once(uri: str, root: Path) -> None:
    """Create and migrate the local sqlite store under a file lock, once per process.

    MLflow creates its tables on first use; several processes doing that at once (three runs started
    together from the Prefect UI) race in alembic and fail. Under the lock the first one creates the
    store and the others find it ready. A new store starts as a copy of an empty one this MLflow version
    migrated before (``_empty_store``): its 60-odd migrations cost over a second on every fresh project.
    """
    if uri in _READY:
        return
    from filelock import FileLock
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    (root / LOCKS_DIR).mkdir(parents=True, exist_ok=True)
    artifacts = (root / MLFLOW_ARTIFACTS).resolve().as_uri()
    with FileLock(str(root / LOCKS_DIR / "store.lock"), timeout=600):
        database = Path(uri.removeprefix("sqlite:///"))
        if not database.exists():
            _copy_empty_store(database, artifacts)
        SqlAlchemyStore(uri, artifacts)  # an existing store: checked (and migrated when MLflow is newer)
        RegistryStore(uri)
    _READY.add(uri)


def _copy_empty_store(database: Path, artifacts: str) -> None:
    """Put a freshly migrated empty store at ``database`` (its Default experiment's artifacts under ``artifacts``,
    as MLflow would create it there); nothing when no empty store could be made (MLflow then creates it)."""
    import shutil
    import sqlite3

    empty = _empty_store()
    if empty is None:
        return
    partial = database.with_name(f".{database.name}.{os.getpid()}.tmp")
    shutil.copyfile(empty, partial)
    from mlflow.utils.uri import append_to_uri_path

    with contextlib.closing(sqlite3.connect(partial)) as db, db:  # where MLflow puts the Default experiment's: ROOT/0
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                   (append_to_uri_path(artifacts, "0"),))
    os.replace(partial, database)


def _empty_store() -> Path | None:
    """An empty store migrated by this MLflow version, kept in the user cache (made once, by the first project that
    needs it); None when the cache cannot be written."""
    from filelock import FileLock
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = user_cache("mlflow-store")
    empty = folder / f"empty-mlflow-{mlflow.__version__}.db"
    if empty.exists():
        return empty
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder / ".lock"), timeout=600):
            if not empty.exists():
                partial = folder / f".{empty.name}.{os.getpid()}.tmp"
                partial.unlink(missing_ok=True)
                store = SqlAlchemyStore(f"sqlite:///{partial}", (folder / "artifacts").as_uri())
                store.engine.dispose()
                os.replace(partial, empty)
    except OSError:  # a read-only home: every new store is migrated from scratch, as before
        return None
    return empty


EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
"""Marks an experiment as model training, so the MLflow 3 UI opens on its runs, not on the GenAI traces page."""


def experiment_description(name: str) -> str:
    """What an experiment's page says it holds (MLflow shows ``mlflow.note.content`` as its description)."""
    if name.endswith("-audit"):
        model = name.removesuffix("-audit")
        return (f"Audit trail of the registered model `{model}`: one run per promote, refusal, reviewer's rejection "
                "or rollback, named after what it did (`promote v1→v2`, `refuse v3 (production v2)`), with who did "
                "it, the reason and the reviewer's comment (written by loraops; nothing trains here).")
    return (f"Fine-tuning runs of the LoRA adapter `{name}` (loraops): one run per `loraops run` or finetune flow run. "
            "Charts: `gate/` (the gate metric vs the base, and vs production once the gate compared them), `train/` "
            "curves, `tuned/` and `vs_base/` per metric. A run's `gate.verdict` tag and description say whether its "
            "version was promoted or refused and against what.")


def experiment_for(model_name: str, root: Path = Path(".")) -> str:
    """The experiment of a registered model (one per model), created with a local artifact root."""
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(model_name)
    if found is not None:
        if found.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND["mlflow.experimentKind"]:
            client.set_experiment_tag(found.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        if "mlflow.note.content" not in found.tags:
            client.set_experiment_tag(found.experiment_id, "mlflow.note.content", experiment_description(model_name))
        return found.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        location = (root / MLFLOW_ARTIFACTS).resolve().as_uri()
    try:
        return client.create_experiment(model_name, artifact_location=location,
                                        tags=EXPERIMENT_KIND | {"mlflow.note.content": experiment_description(model_name)})
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        created = client.get_experiment_by_name(model_name)  # a concurrent run created it first
        if created is None:
            raise
        return created.experiment_id


def close_runs_of(flow_run_id: str, status: str) -> int:
    """Mark the still-RUNNING MLflow runs of a Prefect flow run as ``status`` (KILLED/FAILED); return how many."""
    client = mlflow.MlflowClient()
    closed = 0
    for experiment in client.search_experiments():
        query = f"tags.`prefect.flow_run_id` = '{flow_run_id}' and attributes.status = 'RUNNING'"
        for run in client.search_runs([experiment.experiment_id], query):
            client.set_terminated(run.info.run_id, status)
            closed += 1
    return closed


def owner_tags() -> dict[str, str]:
    """Which process owns a run (host, pid and the pid's start time), so a later run can tell a dead owner."""
    import psutil

    from loraops.core.concurrency import host_name

    me = psutil.Process()
    started = datetime.datetime.fromtimestamp(me.create_time()).astimezone().isoformat(timespec="milliseconds")
    return {"loraops.host": host_name(), "loraops.pid": str(me.pid), "loraops.pid_started": started}


def _started_at(tag: str) -> float:
    """``loraops.pid_started`` as a POSIX time: ISO 8601 with its offset (a number in runs logged before)."""
    try:
        return float(tag)
    except ValueError:
        return datetime.datetime.fromisoformat(tag).timestamp()


def close_orphans(experiment_id: str) -> list[str]:
    """Mark KILLED the RUNNING runs whose owning process on this host is gone (a SIGKILL, an OOM kill, a reboot).

    Runs owned by another host are left alone: their owner may be alive. Returns the closed run ids.
    """
    import psutil

    from loraops.core.concurrency import host_name

    client, host, closed = mlflow.MlflowClient(), host_name(), []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'"):
        tags = run.data.tags
        if tags.get("loraops.host") != host or "loraops.pid" not in tags:
            continue
        try:
            alive = abs(psutil.Process(int(tags["loraops.pid"])).create_time() - _started_at(tags["loraops.pid_started"])) < 1
        except (psutil.Error, ValueError):
            alive = False
        if not alive:
            client.set_tag(run.info.run_id, "loraops.closed_because", "its process died without closing it")
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def run_name(params: Any) -> str:
    """A readable run name: base, learning rate, rank, steps and a timestamp."""
    base = Path(params.model.base).name or params.model.base
    return f"{base}-lr{params.train.learning_rate:g}-r{params.lora.r}-s{params.train.max_steps}-{time.strftime('%m%d-%H%M%S')}"


def log_params(params: Any, run_id: str | None = None) -> None:
    """Flattened dotted params (``train.learning_rate``), long values as text; to the active run, or to ``run_id``."""
    from mlflow.entities import Param

    from loraops.core.secrets import redact

    flat = {key: json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else value
            for key, value in params.flat().items()}
    if run_id is None:
        mlflow.log_params(redact(flat))
        return
    items = [Param(key, str(value)[:6000]) for key, value in redact(flat).items()]
    for start in range(0, len(items), 100):
        mlflow.MlflowClient().log_batch(run_id, params=items[start: start + 100])


def train_figures(figures: TrainFigures) -> dict[str, float]:
    """The train stage's figures as metrics (``train/best_val_loss``, ``train/cv_val_loss_mean`` …)."""
    values = {"best_val_loss": figures.best_val_loss, "steps": figures.steps, "train_seconds": figures.train_seconds,
              "train_pairs": figures.train_pairs}  # not train_loss: the curve of that name has it, step by step
    out = {f"train/{key}": float(value) for key, value in values.items() if value is not None}
    if figures.cv is not None:
        out |= {"train/cv_val_loss_mean": figures.cv.val_loss_mean, "train/cv_val_loss_sd": figures.cv.val_loss_sd}
        out |= {f"train/cv_fold_{i}_val_loss": loss for i, loss in enumerate(figures.cv.val_loss)}
    return out


def log_metrics_batch(run_id: str, values: dict[str, float], step: int = 0) -> None:
    """Log many metrics in few requests."""
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    items = [Metric(key, float(value), now, step) for key, value in values.items() if value is not None]
    for start in range(0, len(items), _BATCH):
        client.log_batch(run_id, metrics=items[start: start + _BATCH])


def log_curves(run_id: str, path: Path) -> int:
    """Per-step train/validation loss and learning rate from the train stage's CSV; returns rows logged."""
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    items = []
    with path.open(encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            for key in ("train_loss", "val_loss", "learning_rate"):
                if row.get(key):
                    items.append(Metric(f"train/{key}", float(row[key]), now, int(row["step"])))
    for start in range(0, len(items), _BATCH):
        client.log_batch(run_id, metrics=items[start: start + _BATCH])
    return len(items)


def log_eval(run_id: str, root: Path, flat: dict[str, float], details: tuple[dict[str, Any], Any] | None = None) -> None:
    """Headline metrics, the per-question table and the slices (``mlflow.log_table``), details, report, plots, cards."""
    import pandas as pd

    log_metrics_batch(run_id, flat)
    table = pd.read_csv(root / EVAL_TABLE, keep_default_na=False)
    mlflow.log_table(table, artifact_file="eval/questions.json")
    if details is not None:
        mlflow.log_dict(details[0], "eval/details.json")
        if len(details[1]):
            mlflow.log_table(details[1], artifact_file="eval/slices.json")
    for path in (EVAL_TABLE, EVAL_REPORT, EVAL_METRICS):
        mlflow.log_artifact(str(root / path), "eval")
    for png in sorted((root / PLOTS_DIR).glob("*.png")):
        mlflow.log_artifact(str(png), "eval/plots")
    for name in (DATA_CARD, AUGMENT_CARD, TRAIN_METRICS, TRAIN_LOG):
        if (root / name).exists():
            mlflow.log_artifact(str(root / name), "stages/" + name.parent.name if name == AUGMENT_CARD else "stages")
    if (root / TRAIN_METRICS).exists():  # best validation loss, cross-validation mean ± sd per fold
        log_metrics_batch(run_id, train_figures(TrainFigures.read(root)))
    _loss_plot(root)


def _loss_plot(root: Path) -> None:
    from loraops.judge.report import korean_font

    korean_font()
    import matplotlib.pyplot as plt
    import pandas as pd

    path = root / TRAIN_LOG
    if not path.exists():
        return
    log = pd.read_csv(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for column in ("train_loss", "val_loss"):
        part = log.dropna(subset=[column]) if column in log else None
        if part is not None and len(part):
            ax.plot(part["step"], part[column], label=column, marker="." if column == "val_loss" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    mlflow.log_figure(fig, "train/loss_curves.png")
    plt.close(fig)


def log_rating_trace(run_id: str, key: str, question: str, answer: str, tags: dict[str, str], rater: str,
                     scores: dict[str, Any], judge: dict[str, Any] | None = None) -> str:
    """One rated answer as an MLflow trace of ``run_id`` (its experiment's Traces tab), with MLflow assessments: the
    rater's scores as ``HUMAN`` feedback and the LLM judge's, with its reasons, as ``LLM_JUDGE`` feedback, so the UI
    shows both side by side. A rating saved again under the same ``key`` reuses its trace and adds only changed
    scores. Returns the trace id."""
    from mlflow.entities import AssessmentSource

    client = mlflow.MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    tag = f"{run_id}/{key}"  # a base answer rated beside two versions is a rating in each version's run
    found = mlflow.search_traces(locations=[experiment], filter_string=f"tag.`loraops.rating` = '{tag}'",
                                 return_type="list", max_results=1)
    if found:
        trace_id = found[0].info.trace_id
        known = {(a.name, a.source.source_type, a.source.source_id): a.value for a in found[0].info.assessments or []}
    else:
        span = client.start_trace("demo answer", inputs={"question": question}, experiment_id=experiment, run_id=run_id,
                                  tags={"loraops.rating": tag, **tags})
        client.end_trace(span.trace_id, outputs={"answer": answer})
        mlflow.flush_trace_async_logging()
        trace_id, known = span.trace_id, {}
    wanted = [(name, value, AssessmentSource(source_type="HUMAN", source_id=rater), None)
              for name, value in scores.items() if value is not None]
    if judge and judge.get("scores"):
        source = AssessmentSource(source_type="LLM_JUDGE", source_id=str(judge.get("model") or "judge"))
        wanted += [(name, value, source, (judge.get("reasons") or {}).get(name)) for name, value in judge["scores"].items()]
    for name, value, source, rationale in wanted:
        if known.get((name, source.source_type, source.source_id)) != value:
            mlflow.log_feedback(trace_id=trace_id, name=name, value=value, source=source, rationale=rationale)
    return str(trace_id)
