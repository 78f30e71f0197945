"""The train stage across two nodes under `accelerate launch` (one CPU process per node, gloo, rendezvous on
loopback), each node in a folder of its own: one adapter and one log, written by the main process on node 0."""

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


def test_train_across_two_nodes_under_accelerate_on_cpu(tmp_path):
    from helpers import free_port
    from loraops.core.config import load_params
    from loraops.stages import prepare

    overrides = tiny_overrides(f"data.path={REPO / 'data/raw/interior_qa.csv'}")
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:  # the nodes share nothing: each prepares (the same, seeded) data in its own folder
        node.mkdir()
        prepare.run(load_params(REPO / "params.yaml", overrides), node)
    sets = [arg for kv in overrides for arg in ("--set", kv)]
    port = free_port()
    procs = []
    for rank, node in enumerate(nodes):
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_machines", "2", "--machine_rank",
               str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--num_processes", "2",
               # --multi_gpu selects accelerate's torch.distributed launcher; without CUDA it runs gloo on the CPU
               "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "loraops.cli", "train",
               "--params", str(REPO / "params.yaml"), *sets]
        procs.append(subprocess.Popen(cmd, cwd=node, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}))
    outs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (stdout, stderr) in zip(procs, outs):
        assert proc.returncode == 0, stderr[-3000:]
    assert outs[0][0].count("trained 150 steps") == 1 and "trained" not in outs[1][0]  # the main process alone reports
    main, other = nodes
    figures = json.loads((main / "metrics/train.json").read_text())
    assert figures["processes"] == 2
    assert (main / "models/adapter/adapter_model.safetensors").exists()
    assert not (other / "models/adapter").exists() and not (other / "metrics/train.json").exists()  # and writes
    assert not [p for p in (main / "models").iterdir() if p.name.startswith(".")]  # no leftover temp dirs
    steps = [row["step"] for row in csv.DictReader((main / "metrics/train_log.csv").open())]
    assert len(steps) == len(set(steps)) > 0  # each step's loss logged once
