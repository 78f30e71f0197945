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


# Every benchmark's quickest mode, run so that none can rot (smoke runs: the figures are not checked, only that each
# benchmark completes and prints its summary line).
SMOKES = {
    "train_throughput.py --smoke": "speedup_vs_hf_trainer:",
    "eval_throughput.py --questions 4 --max-new-tokens 8 --scoring-calls 1": "generation_speedup_batched:",
    "retrieval.py --smoke": "morpheme_bm25_recall1_vs_whitespace:",
    "orchestration_overhead.py --smoke": "orchestration_overhead_ratio:",
    "sweep.py --smoke": "sequential `loraops run`",
}


def _bench(command: str, cwd: Path = Path(__file__).resolve().parents[1]) -> str:
    import os
    import subprocess

    script, *args = command.split()
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "benchmarks" / script), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, f"{command}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(SMOKES))
def test_benchmark_smoke(command):
    assert SMOKES[command] in _bench(command)


@pytest.mark.slow
def test_serve_benchmark_smoke(served_project):
    out = _bench(f"serve_throughput.py --project {served_project} --requests 4 --long-tokens 200")
    assert "every arm the same answers" in out and "short_beside_long_ratio_p50:" in out
