"""Rubric review: export a blinded sheet from a real MLflow run, fill it, import it; bad sheets refused."""

from __future__ import annotations

import csv

import mlflow
import pandas as pd
import pytest

from loraops.core.readers import DataError
from loraops.review import rubric as review


@pytest.fixture
def run_with_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from loraops.registry.tracking import experiment_for, tracking_setup

    tracking_setup(tmp_path)
    table = pd.DataFrame({"id": [f"test-{i:05d}" for i in range(12)], "category": ["a", "b", "c"] * 4,
                          "question": [f"질문 {i}" for i in range(12)], "reference": [f"답 {i}" for i in range(12)],
                          "base_answer": ["모름"] * 12, "tuned_answer": [f"답 {i}" for i in range(12)]})
    (tmp_path / "eval_questions.csv").write_text(table.to_csv(index=False), encoding="utf-8")
    with mlflow.start_run(experiment_id=experiment_for("review-test", tmp_path)) as run:
        mlflow.log_artifact(str(tmp_path / "eval_questions.csv"), "eval")
    return run.info.run_id, tmp_path


def _fill(path, score_of):
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    for row in rows:
        for criterion in review.CRITERIA:
            row[criterion] = score_of(row)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=review.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def test_export_is_blinded_stratified_and_round_trips(run_with_table):
    run_id, tmp = run_with_table
    sheet = review.export(run_id, tmp / "sheet.csv", n=6, seed=1)
    rows = list(csv.DictReader(sheet.open(encoding="utf-8")))
    assert len(rows) == 12 and {r["category"] for r in rows} == {"a", "b", "c"}
    assert "model" not in rows[0] and all(len(r["item_id"]) == 10 for r in rows)
    _fill(sheet, lambda r: "5" if r["answer"].startswith("답") else "1")
    result = review.import_sheet(sheet)
    assert result["review/mean/tuned"] == 5.0 and result["review/mean/base"] == 1.0 and result["review/n"] == 12
    metrics = mlflow.MlflowClient().get_run(run_id).data.metrics
    assert metrics["review/accuracy/tuned"] == 5.0


@pytest.mark.parametrize("mutate,message", [
    (lambda r: r.update(relevance="7"), "relevance must be an integer 1–5, got '7'"),
    (lambda r: r.update(accuracy=""), "accuracy must be an integer 1–5, got ''"),
    (lambda r: r.update(item_id="deadbeef00"), "unknown item_id 'deadbeef00'"),
])
def test_bad_sheets_are_refused_with_line(run_with_table, mutate, message):
    run_id, tmp = run_with_table
    sheet = review.export(run_id, tmp / "sheet.csv", n=3)
    rows = _fill(sheet, lambda r: "3")
    mutate(rows[1])
    with sheet.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=review.COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match=f"sheet.csv: line 3: {message}"):
        review.import_sheet(sheet)


def test_sheet_without_score_columns(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("item_id,run_id\nabc,r1\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing column"):
        review.parse(bad, lambda run: {})


def test_export_of_an_unknown_run_names_it(run_with_table):
    from loraops.registry.versions import RegistryError

    _, tmp = run_with_table
    with pytest.raises(RegistryError, match="--run: no MLflow run 'nope'"):
        review.export("nope", tmp / "sheet.csv")


def test_demo_ratings_are_refused_without_a_name_with_half_a_rubric_or_with_nothing_rated():
    from loraops.core.errors import ConfigError
    from loraops.serving.demo import Demo

    demo = Demo(None, None, None, "m", [])
    shown = {"production": {"version": "m/1", "answer": "답"}}
    half = {"production": {"thumb": None, "relevance": "5", "accuracy": "4", "completeness": None}}
    with pytest.raises(ConfigError, match="your name"):
        demo.save(" ", "질문", {}, shown, half)
    with pytest.raises(ConfigError, match="production: completeness not rated"):
        demo.save("kim", "질문", {}, shown, half)
    with pytest.raises(ConfigError, match="nothing rated"):
        demo.save("kim", "질문", {}, shown, {"production": {"correction": "고친 답", "approve": False}})
    with pytest.raises(ConfigError, match="ask a question first"):
        demo.save("kim", "질문", {}, {}, half)


def test_a_rating_saved_twice_counts_once_and_saving_again_updates_it(run_with_table):
    """The demo's Save pressed twice (or again to add a correction) must not double the rating the gate reads."""
    from loraops.review import rubric as review

    run_id, _ = run_with_table
    rating = {"relevance": 2, "accuracy": 2, "completeness": 3, "model": "tuned", "rater": "kim"}
    key = review.rating_key("demo", "kim", "m/2", "벽지에 곰팡이가  생겼어요")
    assert key == review.rating_key("demo", " kim ", "m/2", "벽지에 곰팡이가 생겼어요")  # the same question, spaced
    assert key != review.rating_key("demo", "lee", "m/2", "벽지에 곰팡이가 생겼어요")  # another rater counts apart
    assert key != review.rating_key("demo", "kim", "m/3", "벽지에 곰팡이가 생겼어요")  # as does another version
    review.record(run_id, [{**rating, "key": key}])
    twice = review.record(run_id, [{**rating, "key": key}])
    assert twice["review/n"] == 1 and twice["review/mean/tuned"] == pytest.approx(7 / 3, abs=1e-4)
    updated = review.record(run_id, [{**rating, "key": key, "accuracy": 5}])
    assert updated["review/n"] == 1 and updated["review/mean/tuned"] == pytest.approx(10 / 3, abs=1e-4)


def test_an_imported_sheet_is_a_calibration_set_matched_to_the_runs_answers(run_with_table):
    """`loraops judge calibrate --run` on a run whose ratings came from a review sheet: each rated item is matched to
    the run's eval table for its question, reference and the answer of the model it rated."""
    from loraops.review.calibration import answers, from_run

    run_id, tmp = run_with_table
    sheet = review.export(run_id, tmp / "sheet.csv", n=6, seed=1)
    _fill(sheet, lambda r: "5" if r["answer"].startswith("답") else "1")
    review.import_sheet(sheet)
    items = from_run(run_id, list(review.CRITERIA))
    assert len(items) == 12 and {i["answer"] for i in items if i["scores"]["accuracy"] == 1} == {"모름"}
    assert all(i["reference"].startswith("답") and i["question"].startswith("질문") for i in items)
    table = answers(items)
    assert len(table) == 12 and set(table["rater_accuracy"]) == {1.0, 5.0}
