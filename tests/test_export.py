"""`loraops export merged | vllm` from the registry of the shared served project."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from loraops.core.config import EvalSection, ModelSection
from loraops.modeling import generation
from loraops.serving import export
from loraops.serving import pyfunc as serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]
NAME = "interior-qa-lora"
QUESTIONS = ["벽지에 곰팡이가 생기는 원인은 무엇인가요?", "장판이 들뜨면 어떻게 해야 하나요?", "결로를 막으려면 어떻게 하나요?"]


def _loraops(root, *args):
    return subprocess.run([sys.executable, "-m", "loraops.cli", *args], cwd=root, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_merged_export_answers_equal_the_adapters(served_project, tmp_path, monkeypatch):
    import mlflow
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraops.registry.tracking import tracking_setup

    out = tmp_path / "merged"
    done = _loraops(served_project, "export", "merged", f"models:/{NAME}@production", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    meta = json.loads((out / "loraops_export.json").read_text())
    assert meta["source"] == f"models:/{NAME}/1" and "{question}" in meta["template"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(model, "peft_config")
    tokenizer = AutoTokenizer.from_pretrained(out)
    tokenizer.padding_side = "left"
    prompts = [meta["template"].format(question=q) for q in QUESTIONS]
    merged = serve.clean_answers(generation.generate(model, tokenizer, prompts, EvalSection(**meta["generation"]), "cpu", progress=False))
    monkeypatch.chdir(served_project)
    tracking_setup(served_project)
    assert merged == mlflow.pyfunc.load_model(f"models:/{NAME}@production").predict(QUESTIONS)

    again = _loraops(served_project, "export", "merged", f"models:/{NAME}@production", "--out", str(out))
    assert again.returncode == 2 and "exists and is not empty" in again.stderr
    missing = _loraops(served_project, "export", "merged", f"models:/{NAME}/42", "--out", str(tmp_path / "x"))
    assert missing.returncode == 2 and "has no version 42" in missing.stderr and not (tmp_path / "x").exists()


def test_a_dora_adapter_merges_to_the_same_logits(served_project, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from loraops.modeling.model import load_base

    base_dir = str(served_project / "models/base")
    cfg = ModelSection(base=base_dir)
    dora = get_peft_model(load_base(base_dir, cfg, "cpu"), LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                                                                       target_modules="all-linear"))
    dora.save_pretrained(tmp_path / "dora")
    (tmp_path / "dora").joinpath("tokenizer.json").write_bytes((served_project / "models/base/tokenizer.json").read_bytes())
    (tmp_path / "dora").joinpath("tokenizer_config.json").write_bytes(
        (served_project / "models/base/tokenizer_config.json").read_bytes())
    out = export.merge(base_dir, cfg, str(tmp_path / "dora"), tmp_path / "merged", {"source": "test"})
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    adapted = PeftModel.from_pretrained(load_base(base_dir, cfg, "cpu"), tmp_path / "dora").eval()
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        want, got = adapted(ids).logits, AutoModelForCausalLM.from_pretrained(out)(ids).logits
        plain = load_base(base_dir, cfg, "cpu")(ids).logits
    assert torch.allclose(want, got, atol=1e-4) and not torch.allclose(want, plain, atol=1e-3)


def test_vllm_export_writes_lora_modules_and_the_command(served_project, tmp_path):
    out = tmp_path / "vllm"
    done = _loraops(served_project, "export", "vllm", f"models:/{NAME}@production", "--out", str(out))
    assert done.returncode == 0, done.stderr
    (module,) = json.loads((out / "lora-modules.json").read_text())
    assert module["name"] == f"{NAME}@production" and (out / "adapter/adapter_config.json").exists()
    assert module["path"] == str((out / "adapter").resolve())
    assert "vllm serve" in done.stdout and "--enable-lora" in done.stdout and "--max-lora-rank 8" in done.stdout
    assert "modules_to_save" not in done.stderr and "embed_tokens" in done.stderr  # the tiny adapter trains embeddings
    assert (out / "serve.sh").read_text().count("--lora-modules") == 1
