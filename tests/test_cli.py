"""The command line: bad input exits non-zero with one message naming the file/row/key, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, run_cli

LORAOPS = [sys.executable, "-m", "loraops.cli"]


def loraops(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run the CLI in-process (fast); the subprocess test below checks the real console entry."""
    return run_cli(list(args), cwd)


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


def _mini_project(root: Path) -> Path:
    """params.yaml, dvc.yaml and the sample data: enough for `loraops prepare`."""
    root.mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml", "data/raw/interior_qa.csv"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes((REPO / name).read_bytes())
    return root


def test_commands_run_at_the_project_root_from_any_subfolder_or_with_project(tmp_path):
    project = _mini_project(tmp_path / "proj")
    deep = project / "notebooks" / "week1"
    deep.mkdir(parents=True)
    assert loraops("prepare", cwd=deep).returncode == 0
    assert (project / "data/prepared/train.jsonl").exists() and not (deep / "data").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (project / "data/prepared/train.jsonl").unlink()
    assert loraops("--project", str(project), "prepare", cwd=elsewhere).returncode == 0
    assert (project / "data/prepared/train.jsonl").exists()
    missing = loraops("--project", str(elsewhere), "prepare", cwd=elsewhere)
    assert missing.returncode == 2 and "no params.yaml and dvc.yaml here or above" in missing.stderr


def test_init_data_guesses_format_and_columns_and_writes_a_loadable_params_file(tmp_path):
    from loraops.core.config import load_params

    project = _mini_project(tmp_path / "proj")
    data = project / "data/raw/tickets.csv"
    data.write_text("번호,유형,문의내용,답변\n" + "".join(f"{i},도배,질문 {i}?,답 {i}\n" for i in range(30)), encoding="utf-8")
    result = loraops("init-data", "data/raw/tickets.csv", cwd=project)
    assert result.returncode == 0, result.stderr
    assert "data.format: qa" in result.stdout and "data.question_column: 문의내용" in result.stdout
    params = load_params(project / "configs/tickets.yaml")
    assert (params.data.path, params.data.answer_column, params.data.category_column) == ("data/raw/tickets.csv", "답변", "유형")
    assert params.data.id_column == "번호" and params.registry.model_name == "tickets-lora"
    assert loraops("prepare", "--params", "configs/tickets.yaml", cwd=project).returncode == 0
    assert (params.rag.corpus, params.rag.docs_path) == ("train", "data/raw/tickets.csv")  # not the sample's documents
    numbered = project / "data/raw/numbered.csv"  # the id column's name contains "문의" (inquiry) too
    numbered.write_text("문의번호,유형,고객문의,상담답변\n" + "".join(f"T-{i:04d},도배,벽지 질문 {i}?,답변 {i}\n"
                                                             for i in range(30)), encoding="utf-8")
    guessed = loraops("init-data", "data/raw/numbered.csv", cwd=project)
    assert "data.question_column: 고객문의" in guessed.stdout and "data.id_column: 문의번호" in guessed.stdout
    long = project / "data/raw/faq.csv"  # a seller-centre FAQ: answers of thousands of characters
    long.write_text("question,answer\n" + "".join(f"질문 {i}?,{'긴 답변 문장입니다. ' * (20 * (i % 10 + 1))}\n"
                                                   for i in range(40)), encoding="utf-8")
    proposed = loraops("init-data", "data/raw/faq.csv", cwd=project)
    assert proposed.returncode == 0 and "answers 1," in proposed.stdout, proposed.stdout
    faq = load_params(project / "configs/faq.yaml")
    assert faq.data.max_answer_chars >= 2200 and faq.eval.max_new_tokens >= 512 and faq.model.max_length >= 640
    again = loraops("init-data", "data/raw/tickets.csv", cwd=project)
    assert again.returncode == 2 and "exists; pass --force" in again.stderr
    unclear = project / "x.csv"
    unclear.write_text("a,b\n1,2\n", encoding="utf-8")
    refused = loraops("init-data", "x.csv", cwd=project)
    assert refused.returncode == 2 and "cannot tell the question and answer columns apart" in refused.stderr
    (project / "sheet.xlsx").write_bytes(b"PK")
    for name, message in (("data", "data: not a file"), ("sheet.xlsx", "unsupported file type '.xlsx'"),
                          ("gone.csv", "gone.csv: not found")):
        bad = loraops("init-data", name, "--out", f"configs/{name}.yaml", cwd=project)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


@pytest.mark.slow
@pytest.mark.integration
def test_run_from_an_installed_wheel_pointed_at_the_project(golden, tmp_path):
    """`loraops run` from a wheel (its flows and every layer inside the package), started outside the project with
    --project, on a copy of the trained golden project: a changed eval setting reruns evaluate only, then
    registration and the gate run from the wheel too."""
    from helpers import copy_project

    wheel_dir, site = tmp_path / "dist", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = wheel_dir.glob("loraops-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    assert (site / "loraops" / "flows" / "finetune.py").exists() and (site / "loraops/judge/probes/ko_graded.jsonl").exists()
    project = copy_project(golden.root, tmp_path / "ws")
    outside = tmp_path / "outside"
    outside.mkdir()
    import os

    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    layers = ("flows.finetune", "stages.train", "stages.evaluate", "serving.api", "serving.demo", "review.approval",
              "orchestration.sweep", "retrieval.index", "modeling.trainer")
    probe = subprocess.run([sys.executable, "-c", "import importlib, loraops.flows.finetune as f; print(f.__file__); "
                            + "; ".join(f"importlib.import_module('loraops.{m}')" for m in layers)],
                           env=env, cwd=outside, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-2000:]  # every package made it into the wheel
    assert probe.stdout.strip().startswith(str(site))
    result = subprocess.run([sys.executable, "-m", "loraops.cli", "--project", str(project), "run", "--set",
                             "eval.max_samples=24"], env=env, cwd=outside, capture_output=True, text=True, timeout=900)
    assert result.returncode in (0, 3), result.stdout[-3000:] + result.stderr[-3000:]  # registered, or refused
    log = result.stdout + result.stderr
    assert "DVC stage evaluate: ran" in log and "DVC stage train: skipped" in log, log[-3000:]
    assert "registered interior-qa-lora v" in result.stdout
    assert not (outside / "mlruns").exists()


def test_invoke_runs_a_command_in_this_process_and_returns_its_exit_code(monkeypatch, capsys):
    """What a flow runs its stage commands with: the console entry's exit codes, without a new process."""
    from loraops.cli import invoke

    monkeypatch.chdir(REPO)
    assert invoke(["prepare", "--set", "nosuch.key=1"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "nosuch" in err, err
    assert invoke(["prepare", "--no-such-option"]) == 2
