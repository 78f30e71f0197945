"""A new user's first steps: a fresh `git clone`, plain commands, and their own base model of a real architecture.

Everything runs from a `git clone` of this repository (no `make`, no `dvc pull` first), through DVC, with local
base folders of Llama, Qwen2 and GPT-NeoX shapes whose tokenizers differ as real ones do (tests/bases.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bases import ARCHITECTURES, build_base, sample_texts
from helpers import REPO, tiny_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Few steps: these tests check that every path works with every architecture, not that it learns.
QUICK = tiny_overrides("train.max_steps=20", "train.eval_steps=10", "eval.max_samples=10",
                       "eval.self_test=false")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    texts = sample_texts(REPO)
    return {arch: build_base(arch, texts, root / arch) for arch in ARCHITECTURES}


def _clone(dest: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    for key, value in (("user.email", "ci@loraops.invalid"), ("user.name", "loraops-ci")):
        subprocess.run(["git", "config", key, value], cwd=dest, check=True)
    return dest


def _cli(cwd: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAOPS_API_KEY": ""}
    return subprocess.run([sys.executable, "-m", "loraops.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def test_a_fresh_clone_indexes_first_then_runs_the_loop_on_a_local_llama(tmp_path, bases):
    clone = _clone(tmp_path / "clone")
    assert not (clone / "data/docs").exists() and not (clone / "data/raw/interior_qa.csv").exists()
    indexed = _cli(clone, "index")  # before any other stage: documents only, pulled from the DVC remote
    assert indexed.returncode == 0, indexed.stderr[-2000:]
    assert "indexed" in indexed.stdout and "no questions to attach passages to" in indexed.stdout

    run = _cli(clone, "run", *_sets(*QUICK, f"model.base={bases['llama']}"))
    assert run.returncode in (0, 3), run.stdout[-3000:] + run.stderr[-3000:]  # promoted/registered, or refused
    assert "registered interior-qa-lora v1" in run.stdout
    assert "dvc pull data/raw/interior_qa.csv.dvc" in run.stdout + run.stderr
    card = json.loads((clone / "models/base/loraops_base.json").read_text())
    assert card["kind"] == "reference" and card["location"] == str(bases["llama"]) and len(card["weights_sha256"]) == 64
    # the registered version names its base and answers through the pyfunc, as serving loads it
    import mlflow

    from loraops.tracking import tracking_setup

    tracking_setup(clone)
    mv = mlflow.MlflowClient().get_model_version("interior-qa-lora", "1")
    assert mv.tags["lineage.base_model"] == str(bases["llama"]) and mv.tags["quality.floors"]
    model = mlflow.pyfunc.load_model("models:/interior-qa-lora/1")
    assert isinstance(model.predict(["벽지가 들떴어요. 어떻게 하나요?"])[0], str)

    # the same project, other architectures, through DVC alone (`dvc exp run -S`, as a user iterates)
    for arch in ("qwen2", "gpt_neox"):
        dvc = str(Path(sys.executable).parent / "dvc")
        done = subprocess.run([dvc, "exp", "run", "-S", f"model.base={bases[arch]}", "-S", "lora.modules_to_save=[]"],
                              cwd=clone, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PYTHONPATH": str(clone / "src")})
        assert done.returncode == 0, arch + done.stdout[-3000:] + done.stderr[-3000:]
        assert json.loads((clone / "models/base/loraops_base.json").read_text())["location"] == str(bases[arch])
        summary = json.loads((clone / "metrics/eval.json").read_text())
        assert summary["n"] > 0 and "morph_f1" in summary["metrics"]


def test_a_base_that_cannot_load_stops_before_any_stage(tmp_path, bases):
    clone = _clone(tmp_path / "clone")
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((bases["qwen2"] / "config.json").read_text())
    for base, message in ((str(empty), "has no weights"), ("EleutherAI/polyglot-ko-1.3b", "HF_HUB_OFFLINE is set"),
                          (str(tmp_path), "a folder without config.json")):
        refused = _cli(clone, "run", "--set", f"model.base={base}", timeout=120)
        assert refused.returncode == 2 and "model.base" in refused.stderr and message in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and not (clone / "data/prepared/train.jsonl").exists()


def test_a_fresh_clones_dvc_pull_brings_everything_dvc_lock_names(tmp_path):
    clone = _clone(tmp_path / "clone")
    dvc = str(Path(sys.executable).parent / "dvc")
    pulled = subprocess.run([dvc, "pull"], cwd=clone, capture_output=True, text=True, timeout=300)
    assert pulled.returncode == 0, pulled.stdout[-2000:] + pulled.stderr[-2000:]
    status = subprocess.run([dvc, "status"], cwd=clone, capture_output=True, text=True, timeout=300)
    assert "up to date" in status.stdout, status.stdout
