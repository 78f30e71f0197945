"""`loraops score`: a team's own pairs scored with the metric pack, degenerate ones flagged and zeroed."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd

from helpers import REPO

LORAOPS = [sys.executable, "-m", "loraops.cli"]
FAST = ["--set", "eval.metrics=[morph_f1,chrf,rouge_l]"]


def _score(tmp_path, pairs: str, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "pairs.csv").write_text(pairs, encoding="utf-8")
    return subprocess.run([*LORAOPS, "score", "pairs.csv", "--out", "scores.csv", "--params", str(REPO / "params.yaml"),
                           *FAST, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_scores_keep_the_rows_and_add_metrics_and_flags(tmp_path):
    result = _score(tmp_path, "id,reference,candidate,category\n"
                              "a,벽지가 들뜨는 원인은 습기입니다.,습기 때문에 벽지가 들뜹니다.,도배\n"
                              "b,결로는 환기로 줄입니다.,\ufffd다 벽체\ufffd\ufffd 묻힌\ufffd\ufffd 물을 넀톛\ufffd했기,결로\n"
                              "c,타일 줄눈을 다시 채우세요.,,바닥\n", "--json")
    assert result.returncode == 0, result.stderr
    scores = pd.read_csv(tmp_path / "scores.csv", keep_default_na=False)
    assert list(scores.columns) == ["id", "reference", "candidate", "category", "morph_f1", "chrf", "rouge_l",
                                    "degenerate", "degenerate_reason"]
    assert scores["degenerate"].tolist() == [False, True, True]
    assert scores.loc[1, "degenerate_reason"].startswith("undecodable") and scores.loc[2, "degenerate_reason"] == "empty"
    assert scores.loc[0, "morph_f1"] > 0.5 and (scores.loc[1:, ["morph_f1", "chrf", "rouge_l"]] == 0).all().all()
    means = json.loads(result.stdout)
    assert means["n"] == 3 and means["degenerate"] == 2
    assert means["metrics"]["morph_f1"] == round(scores["morph_f1"].mean(), 6)


def test_missing_column_or_blank_reference_exits_2_and_writes_nothing(tmp_path):
    result = _score(tmp_path, "ref,cand\na,b\n")
    assert result.returncode == 2 and "pairs.csv: missing column(s) reference, candidate; found ref, cand" in result.stderr
    assert not (tmp_path / "scores.csv").exists() and "Traceback" not in result.stderr
    result = _score(tmp_path, "reference,candidate\n벽지,벽지\n ,답\n")
    assert result.returncode == 2 and "pairs.csv: row 3: empty reference" in result.stderr
    assert not (tmp_path / "scores.csv").exists()
