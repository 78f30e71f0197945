"""Device-dependent choices, checked on CPU: batching, precision, optimiser, QLoRA refusal."""

from __future__ import annotations

import importlib.util

import pytest

from loraops.core.config import TrainSection
from loraops.stages.train import precision_choice, resolve_batching, training_args


def test_batching_auto_packs_on_every_device():
    assert resolve_batching("auto") == "packed"
    assert resolve_batching("padded") == "padded" and resolve_batching("length_grouped") == "length_grouped"


def test_cpu_arguments_are_fp32_deterministic(tmp_path):
    args = training_args(TrainSection(), 1, "cpu", tmp_path, True, "length_grouped")
    assert not args.bf16 and args.use_cpu and args.full_determinism and args.prediction_loss_only
    assert args.train_sampling_strategy == "group_by_length" and args.load_best_model_at_end


def test_cuda_selects_bf16_and_fused_adamw():
    assert precision_choice(TrainSection(), "cuda") == (True, "adamw_torch_fused")
    assert precision_choice(TrainSection(precision="fp32"), "cuda") == (False, "adamw_torch_fused")
    assert precision_choice(TrainSection(), "cpu") == (False, "adamw_torch")


@pytest.mark.gpu
@pytest.mark.slow
def test_qlora_and_bf16_train_on_cuda(tmp_path):
    """GPU tier: the tiny loop in bf16 and in 4-bit QLoRA (needs CUDA and bitsandbytes)."""
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("bitsandbytes") is None:
        pytest.skip("needs a CUDA GPU and bitsandbytes")
    from helpers import REPO, tiny_overrides
    from loraops.core.config import load_params
    from loraops.stages import prepare, train

    for quantization in ("none", "4bit"):
        params = load_params(REPO / "params.yaml", tiny_overrides(
            f"data.path={REPO / 'data/raw/interior_qa.csv'}", "base.device=cuda", f"train.quantization={quantization}",
            "lora.modules_to_save=[]"))
        prepare.run(params, tmp_path)
        figures = train.run(params, tmp_path)
        assert figures.device == "cuda" and (tmp_path / "models/adapter/adapter_model.safetensors").exists()
