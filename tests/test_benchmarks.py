"""The benchmarks' real model shapes: published sizes, built offline, with the data's special tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import architectures


@pytest.mark.parametrize(("name", "billions"), [("qwen2.5-0.5b", 0.494), ("qwen2.5-1.5b", 1.544), ("llama-3.2-1b", 1.236)])
def test_shapes_have_the_published_parameter_counts(name, billions):
    assert architectures.parameters(name) / 1e9 == pytest.approx(billions, abs=1e-3)


def test_shape_takes_the_tokenizers_special_ids_and_unknown_names_are_listed():
    from types import SimpleNamespace

    config = architectures.config("llama-3.2-1b", SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=3))
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 3)
    assert config.vocab_size == 128_256 and config.tie_word_embeddings
    with pytest.raises(KeyError, match="known: llama-3.2-1b, qwen2.5-0.5b, qwen2.5-1.5b"):
        architectures.config("gpt-5")


def test_train_benchmark_refuses_arch_and_base_together(capsys):
    import train_throughput

    with pytest.raises(SystemExit):
        train_throughput._args(["--arch", "qwen2.5-0.5b", "--base", "some/dir"])
    assert "give --arch or --base, not both" in capsys.readouterr().err
