"""Human rubric review: a blinded, stratified sample of base and tuned answers out to raters and back.

`export` writes one row per answer (base and tuned mixed and shuffled, the model hidden behind an item
id) with empty ``relevance``, ``accuracy`` and ``completeness`` columns (1–5); the key is logged to the
MLflow run. `import` validates the filled CSV and logs per-criterion means per model to that run
(``review/<criterion>/<base|tuned>``); the gate reads ``review/mean/tuned`` when
``registry.gate.min_rubric_mean`` is set.

Every rated item, from a sheet or from the demo (``loraops demo``), is kept in the run's ``review/items.json``
(keyed, so importing a sheet twice counts it once); the means are always over all of them.

`approval_request` is what a reviewer reads when ``registry.gate.require_approval`` pauses a promotion: the gate's
verdict and a sample of candidate vs production answers per slice, as markdown.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException

from loraops.core.readers import DataError, decode
from loraops.core.results import Decision, Promotion
from loraops.registry.tracking import log_metrics_batch
from loraops.registry.versions import RegistryError, eval_table_of_run, mlflow_client, run_artifact

CRITERIA = ("relevance", "accuracy", "completeness")
ITEMS = "review/items.json"
COLUMNS = ["item_id", "run_id", "category", "question", "reference", "answer", *CRITERIA]


def sample(table: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """Up to ``n`` distinct questions, stratified by category (at least one per category), deterministic."""
    distinct = table.drop_duplicates(subset=["question"]).sort_values("id")
    rng = random.Random(seed)
    groups = {cat: list(part.index) for cat, part in distinct.groupby("category", sort=True)}
    share = {cat: max(1, round(n * len(ix) / len(distinct))) for cat, ix in groups.items()}
    picked = [i for cat, ix in groups.items() for i in rng.sample(ix, min(share[cat], len(ix)))]
    return distinct.loc[sorted(picked)]


def export(run_id: str, out: Path, n: int = 20, seed: int = 0) -> Path:
    """Write the blinded review sheet for ``run_id`` and log its key to the run."""
    try:
        mlflow_client().get_run(run_id)
    except MlflowException:
        raise RegistryError(f"--run: no MLflow run {run_id!r}") from None
    picked = sample(eval_table_of_run(run_id), n, seed)
    rows, key = [], {}
    for _, r in picked.iterrows():
        for model in ("base", "tuned"):
            item = hashlib.sha1(f"{run_id}/{r['id']}/{model}".encode()).hexdigest()[:10]
            key[item] = {"id": r["id"], "model": model}
            rows.append({"item_id": item, "run_id": run_id, "category": r["category"], "question": r["question"],
                         "reference": r["reference"], "answer": r[f"{model}_answer"], **{c: "" for c in CRITERIA}})
    random.Random(seed).shuffle(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_dict(key, "review/key.json")
    return out


def parse(path: Path, key_for: Any) -> tuple[str, list[dict[str, Any]]]:
    """Validate a filled sheet; return its run id and the scored items.

    Raises:
        DataError: missing columns, mixed runs, unknown item ids, scores outside 1–5 (naming line and column).
    """
    if not path.exists():
        raise DataError(f"{path}: not found")
    text, _ = decode(path, path.read_bytes(), "auto")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = [c for c in ("item_id", "run_id", *CRITERIA) if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    items, run_ids, key = [], set(), None
    for row in reader:
        line = reader.line_num
        run_ids.add(row["run_id"])
        if len(run_ids) > 1:
            raise DataError(f"{path}: line {line}: rows from more than one run ({', '.join(sorted(run_ids))})")
        key = key if key is not None else key_for(row["run_id"])
        if row["item_id"] not in key:
            raise DataError(f"{path}: line {line}: unknown item_id {row['item_id']!r} for run {row['run_id']}")
        scores = {}
        for criterion in CRITERIA:
            value = (row[criterion] or "").strip()
            if value not in {"1", "2", "3", "4", "5"}:
                raise DataError(f"{path}: line {line}: {criterion} must be an integer 1–5, got {value!r}")
            scores[criterion] = int(value)
        items.append({**key[row["item_id"]], **scores, "key": f"sheet:{row['item_id']}", "source": "sheet"})
    if not items:
        raise DataError(f"{path}: no reviewed rows")
    return run_ids.pop(), items


def means(items: list[dict[str, Any]]) -> dict[str, float]:
    """``review/<criterion>/<model>`` and ``review/mean/<model>`` over the fully scored items, their count, and
    ``review/thumbs_up/<model>`` (share of thumbs up) where thumbs were given."""
    frame = pd.DataFrame(items)
    for column in (*CRITERIA, "thumb"):
        if column not in frame:
            frame[column] = None
    scored = frame.dropna(subset=list(CRITERIA))
    out: dict[str, float] = {"review/n": float(len(scored))}
    for model, part in scored.groupby("model"):
        for criterion in CRITERIA:
            out[f"review/{criterion}/{model}"] = round(float(part[criterion].astype(float).mean()), 4)
        out[f"review/mean/{model}"] = round(float(part[list(CRITERIA)].astype(float).to_numpy().mean()), 4)
    for model, part in frame.dropna(subset=["thumb"]).groupby("model"):
        out[f"review/thumbs_up/{model}"] = round(float((part["thumb"] == "up").mean()), 4)
    return out


def rating_key(source: str, rater: str, answered_by: str, question: str) -> str:
    """The key of one rater's rating of one model's answer to one question: saving the same rating again (a second
    Save, a correction added later) replaces it instead of counting it twice in the means the gate reads."""
    import hashlib

    who = json.dumps([rater.strip(), answered_by, " ".join(question.split())], ensure_ascii=False)
    return f"{source}:{hashlib.sha256(who.encode('utf-8')).hexdigest()[:24]}"


def record(run_id: str, items: list[dict[str, Any]]) -> dict[str, float]:
    """Add rated items to the run's ``review/items.json`` (an item with a key already there replaces it: see
    :func:`rating_key`) and log the means over all."""
    known: dict[str, Any] = {}
    try:
        known = json.loads(run_artifact(run_id, ITEMS, "").read_text(encoding="utf-8"))
    except RegistryError:
        pass
    known.update({item["key"]: item for item in items})
    mlflow_client().log_dict(run_id, known, ITEMS)  # the run keeps its status
    values = means(list(known.values()))
    log_metrics_batch(run_id, values)
    return values


def import_sheet(path: Path) -> dict[str, Any]:
    """Validate a filled sheet and log the means to its run."""

    def key_for(run_id: str) -> dict[str, Any]:
        try:
            local = run_artifact(run_id, "review/key.json", "export the sheet with `loraops review export`")
        except RegistryError as exc:
            raise DataError(f"{path}: {exc}") from None
        return json.loads(local.read_text(encoding="utf-8"))

    mlflow_client()
    run_id, items = parse(path, key_for)
    return {"run_id": run_id, **record(run_id, items)}


def _line(text: str, width: int) -> str:
    """``text`` on one line (markdown characters that would start a list or a quote kept literal), cut at ``width``."""
    text = " ".join(str(text).split()).replace("*", "\\*").replace("_", "\\_")
    return text if len(text) <= width else text[: width - 1] + "…"


def approval_request(verdict: Promotion, sample: list[dict[str, str]], timeout_hours: float) -> str:
    """The markdown shown with the approval form: what is asked, the gate's verdict, then one block per sampled
    question (its slice, the candidate's answer, production's, the reference), so it reads in the Resume dialog's
    narrow pane without scrolling sideways."""
    d = verdict.decision or Decision(True, [], "nothing")
    production = f"v{verdict.previous}" if verdict.previous else "none yet (base model)"
    against = f"production v{verdict.previous}" if verdict.previous else "base model (no production yet)"
    lines = [f"## Approve {verdict.name} v{verdict.version} for production?", "",
             f"The automatic gate **passed** against {d.against}; production is {production}. Only an approval "
             f"moves production. Choose **approve** or **reject**, give your name (recorded in the audit trail) and "
             f"a comment. No answer within {timeout_hours:g} h rejects.", "", "### Gate", ""]
    lines += [f"- {reason}" for reason in d.reasons]
    if sample:
        slices = list(dict.fromkeys(row["slice"] for row in sample))
        lines += ["", f"### Sample answers per slice ({len(sample)} questions)", "",
                  "Slices: " + ", ".join(f"`{s}`" for s in slices) + ".", ""]
        for number, row in enumerate(sample, start=1):
            extra = [k for k in row if k not in ("slice", "question", "candidate", "production", "reference")]
            where = row["slice"] + "".join(f" · {k} = {row[k]}" for k in extra if f"{k} = " not in row["slice"])
            lines += [f"**{number}. {_line(row['question'], 300)}**  ", f"_{_line(where, 200)}_", "",
                      f"> **candidate v{verdict.version}:** {_line(row['candidate'], 600)}", ">",
                      f"> **{against}:** {_line(row['production'], 600)}", ">",
                      f"> **reference:** {_line(row['reference'], 600)}", ""]
    return "\n".join(lines) + "\n"

