"""Tone: the speech level a Korean line is written in, read from its sentence-final endings, and what the copy domain
does with it. A judgement is checked against graded lines in the language at hand before it is trusted."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from helpers import REPO
from loraops.core.config import load_params
from loraops.core.errors import ConfigError, DataError
from loraops.judge import tone


@pytest.fixture(scope="module")
def reader():
    return tone.SpeechLevel()


def test_the_reader_tells_formal_polite_and_casual_apart_on_the_graded_probe(reader):
    result = tone.probe(reader)
    assert result["n"] == 75 and min(result["per_level"].values()) >= 0.9, result["wrong"]


@pytest.mark.parametrize("line, level", [
    ("새 컬렉션을 소개합니다. 매장에서 만나 보십시오.", "formal"), ("함께 건강한 겨울을 준비합시다.", "formal"),
    ("고객님, 준비되셨습니까?", "formal"), ("지금 쿠폰 받아 가세요!", "polite"), ("퇴근길에 들르기 딱 좋죠?", "polite"),
    ("이번엔 꼭 빠르게요.", "polite"), ("득템 각이다!", "casual"), ("가볍게 시작해 봐.", "casual"), ("같이 가자~", "casual"),
    ("봄맞이 특가 30%", "none"), ("휴식을 찾는다면", "none"), ("", "none"),
    ("신상 나왔어. 구경 와. 할인도 합니다.", "casual"),  # the most frequent level of the sentences wins
])
def test_lines_by_their_endings(reader, line, level):
    assert reader(line) == level


def test_each_target_age_needs_a_level_and_a_value():
    cfg = load_params(REPO / "configs/copy.yaml").eval.tone
    rows = [{"id": "test-00001", "source": "line 7", "attributes": {"target_age": "30대"}}]
    assert tone.expected_levels(rows, cfg, "copy_briefs.csv") == ["polite"]
    with pytest.raises(DataError, match=r"copy_briefs.csv: line 9: target_age '60대' is not in eval.tone.levels \(20대, 30대"):
        tone.expected_levels([{"source": "line 9", "attributes": {"target_age": "60대"}}], cfg, "copy_briefs.csv")
    with pytest.raises(DataError, match=r"line 3: no target_age"):
        tone.expected_levels([{"source": "line 3", "attributes": {}}], cfg, "copy_briefs.csv")


def test_bad_tone_settings_name_their_keys():
    with pytest.raises(ConfigError, match=r"eval.tone.column: 'target_age' must be listed in data.attribute_columns"):
        load_params(REPO / "params.yaml", ["eval.tone={column: target_age}"])
    with pytest.raises(ConfigError, match=r"eval.tone.levels"):
        load_params(REPO / "configs/copy.yaml", ["eval.tone.levels={20대: shouting}"])


def test_the_copy_sample_is_written_in_the_tone_of_its_target_age(reader):
    """The approved lines themselves: every one reads in the level configs/copy.yaml asks for its age."""
    levels = load_params(REPO / "configs/copy.yaml").eval.tone.levels
    rows = list(csv.DictReader(open(REPO / "data/raw/copy_briefs.csv", encoding="utf-8")))
    assert len({(r["id"], r["target_age"]) for r in rows}) >= 150  # briefs: product × target age
    assert [r["copy"] for r in rows if reader(r["copy"]) != levels[r["target_age"]]] == []


def _briefs_with(tmp_path, row: int, target_age: str):
    """The copy sample with one row's target age changed, as ``tmp_path/briefs.csv``."""
    rows = list(csv.DictReader(open(REPO / "data/raw/copy_briefs.csv", encoding="utf-8")))
    rows[row]["target_age"] = target_age
    with open(tmp_path / "briefs.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path / "briefs.csv"


def test_a_brief_without_the_target_age_its_template_needs_is_refused(tmp_path):
    _briefs_with(tmp_path, 4, "")
    done = subprocess.run([sys.executable, "-m", "loraops.cli", "prepare", "--params", str(REPO / "configs/copy.yaml"),
                           "--set", f"data.path={tmp_path / 'briefs.csv'}"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and "briefs.csv: line 6 (id P000): no 'target_age'" in done.stderr, done.stderr
    assert not (tmp_path / "data/prepared").exists()


@pytest.mark.slow
@pytest.mark.integration
def test_copy_domain_runs_the_whole_loop_with_tone_per_target_age(tmp_path):
    """`loraops run --params configs/copy.yaml`: its own registered model, tone accuracy overall and per target age."""
    import json

    from helpers import make_workspace

    ws = make_workspace(tmp_path / "ws")
    # half the config's 600 steps on a one-layer base: enough for the tuned copy to take its age's tone (tone 0 → 0.5
    # on the sample), in half the time; what tone measures is checked on the graded probe above
    # (the gate metric alone: tone is scored whatever the metric list; the self-test measures it and the tone probe)
    smaller = ["train.max_steps=300", "model.tiny.layers=1", "model.tiny.vocab_size=1500", "eval.bootstrap_samples=200",
               "eval.metrics=[morph_f1]"]
    done = subprocess.run([sys.executable, "-m", "loraops.cli", "run", "--params", "configs/copy.yaml",
                           *[arg for kv in smaller for arg in ("--set", kv)]], cwd=ws, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    # registered, then promoted (0) or refused (3): the tiny base tends to give one line to several products, which
    # the gate's distinct-answer floor refuses (registry.gate.min_distinct_share); tone is measured either way
    assert done.returncode in (0, 3), done.stdout[-3000:] + done.stderr[-3000:]
    assert "registered store-copy-lora v1" in done.stdout
    summary = json.loads((ws / "metrics/eval.json").read_text(encoding="utf-8"))
    assert set(summary["metrics"]["tone"]) >= {"base", "tuned", "delta", "ci95"}
    per_age = summary["slices"]["target_age"]
    assert set(per_age) == {"20대", "30대", "40대", "50대 이상"} and all("tone" in s for s in per_age.values())
    assert summary["tone_probe"]["accuracy"] >= 0.9
    assert summary["metrics"]["tone"]["tuned"] > summary["metrics"]["tone"]["base"]
    table = (ws / "reports/eval_questions.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert {"tone_expected", "tuned_tone", "tuned_tone_level", "target_age"} <= set(table)


def test_an_age_without_a_level_is_refused_before_any_training(tmp_path):
    params = load_params(REPO / "configs/copy.yaml", [f"data.path={_briefs_with(tmp_path, 9, '60대')}"])
    with pytest.raises(DataError, match=r"briefs.csv: line 11: target_age '60대' is not in eval.tone.levels"):
        tone.check_data(params)
    assert tone.check_data(load_params(REPO / "configs/copy.yaml"), REPO) == 384
