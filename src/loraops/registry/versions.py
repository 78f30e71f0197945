"""The MLflow registry: register adapters, move aliases through the gate, roll back, audit every move.

Only this module (with `tracking`) talks to MLflow. Aliases: ``candidate`` (newest registered) and
``production`` (moved only by `promote` when the gate passes, or by a recorded `--force`, or `rollback`).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import time
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from loraops.core import events
from loraops.core.config import Params
from loraops.core.errors import LoraopsError, RegistryError
from loraops.core.paths import INDEX_DIR
from loraops.core.results import Decision, Promotion, Signoff
from loraops.judge.gate import decide, scores_from_table
from loraops.registry.tracking import experiment_for, log_metrics_batch, tracking_setup

HISTORY_TAG = "loraops.production_history"
SHA_TAG = "loraops.adapter_sha256"




def mlflow_client() -> mlflow.MlflowClient:
    tracking_setup()
    return mlflow.MlflowClient()


def actor() -> str:
    """Who moves an alias: the Prefect flow run when inside one, else the OS user."""
    with contextlib.suppress(Exception):
        from prefect.runtime import flow_run

        if flow_run.id:
            return f"prefect-flow-run:{flow_run.id} ({flow_run.name})"
    return f"user:{getpass.getuser()}"


def register(params: Params, run_id: str, adapter_dir: Path, base_location: str, adapter_sha: str,
             lineage: dict[str, Any], description: str | None = None) -> dict[str, Any]:
    """Log the pyfunc model in ``run_id``, register a version, tag it with the lineage, alias it ``candidate``.

    An adapter already registered under the same sha256 is not registered again; the candidate alias
    moves to the existing version.
    """
    from loraops.core.text import template_fields
    from loraops.core.utils import write_json
    from loraops.registry import modelspec

    client, name = mlflow_client(), params.registry.model_name
    existing = versions_of(client, name, f"tags.`{SHA_TAG}` = '{adapter_sha}'")
    if existing:
        reused = str(existing[0].version)
        client.set_registered_model_alias(name, "candidate", reused)
        return {"name": name, "version": reused, "reused": True}
    spec_dir = adapter_dir.parent / ".pyfunc-spec"
    spec_dir.mkdir(parents=True, exist_ok=True)
    floors = quality_of(adapter_dir.parent.parent, params)
    write_json(spec_dir / "spec.json", {**modelspec.model_spec(params, base_location), "quality": floors})
    write_json(spec_dir / "lineage.json", lineage)
    artifacts = {"adapter": str(adapter_dir), "spec": str(spec_dir / "spec.json"), "lineage": str(spec_dir / "lineage.json")}
    if modelspec.should_bundle(base_location):
        artifacts["base"] = base_location
    if params.rag.enabled:  # the configuration registered is adapter + retrieval: the index travels with it
        artifacts["index"] = str(adapter_dir.parent.parent / INDEX_DIR)
    import loraops

    example = _input_example(params, adapter_dir) if modelspec.should_bundle(base_location) else None
    with mlflow.start_run(run_id=run_id), _requirements_by_metadata():
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(modelspec.PYFUNC_MODEL), artifacts=artifacts,
            code_paths=[str(Path(loraops.__file__).parent)], pip_requirements=_requirements(params.rag.enabled),
            signature=modelspec.signature(template_fields(params.prompt_template),
                                      retrieval=params.rag.enabled),
            input_example=example,
        )
    quality_tag = "; ".join(floors.get("breaches", [])) or "ok" if floors else "not measured"
    version = mlflow.register_model(info.model_uri, name, tags={SHA_TAG: adapter_sha, QUALITY_TAG: quality_tag[:4900],
                                                               **_lineage_tags(lineage)})
    if description:
        client.update_model_version(name, version.version, description=description)
    client.set_registered_model_alias(name, "candidate", version.version)
    return {"name": name, "version": str(version.version), "reused": False}


def _input_example(params: Params, adapter_dir: Path) -> Any:
    """Two test questions as the model's input example (MLflow answers them once to check the model serves).

    Only for bases small enough to travel inside the model: a hub base would be loaded in full just for that.
    """
    from loraops.core.readers import load_split
    from loraops.core.text import template_fields

    root = adapter_dir.parent.parent
    try:
        rows = load_split("test", root)[:2]
    except LoraopsError:
        return None
    others = [f for f in dict.fromkeys(template_fields(params.prompt_template)) if f not in ("question", "context")]
    if not rows:
        return None
    if not others:
        return [row["question"] for row in rows]
    return pd.DataFrame([{"question": row["question"],
                          **{f: str(row.get(f, row.get("attributes", {}).get(f, ""))) for f in others}} for row in rows])


def _requirements(retrieval: bool = False) -> list[str]:
    from importlib.metadata import version

    packages = ["torch", "transformers", "peft", "mlflow", "pandas", "pydantic", "tokenizers"]
    packages += ["bm25s", "kiwipiepy", "kiwipiepy-model"] if retrieval else []
    return [f"{pkg}=={version(pkg)}" for pkg in packages]


@contextlib.contextmanager
def _requirements_by_metadata() -> Any:
    """MLflow checks a model's pip requirements against the installed packages by each package's metadata, but
    first maps every installed distribution's files to its modules (about 1.5 s a registration), a map it consults
    only for a package without metadata. Ours come from the installed packages' metadata (``_requirements``), so
    during log_model MLflow starts from an empty map: the same check, without the scan. (A private MLflow global;
    if it is gone, MLflow builds its map as before.)"""
    from mlflow.utils import requirements_utils

    if getattr(requirements_utils, "_MODULES_TO_PACKAGES", False) is not None:  # built already, or no such global
        yield
        return
    setattr(requirements_utils, "_MODULES_TO_PACKAGES", {})  # noqa: B010 - typed None in MLflow; a dict is what it builds
    try:
        yield
    finally:
        setattr(requirements_utils, "_MODULES_TO_PACKAGES", None)  # noqa: B010 - as above


def _lineage_tags(lineage: dict[str, Any]) -> dict[str, str]:
    keys = ("git_commit", "git_dirty", "dvc_lock_md5", "base_model", "base_revision", "prompt", "seed", "prefect_flow_run_id",
            "mlflow_run_id")
    return {f"lineage.{k}": str(lineage.get(k)) for k in keys if k in lineage}


def versions_of(client: mlflow.MlflowClient, name: str, extra: str = "") -> list[Any]:
    query = f"name = '{name}'" + (f" and {extra}" if extra else "")
    return sorted(client.search_model_versions(query), key=lambda v: int(v.version))


def resolve(client: mlflow.MlflowClient, name: str, version: str | None = None, alias: str | None = None) -> Any:
    """The model version for a number or alias.

    Raises:
        RegistryError: unknown model, version or alias.
    """
    try:
        client.get_registered_model(name)
    except MlflowException:
        known = ", ".join(m.name for m in client.search_registered_models()) or "none"
        raise RegistryError(f"no registered model {name!r}; registered: {known}") from None
    try:
        if version:
            return client.get_model_version(name, version)
        if not alias:
            raise RegistryError("give a version or an alias")
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        what = f"version {version}" if version else f"alias @{alias}"
        raise RegistryError(f"model {name!r} has no {what}{_what_there_is(client, name)}") from None


def _what_there_is(client: mlflow.MlflowClient, name: str) -> str:
    """For a missing alias: which version is the candidate and what the gate said of it."""
    try:
        candidate = client.get_model_version_by_alias(name, "candidate")
    except MlflowException:
        return ""
    verdict = candidate.tags.get("gate.verdict", "not gated yet")
    reasons = json.loads(candidate.tags.get("gate.reasons", "[]") or "[]")
    why = f": {reasons[0]}" if verdict == "refused" and reasons else ""
    return (f"; v{candidate.version} is the candidate (gate: {verdict}{why}); ask it with "
            f"--model models:/{name}@candidate, or promote it with `loraops promote`")


QUALITY_TAG = "quality.floors"
"""On every registered version: ``ok``, or the gate floors its tuned answers breach (``registry.gate.max_degenerate_rate``,
``min_distinct_share``), so whoever serves a forced version is told."""


def quality_of(root: Path, params: Params) -> dict[str, Any]:
    """The floors measured on the tuned answers of the run's eval table (``reports/eval_questions.csv``)."""
    from loraops.core.paths import EVAL_TABLE
    from loraops.judge.gate import quality

    path = root / EVAL_TABLE
    if not path.exists():
        return {}
    table = pd.read_csv(path, keep_default_na=False)
    column = f"tuned_{params.registry.gate.metric}"
    if column not in table.columns:
        return {}
    return quality(scores_from_table(table, column), params.registry.gate).to_dict()


def version_of(uri: str) -> tuple[str, str] | None:
    """``models:/name@alias`` or ``models:/name/version`` → (name, version number); None for other URIs.

    Raises:
        RegistryError: unknown model, version or alias (a missing alias names the candidate and its verdict).
    """
    if not uri.startswith("models:/"):
        return None
    ref = uri[len("models:/"):]
    name, alias = ref.split("@", 1) if "@" in ref else (ref.rsplit("/", 1)[0], None)
    number = None if alias else ref.rsplit("/", 1)[-1]
    return name, str(resolve(mlflow_client(), name, version=number, alias=alias).version)


def floor_warning(name: str, version: str) -> str | None:
    """A warning for a served version whose tuned answers breach a gate floor (it can only be production if forced)."""
    try:
        mv = mlflow_client().get_model_version(name, str(version))
    except MlflowException:
        return None
    return floor_notice(name, str(version), mv.tags.get(QUALITY_TAG))


def floor_notice(name: str, version: str, tag: str | None) -> str | None:
    """The warning text for a ``quality.floors`` tag, or None when the version is within the floors."""
    if not tag or tag in ("ok", "not measured"):
        return None
    return f"warning: {name} v{version} is below the gate's quality floors ({tag}); its answers may be broken"


def run_artifact(run_id: str, artifact_path: str, missing: str) -> Path:
    """Download one artifact of a run.

    Raises:
        RegistryError: ``missing`` (what the caller cannot do without it) when the run or the file is absent.
    """
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path))
    except (MlflowException, OSError):
        raise RegistryError(f"run {run_id}: no {artifact_path}; {missing}") from None


def eval_table_of_run(run_id: str) -> pd.DataFrame:
    """The per-question eval table logged in a run (``eval/eval_questions.csv``)."""
    return pd.read_csv(run_artifact(run_id, "eval/eval_questions.csv", "the run has no eval table"), keep_default_na=False)


def eval_table(client: mlflow.MlflowClient, mv: Any) -> pd.DataFrame:
    """The per-question eval table logged in a version's run.

    Raises:
        RegistryError: when the version has no run or no eval table (no lineage to judge it by).
    """
    if not mv.run_id:
        raise RegistryError(f"version {mv.version} of {mv.name!r} has no MLflow run, so no lineage card or eval table")
    return eval_table_of_run(mv.run_id)


def losses_against_production(name: str, version: str, metric: str, n: int = 10, width: int = 120
                              ) -> list[dict[str, Any]]:
    """The ``n`` questions where ``version`` lost most to the production version on ``metric`` (both versions' own
    evaluations, on the questions they share); empty when there is no production or it is ``version``."""
    client = mlflow_client()
    production = alias_version(client, name, "production")
    if production is None or production == str(version):
        return []
    ours = eval_table(client, client.get_model_version(name, str(version)))
    theirs = eval_table(client, client.get_model_version(name, production))
    column = f"tuned_{metric}"
    if column not in ours or column not in theirs:
        return []
    both = ours.merge(theirs[["question", "reference", column, "tuned_answer"]], on=["question", "reference"],
                      suffixes=("", "_production"))
    both["delta"] = both[column] - both[f"{column}_production"]
    worst = both[both["delta"] < 0].sort_values("delta").drop_duplicates("question").head(n)
    cut = lambda text: text if len(text) <= width else text[: width - 1] + "…"
    return [{"delta": round(float(r["delta"]), 4), "question": cut(str(r["question"])),
             f"production v{production}": cut(str(r["tuned_answer_production"])),
             f"candidate v{version}": cut(str(r["tuned_answer"]))} for _, r in worst.iterrows()]


def _lock(name: str, timeout: float | None = None) -> Any:
    """One promote/rollback per model at a time (see `loraops.core.concurrency.promotion_lock`)."""
    from loraops.core.concurrency import promotion_lock

    return promotion_lock(name, actor(), timeout)


def _reference_scores(client: mlflow.MlflowClient, name: str, candidate: pd.DataFrame, params: Params,
                      metric: str) -> tuple[pd.DataFrame, str]:
    """Production's scores on the candidate's questions, or the base model's when there is no production."""
    try:
        prod = client.get_model_version_by_alias(name, "production")
    except MlflowException:
        return scores_from_table(candidate, f"base_{metric}"), "base model (no production yet)"
    table = eval_table(client, prod)
    keys = lambda t: set(zip(t["question"], t["reference"]))
    if keys(table) >= keys(candidate) and f"tuned_{metric}" in table.columns:
        return scores_from_table(table, f"tuned_{metric}"), f"production v{prod.version}"
    return _rescore(f"models:/{name}/{prod.version}", candidate, params, metric), f"production v{prod.version} (re-evaluated)"


def load_model(uri: str) -> Any:
    """Load a registered model (its pyfunc), turning MLflow's not-found errors into RegistryError."""
    tracking_setup()
    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as exc:
        raise RegistryError(f"{uri}: {exc.message.splitlines()[0]}") from None


def _rescore(uri: str, candidate: pd.DataFrame, params: Params, metric: str) -> pd.DataFrame:
    """Answer the candidate's test questions with another registered version and judge them as evaluate does.

    The answers are judged as generated (undecodable characters included) and degenerate ones score 0,
    so production is held to the same standard as the candidate.
    """
    from loraops.judge.metrics import MetricPack, family_of

    fields = ["question", "category", *(c for c in params.data.attribute_columns if c in candidate.columns)]
    inputs = candidate[fields].astype(str).drop_duplicates()  # the prompt depends on every template field, not the question alone
    model = load_model(uri).unwrap_python_model()
    answers = dict(zip(map(tuple, inputs.to_numpy()), model.answer_raw(inputs)))
    keys = map(tuple, candidate[fields].astype(str).to_numpy())
    raw = [answers[key] for key in keys]
    frame = candidate[["question", "reference", "category"]].copy()
    if metric.startswith("judge_"):  # production evaluated before the judge was on: the same judge scores it now
        from loraops.judge.degenerate import detect
        from loraops.judge.llm import Judge, require_parsed

        reasons = [detect(a, r) for a, r in zip(raw, candidate["reference"])]
        asked = [(q, r, a) for q, r, a, why in zip(candidate["question"], candidate["reference"], raw, reasons) if why is None]
        verdicts = iter(Judge(params.eval.judge).score(asked))
        mine = [None if why else next(verdicts) for why in reasons]
        require_parsed([v for v in mine if v is not None], params.eval.judge, f"{uri}'s answers")
        criterion = metric.removeprefix("judge_")
        frame["score"] = [1.0 if v is None else (float(v.scores[criterion]) if v.scores else float("nan")) for v in mine]
    else:
        pack = MetricPack(params.eval.model_copy(update={"metrics": [family_of(metric)]}))
        scores, reasons = pack.judge(raw, list(candidate["reference"]))
        frame["score"] = scores[metric]
    frame["degenerate"] = [reason is not None for reason in reasons]
    return frame


def promote(name: str, version: str | None, params: Params, force: bool = False, reason: str | None = None,
            approval: Signoff | None = None, dry_run: bool = False, evidence_run: str | None = None) -> Promotion:
    """Move ``production`` to ``version`` (default: ``candidate``) when the gate passes, or when forced with a reason.

    ``approval`` (``reviewer``, ``comment``) is the human sign-off ``registry.gate.require_approval`` asks for; it is
    recorded with the promotion. ``dry_run`` judges without moving, tagging or auditing anything (what the reviewer
    is shown before approving). ``evidence_run``: judge by that run's eval table instead of the version's own run's (a
    run that evaluated an already registered adapter again, e.g. with the LLM judge on).

    Raises:
        RegistryError: unknown model/version, no eval table, a concurrent promote, or --force without --reason.
    """
    if force and not reason:
        raise RegistryError("--force needs --reason \"...\" (it is recorded in the audit trail)")
    client = mlflow_client()
    with _lock(name):
        mv = resolve(client, name, version=version, alias=None if version else "candidate")
        previous = alias_version(client, name, "production")
        if previous == str(mv.version):
            decision = Decision(True, [f"v{previous} is already production; nothing to move"], f"production v{previous}")
            return Promotion(name, previous, previous, promoted=True, reason=reason, decision=decision)
        decision = _judge(client, name, mv, params, evidence_run)
        target = str(mv.version)
        if dry_run:
            return Promotion(name, target, previous, promoted=False, passed=decision.promote, reason=reason,
                             decision=decision)
        moved = decision.promote or force
        if moved and previous != target:
            _move_production(client, name, target, previous)
        result = Promotion(name, target, previous, promoted=moved, forced=force and not decision.promote, reason=reason,
                           decision=decision, approval=approval)
        record_verdict(client, name, target, result)
        audit(client, name, "promote" if moved else "refuse", previous, target, result.to_dict())
        return result


def _judge(client: mlflow.MlflowClient, name: str, mv: Any, params: Params, evidence_run: str | None = None) -> Decision:
    """The gate's decision on version ``mv`` against production (or the base model when there is none), on the eval
    table of ``evidence_run`` when given, else of the version's run."""
    policy = params.registry.gate
    if policy.metric.startswith("judge_"):  # calibrated when the run started; still so now (thresholds may have moved)
        from loraops.registry.judging import require_calibrated

        require_calibrated(params)
    candidate = eval_table_of_run(evidence_run) if evidence_run else eval_table(client, mv)
    if f"tuned_{policy.metric}" not in candidate.columns:
        raise RegistryError(f"registry.gate.metric: {policy.metric!r} is not in the eval table of v{mv.version}")
    reference, against = _reference_scores(client, name, candidate, params, policy.metric)
    rubric = client.get_run(mv.run_id).data.metrics.get("review/mean/tuned")
    attributes = tuple(params.data.attribute_columns)
    return decide(scores_from_table(candidate, f"tuned_{policy.metric}", attributes), reference, policy, against,
                  params.eval.bootstrap_samples, params.base.seed, params.eval.min_slice_size, rubric, slices=attributes)


def reject(name: str, version: str, reviewer: str, comment: str, verdict: Promotion) -> Promotion:
    """Record a reviewer's rejection (or an approval that never came) of a version the gate passed: nothing moves."""
    client = mlflow_client()
    previous = alias_version(client, name, "production")
    result = Promotion(name, str(version), previous, promoted=False, reason=comment, decision=verdict.decision,
                       approval=Signoff(reviewer, comment, approved=False))
    client.set_model_version_tag(name, str(version), "gate.verdict", "rejected by reviewer")
    client.set_model_version_tag(name, str(version), "gate.reviewer", reviewer)
    audit(client, name, "reject", previous, str(version), result.to_dict())
    return result


def review_sample(name: str, version: str, params: Params, per_slice: int = 2) -> list[dict[str, str]]:
    """What a reviewer reads before approving: per slice (every category and attribute value), up to ``per_slice``
    test questions with the candidate's answer and production's (from production's own evaluation, where it
    answered the same question), seeded."""
    client = mlflow_client()
    candidate = eval_table(client, client.get_model_version(name, str(version)))
    production_answers: dict[tuple[str, str], str] = {}
    prod = alias_version(client, name, "production")
    if prod:
        table = eval_table(client, client.get_model_version(name, prod))
        production_answers = dict(zip(zip(table["question"], table["reference"]), table["tuned_answer"]))
    columns = ["category", *(c for c in params.data.attribute_columns if c in candidate.columns)]
    picked: dict[int, str] = {}
    for column in columns:
        for value, part in candidate.drop_duplicates(["question", *columns]).groupby(column, sort=True):
            for index in part.sample(min(per_slice, len(part)), random_state=params.base.seed).index:
                picked.setdefault(index, f"{column} = {value}")
    rows = []
    for index, where in picked.items():
        row = candidate.loc[index]
        rows.append({"slice": where, "question": str(row["question"]),
                     **{c: str(row[c]) for c in columns if c != "category"},
                     "candidate": str(row["tuned_answer"]),
                     "production": production_answers.get((row["question"], row["reference"]), "—") if prod
                     else str(row["base_answer"]),
                     "reference": str(row["reference"])})
    return rows


def record_verdict(client: mlflow.MlflowClient, name: str, version: str, result: Promotion) -> None:
    """Put the gate's decision and its reasons on the judged version (tags, description) and on the MLflow run that
    trained it (the same tags, and its description), so the run's page says "refused" too."""
    verdict = "forced" if result.forced else ("promoted" if result.promoted else "refused")
    decision = result.decision or Decision(result.promoted, [], "nothing")
    client.set_model_version_tag(name, version, "gate.verdict", verdict)
    client.set_model_version_tag(name, version, "gate.against", decision.against)
    client.set_model_version_tag(name, version, "gate.reasons", json.dumps(decision.reasons, ensure_ascii=False)[:4900])
    mv = client.get_model_version(name, version)
    head = (mv.description or "").split("\n\n## Gate", 1)[0]
    lines = [f"## Gate: {verdict.upper()} vs {decision.against} ({time.strftime('%Y-%m-%d %H:%M')})", ""]
    lines += [f"- {reason}" for reason in decision.reasons]
    client.update_model_version(name, version, description=(head + "\n\n" if head else "") + "\n".join(lines))
    if mv.run_id:
        client.set_tag(mv.run_id, "gate.verdict", verdict)
        client.set_tag(mv.run_id, "gate.against", decision.against)
        figures = decision.figures
        if {"metric", "reference", "gain", "ci95"} <= set(figures):  # the comparison that decided, as run metrics
            reference = "base" if decision.against.startswith("base model") else "production"
            metric = f"gate/{figures['metric']}"
            log_metrics_batch(mv.run_id, {f"{metric}_{reference}": figures["reference"],
                                          f"{metric}_vs_{reference}": figures["gain"],
                                          f"{metric}_vs_{reference}_ci_low": figures["ci95"][0],
                                          f"{metric}_vs_{reference}_ci_high": figures["ci95"][1]})
        client.set_tag(mv.run_id, "mlflow.note.content", "\n".join([f"{name} v{version}", "", *lines]))


def rollback(name: str, params: Params) -> Promotion:
    """Point ``production`` back at the version it held before the current one (audited).

    Raises:
        RegistryError: unknown model, or no earlier production version.
    """
    client = mlflow_client()
    with _lock(name):
        resolve(client, name, alias="production")
        history = _history(client, name)
        current = alias_version(client, name, "production")
        if len(history) < 2:
            raise RegistryError(f"{name!r}: no earlier production version to roll back to (history: {history})")
        target = history[-2]
        client.set_registered_model_alias(name, "production", target)
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
        result = Promotion(name, target, current, promoted=True, rollback=True)
        audit(client, name, "rollback", current, target, result.to_dict())
        return result


def alias_version(client: mlflow.MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _history(client: mlflow.MlflowClient, name: str) -> list[str]:
    tag = client.get_registered_model(name).tags.get(HISTORY_TAG)
    return json.loads(tag) if tag else []


def _move_production(client: mlflow.MlflowClient, name: str, version: str, previous: str | None) -> None:
    history = _history(client, name) or ([previous] if previous else [])
    client.set_registered_model_alias(name, "production", version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history + [version]))


def audit(client: mlflow.MlflowClient, name: str, action: str, from_version: str | None, to_version: str | None,
          record: dict[str, Any]) -> None:
    """Record an alias decision as version tags and as a run in the ``<name>-audit`` experiment."""
    when = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    entry = {"when": when, "by": actor(), "action": action, "from": from_version, "to": to_version, **record}
    reviewer = (record.get("approval") or {}).get("reviewer")
    comment = str((record.get("approval") or {}).get("comment") or "")[:1000]
    said = ({"reviewer": reviewer} if reviewer else {}) | ({"comment": comment} if comment else {})
    if to_version:
        moved = action in ("promote", "rollback")  # production moved from → to; a refusal or rejection moved nothing
        what = ({"production from": from_version, "production to": to_version} if moved
                else {"version": to_version, "production stays": from_version})
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()) + f".{int(time.time() * 1000) % 1000:03d}"
        client.set_model_version_tag(name, to_version, f"audit {stamp} {action}", json.dumps(
            {"when": when, "by": entry["by"], "action": action, **what} | said, ensure_ascii=False))
        if reviewer:
            client.set_model_version_tag(name, to_version, "gate.reviewer", reviewer)
    experiment = experiment_for(f"{name}-audit")
    with mlflow.start_run(experiment_id=experiment, run_name=audit_name(action, from_version, to_version),
                          nested=mlflow.active_run() is not None):
        mlflow.set_tags({"loraops.action": action, "loraops.by": entry["by"], "loraops.model": name,
                         **{f"loraops.{key}": value for key, value in said.items()}})
        mlflow.log_params({"action": action, "from_version": str(from_version), "to_version": str(to_version),
                           "forced": str(record.get("forced", False)), "reason": str(record.get("reason"))})
        mlflow.log_dict(entry, "audit.json")
    decision = record.get("decision") or {}
    events.emit_quietly(events.MODEL_EVENTS[action], events.model_resource(name), {
        "model": name, "action": action, "from": from_version, "to": to_version, "by": entry["by"],
        "forced": bool(record.get("forced")), "reason": record.get("reason"), "against": decision.get("against"),
        "gate_passed": decision.get("promote"), "gate_reasons": decision.get("reasons"),
        **said}, related=[{"prefect.resource.id": f"loraops.model.{name}.{to_version}",
                           "prefect.resource.role": "model-version", "prefect.resource.name": f"{name}/{to_version}"}]
        if to_version else None)


def audit_name(action: str, from_version: str | None, to_version: str | None) -> str:
    """The audit run's name: ``promote v1→v2``, ``refuse v3 (production v2)``, ``rollback v2→v1``."""
    if action == "reject":
        return f"reject v{to_version} (reviewer; production {'v' + from_version if from_version else 'none'})"
    if action == "refuse":
        return f"refuse v{to_version} (production {'v' + from_version if from_version else 'none: the base model'})"
    return f"{action} v{from_version or '-'}→v{to_version}"


def audit_trail(name: str) -> list[dict[str, Any]]:
    """Every audited alias decision of ``name``, oldest first."""
    client = mlflow_client()
    experiment = client.get_experiment_by_name(f"{name}-audit")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    return [{"when": r.info.start_time, "action": r.data.params.get("action"), "from": r.data.params.get("from_version"),
             "to": r.data.params.get("to_version"), "by": r.data.tags.get("loraops.by"),
             "reviewer": r.data.tags.get("loraops.reviewer"), "comment": r.data.tags.get("loraops.comment")} for r in runs]


def describe(result: Promotion) -> str:
    """Human summary of a promote or rollback result."""
    if result.rollback:
        return f"rolled back {result.name}: production v{result.previous} → v{result.version}"
    verdict = "PROMOTED" if result.promoted else "REFUSED"
    if result.forced:
        verdict = f"FORCED ({result.reason})"
    if result.approval:
        said = result.approval.reviewer + (f": {result.approval.comment}" if result.approval.comment else "")
        verdict = f"APPROVED by {said}; PROMOTED" if result.approval.approved else f"REJECTED by {said}"
    if result.unchanged:
        return f"UNCHANGED: {result.name} v{result.version} already is production; nothing moved"
    d = result.decision or Decision(result.promoted, [], "nothing")
    was = f" (production was v{result.previous})" if result.previous else ""
    if not result.previous and "no production yet" not in d.against:
        was = " (no production yet)"
    lines = [f"{verdict}: {result.name} v{result.version} vs {d.against}{was}"]
    lines += [f"  - {reason}" for reason in d.reasons]
    return "\n".join(lines)


__all__ = ["RegistryError", "Decision", "Promotion", "register", "promote", "rollback", "audit_trail", "describe",
           "tracking_setup"]
