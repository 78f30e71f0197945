"""Faults a long GPU job meets, injected for real: the process killed with SIGKILL mid-training (integration tier)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from helpers import make_workspace, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_run_killed_mid_training_resumes_closes_its_mlflow_run_and_frees_the_slot(tmp_path):
    ws = make_workspace(tmp_path / "ws", tiny_overrides("train.max_steps=250", "train.early_stopping_patience=0",
                                                       "eval.self_test=false"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAOPS_SLOT_LEASE_SECONDS": "60"}
    env.pop("MLFLOW_TRACKING_URI", None)
    run = [sys.executable, "-m", "loraops.cli", "run"]
    first = subprocess.Popen(run, cwd=ws, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    checkpoint = ws / "models/checkpoints/checkpoint-100"
    deadline = time.time() + 600
    while not (checkpoint / "rng_state.pth").exists():
        assert first.poll() is None and time.time() < deadline, "the run ended before its checkpoint-100"
        time.sleep(0.1)
    time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the run, its `dvc repro` and its `loraops train`: a machine dying
    first.wait()
    with sqlite3.connect(ws / "mlruns/mlflow.db") as db:
        assert db.execute("select status from runs").fetchall() == [("RUNNING",)]  # what a crash leaves

    second = subprocess.run(run, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-4000:]
    assert "resuming from checkpoint-100" in out, out[-4000:]
    assert "was left RUNNING by a process that died; marked KILLED" in out
    assert "registered interior-qa-lora v1" in second.stdout
    with sqlite3.connect(ws / "mlruns/mlflow.db") as db:
        statuses = db.execute("select r.status from runs r join experiments e on e.experiment_id = r.experiment_id "
                              "where e.name = 'interior-qa-lora' order by r.start_time").fetchall()
    assert statuses == [("KILLED",), ("FINISHED",)]  # the killed run closed, the resumed one finished
