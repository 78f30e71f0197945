"""The train stage under `accelerate launch` with two CPU processes (gloo): one adapter, one log."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, tiny_overrides

pytestmark = pytest.mark.slow


def test_train_under_accelerate_ddp_on_cpu(tmp_path):
    from loraops.core.config import load_params
    from loraops.stages import prepare

    overrides = tiny_overrides(f"data.path={REPO / 'data/raw/interior_qa.csv'}")
    prepare.run(load_params(REPO / "params.yaml", overrides), tmp_path)
    sets = [arg for kv in overrides for arg in ("--set", kv)]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "2", "--num_machines", "1",
           # --multi_gpu selects accelerate's torch.distributed launcher; without CUDA it runs gloo on the CPU
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "loraops.cli", "train",
           "--params", str(REPO / "params.yaml"), *sets]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("trained 150 steps") == 1  # the main process alone reports and writes
    figures = json.loads((tmp_path / "metrics/train.json").read_text())
    assert figures["processes"] == 2
    assert (tmp_path / "models/adapter/adapter_model.safetensors").exists()
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no leftover temp dirs
    steps = [row["step"] for row in csv.DictReader((tmp_path / "metrics/train_log.csv").open())]
    assert len(steps) == len(set(steps)) > 0  # each step's loss logged once
