"""Training and evaluation on a tiny locally built Llama: adapter, packing, determinism, generation."""

from __future__ import annotations

import json

import pytest

from helpers import REPO
from loraops.core.config import load_params
from loraops.core.readers import load_split
from loraops.modeling import generation
from loraops.modeling.model import ModelError, load_base, load_tokenizer
from loraops.stages import evaluate, prepare, train
from loraops.stages.train import tokenize_pair

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from helpers import tiny_overrides

    root = tmp_path_factory.mktemp("stage")
    params = load_params(REPO / "params.yaml", tiny_overrides(f"data.path={REPO / 'data/raw/interior_qa.csv'}"))
    prepare.run(params, root)
    figures = train.run(params, root)
    return params, root, figures


def test_adapter_saved_as_safetensors_with_curves(trained):
    params, root, figures = trained
    adapter = root / "models/adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    assert figures.steps == params.train.max_steps and figures.device == "cpu"
    log = (root / "metrics/train_log.csv").read_text().splitlines()
    assert log[0] == "step,train_loss,val_loss,learning_rate" and len(log) > 2
    assert json.loads((root / "metrics/train.json").read_text())["adapter_sha256"] == figures.adapter_sha256


def test_training_is_bit_identical_on_cpu(trained, tmp_path):
    params, root, figures = trained
    prepare.run(params, tmp_path)
    assert train.run(params, tmp_path).adapter_sha256 == figures.adapter_sha256


def test_labels_mask_the_prompt(trained):
    params, root, _ = trained
    tok = load_tokenizer(str(root / "models/base"), params.model)
    item = tokenize_pair(tok, "질문: 벽지?\n답변: ", "습기입니다.", 96)
    answer_len = len(tok("습기입니다.", add_special_tokens=False)["input_ids"]) + 1
    assert item["labels"][-answer_len:] == item["input_ids"][-answer_len:]
    assert set(item["labels"][:-answer_len]) == {-100}


def test_evaluate_writes_report_table_and_metrics(trained):
    params, root, _ = trained
    returned = evaluate.run(params, root)
    summary = json.loads((root / "metrics/eval.json").read_text(encoding="utf-8"))  # what dvc metrics show reads
    assert returned.model_dump(mode="json", exclude_unset=True) == summary
    total = len(load_split("test", root))
    assert summary["sample"] == {"n": summary["n"], "of": total, "seed": 42, "stratified_by": "category, whole source groups"}
    assert params.eval.max_samples <= summary["n"] < total
    assert set(summary["metrics"]) == {"morph_f1", "morph_rouge_l", "bertscore_p", "bertscore_r", "bertscore_f1", "cosine",
                                       "chrf", "rouge_l", "exact_match", "token_f1"}
    report = (root / "reports/eval.md").read_text(encoding="utf-8")
    assert report.startswith("# Evaluation: base vs tuned") and f"a seeded sample (seed 42) of {total}" in report
    assert (root / "reports/plots/score_hist.png").exists()
    table = evaluate.read_table(root)
    assert {"question", "reference", "base_answer", "tuned_answer", "tuned_cosine", "base_degenerate"} <= set(table.columns)
    assert set(summary["slices"]["category"]) == set(table["category"]) == {r["category"] for r in load_split("test", root)}
    assert "\ufffd" not in report and not table["base_answer"].str.contains("\ufffd").any()
    # the untrained base writes garbage, which scores 0; the tuned adapter learned something measurable
    assert summary["degenerate"]["base"]["rate"] > 0.5 > summary["degenerate"]["tuned"]["rate"]
    assert summary["metrics"]["morph_f1"]["ci95"][0] > 0
    assert summary["validity"]["morph_f1"]["valid"] and not summary["validity"]["cosine"]["valid"]


def test_training_lowers_the_validation_loss(trained):
    """A training that does nothing must fail here: the validation loss falls well below its first value."""
    import math

    params, root, figures = trained
    rows = [line.split(",") for line in (root / "metrics/train_log.csv").read_text().splitlines()[1:]]
    val = [float(r[2]) for r in rows if r[2]]
    assert len(val) >= 2 and val == sorted(val, reverse=True)  # every evaluation better than the one before
    # an untrained model's loss is about ln(vocabulary): learning must take it far below that
    assert figures.best_val_loss < 0.5 * math.log(params.model.tiny.vocab_size)


def test_base_answers_equal_a_freshly_loaded_base(trained):
    """Disabling the adapter (evaluate's base path) must answer exactly as the untouched base model."""
    params, root, _ = trained
    model, tok = generation.load_tuned(params, root / "models/adapter", "cpu", root)
    prompts = [r["prompt"] for r in load_split("test", root)[:4]]
    with model.disable_adapter():
        via_adapter = generation.generate(model, tok, prompts, params.eval, "cpu", progress=False)
    fresh = load_base(str(root / "models/base"), params.model, "cpu")
    assert generation.generate(fresh, tok, prompts, params.eval, "cpu", progress=False) == via_adapter


def test_batched_generation_equals_one_at_a_time(trained):
    params, root, _ = trained
    model, tok = generation.load_tuned(params, root / "models/adapter", "cpu", root)
    prompts = sorted({r["prompt"] for r in load_split("test", root)})[:5]
    batched = generation.generate(model, tok, prompts, params.eval, "cpu", progress=False)
    single = generation.generate(model, tok, prompts, params.eval.model_copy(update={"batch_size": 1}), "cpu", progress=False)
    assert batched == single


def test_qlora_on_cpu_is_a_clear_error(tiny_params):
    with pytest.raises(ModelError, match="train.quantization=4bit .* needs a CUDA GPU"):
        load_base("unused", tiny_params.model, "cpu", quantization="4bit")


def test_stop_strings_cut_answers():
    assert generation.clean_answer(" 습기입니다.\n질문: 다음", ["\n질문:"]) == "습기입니다."


@pytest.mark.slow
def test_training_killed_mid_run_resumes_from_its_checkpoint_bit_identical(tmp_path):
    """SIGKILL after a checkpoint, then `loraops train` again: it says it resumes and ends with the very adapter an
    uninterrupted run makes (RNG states and data order restored); changed params start fresh and say why."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from helpers import make_workspace, tiny_overrides

    ws = make_workspace(tmp_path / "ws", tiny_overrides("train.max_steps=40", "train.eval_steps=20",
                                                        "train.logging_steps=5", "train.early_stopping_patience=0"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    train = [sys.executable, "-m", "loraops.cli", "train"]
    subprocess.run([sys.executable, "-m", "loraops.cli", "prepare"], cwd=ws, env=env, check=True, capture_output=True)
    whole = subprocess.run(train, cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0 and "training from scratch: no checkpoint" in whole.stdout, whole.stderr[-2000:]
    expected = json.loads((ws / "metrics/train.json").read_text())["adapter_sha256"]
    assert not (ws / "models/checkpoints").exists()  # a finished training leaves nothing to resume

    def killed_after_checkpoint_20() -> None:  # SIGKILL right after checkpoint-20 is written (its own process group)
        done = subprocess.run(train, cwd=ws, env={**env, "LORAOPS_FAULT_AFTER_CHECKPOINT": "20:kill"},
                              capture_output=True, start_new_session=True, timeout=600)
        assert done.returncode == -signal.SIGKILL and (ws / "models/checkpoints/checkpoint-20/rng_state.pth").exists()

    killed_after_checkpoint_20()
    resumed = subprocess.run(train, cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from checkpoint-20" in resumed.stdout, resumed.stdout[-2000:]
    figures = json.loads((ws / "metrics/train.json").read_text())
    assert figures["resumed_from"] == "checkpoint-20" and figures["steps"] == 40
    assert figures["adapter_sha256"] == expected

    killed_after_checkpoint_20()
    changed = subprocess.run([*train, "--set", "train.learning_rate=0.004"], cwd=ws, env=env, capture_output=True,
                             text=True, timeout=600)
    assert changed.returncode == 0 and "training from scratch: params changed since the checkpoint: train.learning_rate" \
        in changed.stdout, changed.stdout[-2000:]


def test_train_figures_are_typed_and_a_wrong_file_names_itself_and_its_key(tmp_path):
    """metrics/train.json is read as TrainFigures: a missing or renamed key fails where it is read, naming both."""
    from loraops.core.errors import DataError
    from loraops.core.paths import TRAIN_METRICS
    from loraops.core.results import TrainFigures

    figures = TrainFigures(train_loss=1.5, best_val_loss=1.2, steps=10, stopped_early=False, train_seconds=2.0,
                           started_at=1.0, finished_at=3.0, train_pairs=100, trainable_params=1000, device="cpu",
                           torch_threads=2, answer_tokens_per_epoch=500, pairs_cut_by_max_length=0, batching="packed",
                           cv={"folds": 2, "folds_run": 2, "val_loss": [1.0, 1.4], "val_loss_mean": 1.2, "val_loss_sd": 0.28})
    (tmp_path / TRAIN_METRICS).parent.mkdir(parents=True)
    (tmp_path / TRAIN_METRICS).write_text(figures.to_json(), encoding="utf-8")
    assert TrainFigures.read(tmp_path) == figures and "adapter_sha256" not in figures.to_json()
    from loraops.registry.tracking import train_figures

    assert train_figures(figures)["train/cv_fold_1_val_loss"] == 1.4
    (tmp_path / TRAIN_METRICS).write_text(figures.to_json().replace('"best_val_loss"', '"best_loss"'), encoding="utf-8")
    with pytest.raises(DataError, match=r"metrics/train.json: not the train stage's figures \(best_loss: Extra inputs"):
        TrainFigures.read(tmp_path)
    with pytest.raises(DataError, match="run `loraops train`"):
        TrainFigures.read(tmp_path / "elsewhere")
