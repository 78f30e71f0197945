"""The command line: bad input exits non-zero with one message naming the file/row/key, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

LORAOPS = [sys.executable, "-m", "loraops.cli"]


class _Result:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def loraops(*args: str, cwd: Path = REPO) -> _Result:
    """Run the CLI in-process (fast); the subprocess test below checks the real console entry."""
    import os

    from typer.testing import CliRunner

    from loraops.cli import app

    old = Path.cwd()
    os.chdir(cwd)
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(old)
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return _Result(result.exit_code, result.stdout, result.stderr)


@pytest.mark.parametrize("args,message", [
    (["--set", "train.learning_rate=-1"], "train.learning_rate must be > 0, got -1"),
    (["--set", "lora.r=0"], "lora.r must be > 0, got 0"),
    (["--set", "train.lerning_rate=1"], "train.lerning_rate: unknown key (did you mean train.learning_rate?)"),
    (["--set", "data.format=xml"], "data.format must be one of"),
    (["--set", "data.path=nowhere.csv"], "data.path: nowhere.csv does not exist"),
])
def test_prepare_rejects_bad_params_and_paths(tmp_path, args, message):
    result = loraops("prepare", "--params", str(REPO / "params.yaml"), *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "data/prepared").exists()


def test_prepare_bad_row_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,질문_1,category,답변_1\nA1,질문?,c,답\nA2,질문?,c,\n", encoding="utf-8")
    result = loraops("prepare", "--params", str(REPO / "params.yaml"), "--set", f"data.path={bad}", cwd=tmp_path)
    assert result.returncode == 2 and "bad.csv: line 3 (id A2): no usable answer" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_without_prepared_data_says_what_to_run(tmp_path):
    result = loraops("train", "--params", str(REPO / "params.yaml"), cwd=tmp_path)
    assert result.returncode == 2 and "run `loraops prepare`" in result.stderr


@pytest.mark.slow
def test_evaluate_self_test_reports_the_english_encoder_not_valid_on_korean():
    """The default pack: morph_f1 (the gate metric) valid, the bundled English encoder's cosine/BERTScore not."""
    result = loraops("evaluate", "--self-test")
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[2:] if line.split()}
    assert rows["morph_f1"].endswith("valid") and "NOT VALID" not in rows["morph_f1"]
    for metric in ("cosine", "bertscore_f1"):
        assert rows[metric].endswith("NOT VALID for Korean"), rows[metric]
    assert "gate metric morph_f1 (registry.gate.metric) is valid" in result.stdout


@pytest.mark.slow
def test_evaluate_with_missing_encoder_names_the_key(tmp_path):
    result = loraops("evaluate", "--self-test", "--set", f"eval.cosine_model={tmp_path / 'gone'}", "--set", "eval.metrics=[cosine]",
                     "--set", "registry.gate.metric=cosine")
    assert result.returncode == 2 and "eval.cosine_model: cannot load encoder" in result.stderr


def test_console_entry_prints_no_traceback(tmp_path):
    result = subprocess.run([*LORAOPS, "prepare", "--params", str(REPO / "params.yaml"), "--set", "lora.r=0"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip() == "error: invalid parameters:\n  lora.r must be > 0, got 0"


def test_promote_unknown_model_is_a_clear_error(tmp_path, monkeypatch):
    result = subprocess.run([*LORAOPS, "promote", "no-such-model", "--params", str(REPO / "params.yaml")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no registered model 'no-such-model'" in result.stderr
    assert "Traceback" not in result.stderr
