"""`loraops judge calibrate`: the configured judge scores the answers people rated, and its agreement with them is
measured (``loraops.judge.agreement``) and recorded in MLflow (``loraops.registry.judging``).

The rated answers come from:

- ``--run RUN_ID``: that run's ``review/items.json`` (demo ratings and imported review sheets; a sheet's items are
  matched to the run's eval table for their question, reference and answer);
- ``--ratings FILE``: a CSV or JSONL with ``question``, ``answer``, optional ``reference`` and ``rater``, and a
  1–5 column per criterion (a filled `loraops review export` sheet is one);
- neither: every run of the project's experiment that holds ratings (``review/n`` > 0).

An answer rated by several people counts once, with their mean score.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd

from loraops.core.config import Params
from loraops.core.errors import DataError
from loraops.core.readers import decode
from loraops.judge import agreement
from loraops.judge.llm import Judge, Verdict, describe, fingerprint
from loraops.review.rubric import CRITERIA, ITEMS

DISAGREEMENT = 2
"""|judge − raters' mean| at which a rated answer is listed for review."""


def _text(value: Any) -> str:
    """A cell as text: empty for a missing value (a JSONL row without the key reads as NaN)."""
    return "" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value).strip()


def _score(value: Any, where: str, criterion: str) -> int | None:
    text = _text(value)
    if text.endswith(".0"):
        text = text[:-2]
    if text == "":
        return None
    if text not in {"1", "2", "3", "4", "5"}:
        raise DataError(f"{where}: {criterion} must be an integer 1–5 (or empty), got {text!r}")
    return int(text)


def from_file(path: Path, criteria: list[str]) -> list[dict[str, Any]]:
    """Rated answers from a CSV or JSONL file.

    Raises:
        DataError: missing file or columns, no criterion column, a score that is not 1–5 (naming line and column).
    """
    if not path.exists():
        raise DataError(f"--ratings {path}: not found")
    text, _ = decode(path, path.read_bytes(), "auto")
    try:
        frame = (pd.read_json(io.StringIO(text), lines=True, dtype=False) if path.suffix in (".jsonl", ".json")
                 else pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False))
    except ValueError as exc:
        raise DataError(f"--ratings {path}: not a readable CSV or JSONL file ({exc})") from None
    missing = [c for c in ("question", "answer") if c not in frame.columns]
    rated = [c for c in criteria if c in frame.columns]
    if missing or not rated:
        lacking = missing + ([] if rated else [f"a score column ({' / '.join(criteria)})"])
        raise DataError(f"--ratings {path}: missing column(s) {', '.join(lacking)}; found {', '.join(map(str, frame.columns))}")
    items = []
    for index, row in frame.iterrows():
        line = int(str(index)) + (2 if path.suffix == ".csv" else 1)
        where = f"{path}: line {line}"
        if not _text(row["question"]):
            raise DataError(f"{where}: empty question")
        scores = {c: s for c in rated if (s := _score(row[c], where, c)) is not None}
        if scores:
            items.append({"question": _text(row["question"]), "reference": _text(row.get("reference")) or None,
                          "answer": _text(row["answer"]), "rater": _text(row.get("rater")) or f"line {line}",
                          "scores": scores, "source": f"{path.name}:{line}"})
    if not items:
        raise DataError(f"--ratings {path}: no rated rows (every score cell is empty)")
    return items


def from_run(run_id: str, criteria: list[str]) -> list[dict[str, Any]]:
    """Rated answers kept in a run's ``review/items.json`` (demo ratings carry their text; sheet items are matched
    to the run's eval table).

    Raises:
        RegistryError: the run has no ratings.
    """
    from loraops.registry.versions import eval_table_of_run, run_artifact

    kept = json.loads(run_artifact(run_id, ITEMS, "rate its answers in the demo or with `loraops review`")
                      .read_text(encoding="utf-8"))
    table: pd.DataFrame | None = None
    items = []
    for key, item in kept.items():
        scores = {c: int(item[c]) for c in criteria if item.get(c) not in (None, "")}
        if not scores:
            continue  # a thumb without the rubric
        if "answer" in item and "question" in item:
            question, answer, reference = item["question"], item["answer"], item.get("reference")
            degenerate = item.get("degenerate")
        else:
            if table is None:
                table = eval_table_of_run(run_id).set_index("id")
            row = table.loc[item["id"]]
            question, answer, reference = row["question"], row[f"{item['model']}_answer"], row["reference"]
            degenerate = row.get(f"{item['model']}_degenerate_reason")  # evaluate judged the answer as generated
        items.append({"question": str(question), "reference": reference or None, "answer": str(answer),
                      "rater": str(item.get("rater") or key), "scores": scores, "degenerate": degenerate or None,
                      "source": f"run {run_id[:8]} {item.get('source', '')}".strip()})
    return items


def from_project(params: Params) -> tuple[list[dict[str, Any]], list[str]]:
    """Rated answers from every run of the project's experiment that holds ratings; and those runs' ids."""
    import mlflow

    from loraops.registry.tracking import experiment_for

    experiment = experiment_for(params.registry.model_name)
    runs = mlflow.search_runs([experiment], filter_string="metrics.`review/n` > 0", output_format="list")
    items, ids = [], []
    for run in runs:
        items += from_run(run.info.run_id, list(params.eval.judge.criteria))
        ids.append(run.info.run_id)
    return items, ids


def answers(items: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per distinct rated answer (question, reference, answer): per criterion the raters' mean and their count."""
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    for item in items:
        key = (" ".join(item["question"].split()), " ".join((item["reference"] or "").split()),
               " ".join(item["answer"].split()))
        row = rows.setdefault(key, {"question": item["question"], "reference": item["reference"],
                                    "answer": item["answer"], "raters": set(), "scores": {}, "degenerate": None})
        row["degenerate"] = row["degenerate"] or item.get("degenerate") or None  # as flagged when it was generated
        row["raters"].add(item["rater"])
        for criterion, score in item["scores"].items():
            row["scores"].setdefault(criterion, []).append(score)
    out = []
    for row in rows.values():
        flat = {"question": row["question"], "reference": row["reference"] or "", "answer": row["answer"],
                "raters": len(row["raters"]), "degenerate": row["degenerate"]}
        for criterion, scores in row["scores"].items():
            flat[f"rater_{criterion}"] = sum(scores) / len(scores)
        out.append(flat)
    return pd.DataFrame(out)


def calibrate(params: Params, items: list[dict[str, Any]], judge: Judge | None = None
              ) -> tuple[dict[str, Any], pd.DataFrame]:
    """Score every rated answer with the configured judge and measure the agreement per criterion.

    Returns the result (``criteria``, ``valid``, ``unparsed`` with an example reply, ``disagreements``, ``usage``,
    ``judge``) and the per-answer table (raters' means, judge scores and reasons)."""
    from loraops.judge.degenerate import detect

    cfg = params.eval.judge
    judge = judge or Judge(cfg)
    table = answers(items)
    # measured as the gate uses it: a degenerate answer scores 1 without being sent, as evaluate scores it
    flagged = [known or detect(a, r or "") for a, r, known in zip(table["answer"], table["reference"], table["degenerate"])]
    asked = iter(judge.score([(q, r or None, a) for q, r, a, why in
                              zip(table["question"], table["reference"], table["answer"], flagged) if why is None]))
    verdicts: list[Verdict] = [
        next(asked) if why is None else Verdict(dict.fromkeys(cfg.criteria, 1), dict.fromkeys(
            cfg.criteria, f"degenerate answer ({why}): 1 without asking the judge"), "", cached=True)
        for why in flagged]
    pairs = {}
    for criterion in cfg.criteria:
        table[f"judge_{criterion}"] = [float(v.scores[criterion]) if v.scores else float("nan") for v in verdicts]
        table[f"judge_reason_{criterion}"] = [v.reasons.get(criterion, "") for v in verdicts]
        column = f"rater_{criterion}"
        if column not in table:
            table[column] = float("nan")
        both = table[[column, f"judge_{criterion}"]].dropna()
        pairs[criterion] = (list(both[column]), list(both[f"judge_{criterion}"]))
    table["judge_reply"] = ["" if v.scores else " ".join(v.reply.split())[:300] for v in verdicts]  # unparsed ones
    result = agreement.calibrate(pairs, cfg.calibration, params.base.seed)
    failed = [v for v in verdicts if v.scores is None]
    result["unparsed"] = {"count": len(failed), "of": len(verdicts),
                          "example": " ".join(failed[0].reply.split())[:300] if failed else None}
    if failed and len(failed) / max(1, len(verdicts)) > cfg.max_unparsed:
        result["valid"] = False
        for figures in result["criteria"].values():
            figures["valid"] = False
            figures["short"] = [*figures["short"], f"{len(failed)} of {len(verdicts)} judge replies could not be parsed"]
    result["disagreements"] = disagreements(table, list(cfg.criteria))
    result["usage"] = judge.usage.to_dict()
    result["judge"] = {"model": cfg.model, "base_url": cfg.base_url, "fingerprint": fingerprint(cfg)}
    result["ratings"] = {"items": len(items), "answers": int(len(table)),
                         "degenerate": sum(why is not None for why in flagged)}
    return result, table


def disagreements(table: pd.DataFrame, criteria: list[str], limit: int = 50) -> list[dict[str, Any]]:
    """Rated answers where the judge and the raters' mean differ by :data:`DISAGREEMENT` points or more, largest first."""
    out = []
    for _, row in table.iterrows():
        for criterion in criteria:
            rater, judged = row.get(f"rater_{criterion}"), row.get(f"judge_{criterion}")
            if pd.notna(rater) and pd.notna(judged) and abs(judged - rater) >= DISAGREEMENT:
                out.append({"criterion": criterion, "rater": round(float(rater), 2), "judge": int(judged),
                            "question": row["question"][:200], "answer": row["answer"][:300],
                            "judge_reason": str(row.get(f"judge_reason_{criterion}") or "")[:300]})
    return sorted(out, key=lambda d: -abs(d["judge"] - d["rater"]))[:limit]


def report(result: dict[str, Any]) -> str:
    """What `loraops judge calibrate` prints: the judge, the table, unparsed replies, disagreements, the verdict."""
    judge = result["judge"]
    usage = result["usage"]
    lines = [f"judge {judge['model']} at {judge['base_url']} (fingerprint {judge['fingerprint']}): "
             f"{result['ratings']['items']} ratings of {result['ratings']['answers']} answers; "
             f"{usage['requests']} requests, {usage['cached']} from the cache, "
             f"{usage['prompt_tokens']} + {usage['completion_tokens']} tokens", "",
             agreement.describe(result)]
    unparsed = result["unparsed"]
    if unparsed["count"]:
        lines += ["", f"{unparsed['count']} of {unparsed['of']} judge replies could not be parsed (left out); one: "
                      f"{unparsed['example']!r}"]
    if result["disagreements"]:
        lines += ["", f"{len(result['disagreements'])} disagreements (|judge − raters| ≥ {DISAGREEMENT}), largest first:"]
        for d in result["disagreements"][:10]:
            lines.append(f"  {d['criterion']}: raters {d['rater']:g}, judge {d['judge']} · {d['question'][:60]!r} → "
                         f"{d['answer'][:60]!r} · judge: {d['judge_reason'][:100]}")
    lines += ["", "valid: the gate may use " + ", ".join(f"judge_{c}" for c, f in result["criteria"].items() if f["valid"])
              if result["valid"] else "NOT VALID: the gate may not use " + ", ".join(
                  f"judge_{c}" for c, f in result["criteria"].items() if not f["valid"]) + " with this judge"]
    if result.get("run_id"):
        lines.append(f"recorded in MLflow: experiment loraops-judge-calibration, run {result['run_id']}")
    return "\n".join(lines)


__all__ = ["CRITERIA", "answers", "calibrate", "describe", "disagreements", "from_file", "from_project", "from_run",
           "report"]
