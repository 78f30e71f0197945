"""A new user's first steps: a fresh `git clone`, plain commands, and their own base model of a real architecture.

Everything runs from a `git clone` of this repository (no `make`, no `dvc pull` first), through DVC, with local
base folders of Llama, Qwen2 and GPT-NeoX shapes whose tokenizers differ as real ones do (tests/bases.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bases import ARCHITECTURES, INSTRUCT, build_base, sample_texts
from helpers import REPO, loraops_in_one_process, small_loop_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Few steps: these tests check that every path works with every architecture, not that it learns.
SYSTEM = "당신은 인테리어 하자 상담원입니다."
QUICK = small_loop_overrides("train.max_steps=20", "train.eval_steps=10", "eval.max_samples=10")


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    texts = sample_texts(REPO)
    return {arch: build_base(arch, texts, root / arch) for arch in (*ARCHITECTURES, *INSTRUCT)}


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


CHAT_MARKERS = {"llama_instruct": "<|start_header_id|>assistant<|end_header_id|>", "qwen2_instruct": "<|im_start|>assistant",
                "gemma2": "<start_of_turn>model", "gpt_neox": None}


def _eval_prompts(clone: Path) -> list[str]:
    import pandas as pd

    return pd.read_csv(clone / "reports/eval_questions.csv", keep_default_na=False)["prompt"].tolist()


def test_a_fresh_clone_indexes_first_then_runs_the_loop_on_a_local_llama_instruct(tmp_path, bases):
    """Llama-3-style instruct through run → evaluate → register → pyfunc → serve (chat) → export, then the same
    project on a Qwen2 ChatML instruct, a Gemma-2-style model and a GPT-NeoX base through `dvc exp run`."""
    clone = _clone(tmp_path / "clone")
    assert not (clone / "data/docs").exists() and not (clone / "data/raw/interior_qa.csv").exists()
    indexed = _cli(clone, "index")  # before any other stage: documents only, pulled from the DVC remote
    assert indexed.returncode == 0, indexed.stderr[-2000:]
    assert "indexed" in indexed.stdout and "no questions to attach passages to" in indexed.stdout

    base = bases["llama_instruct"]
    run = _cli(clone, "run", *_sets(*QUICK, f"model.base={base}", f"data.system_prompt={SYSTEM}", "model.max_length=192"))
    assert run.returncode in (0, 3), run.stdout[-3000:] + run.stderr[-3000:]  # promoted/registered, or refused
    assert "registered interior-qa-lora v1" in run.stdout
    assert "dvc pull data/raw/interior_qa.csv.dvc" in run.stdout + run.stderr
    assert "prompt format: chat template from tokenizer, assistant turn ends with <|eot_id|>" in run.stdout + run.stderr
    card = json.loads((clone / "models/base/loraops_base.json").read_text())
    assert card["kind"] == "reference" and card["location"] == str(base) and len(card["weights_sha256"]) == 64
    assert all(CHAT_MARKERS["llama_instruct"] in p and SYSTEM in p for p in _eval_prompts(clone))
    shown = _cli(clone, "prepare", "--show", "2", *_sets(f"model.base={base}", f"data.system_prompt={SYSTEM}"))
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert shown.stdout.count("<|start_header_id|>assistant<|end_header_id|>\n\n⟦") == 2
    assert shown.stdout.count("<|eot_id|>⟧") == 2 and SYSTEM in shown.stdout
    # the registered version names its base and answers through the pyfunc, as serving loads it
    import mlflow

    from loraops.modeling.prompting import PromptFormat
    from loraops.registry.tracking import tracking_setup

    tracking_setup(clone)
    mv = mlflow.MlflowClient().get_model_version("interior-qa-lora", "1")
    assert mv.tags["lineage.base_model"] == str(base) and mv.tags["quality.floors"]
    assert mv.tags["lineage.prompt"].startswith("chat template from tokenizer")
    model = mlflow.pyfunc.load_model("models:/interior-qa-lora/1")
    assert isinstance(model.predict(["벽지가 들떴어요. 어떻게 하나요?"])[0], str)
    assert model.unwrap_python_model().fmt.system_prompt == SYSTEM
    with contextlib.chdir(clone):  # the registry is the clone's (mlruns/ under the working directory)
        _chat_api_renders_the_trained_template(clone)
        _merged_export_renders_what_the_adapter_does(clone, PromptFormat.read(clone / "models/adapter"))

    # the same project on the other bases: `loraops run` on each (registered, then gated against production), one
    # after another in one process (what each left is kept for the checks below) ...
    others = ("qwen2_instruct", "gemma2", "gpt_neox")
    kept = tmp_path / "kept"
    runs = loraops_in_one_process(
        clone, [["run", *_sets(*QUICK, f"model.base={bases[arch]}", "lora.modules_to_save=[]", "data.system_prompt=null",
                               "model.max_length=192")] for arch in others],
        {**os.environ, "LORAOPS_API_KEY": ""}, keep=("models/base/loraops_base.json", "metrics/eval.json",
                                                   "reports/eval_questions.csv"), kept=kept)
    for number, (arch, done) in enumerate(zip(others, runs)):
        assert done.returncode in (0, 3, 4), arch + done.stdout[-3000:] + done.stderr[-3000:]  # any outcome: the path
        assert f"registered interior-qa-lora v{number + 2}" in done.stdout, arch + done.stdout[-2000:]
        left = kept / str(number)
        assert json.loads((left / "models/base/loraops_base.json").read_text())["location"] == str(bases[arch])
        summary = json.loads((left / "metrics/eval.json").read_text())
        assert summary["n"] > 0 and "morph_f1" in summary["metrics"]
        marker = CHAT_MARKERS[arch]
        assert all((marker in p) if marker else p.startswith("질문: ") for p in _eval_prompts(left)), arch
        if arch == "gemma2":  # soft-capped attention: padded batches instead of a refusal
            assert "padded batches, since this model's attention uses soft-capped attention scores" in done.stdout + done.stderr
    # ... and through DVC alone (`dvc exp run -S`, as a user iterates), on a raw Qwen2 base (no BOS, pad = EOS)
    dvc = str(Path(sys.executable).parent / "dvc")
    quick = [arg for pair in QUICK if not pair.startswith("model.tiny.") for arg in ("-S", pair)]
    done = subprocess.run([dvc, "exp", "run", "-S", f"model.base={bases['qwen2']}", *quick, "-S", "model.max_length=192"],
                          cwd=clone, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(clone / "src")})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert json.loads((clone / "models/base/loraops_base.json").read_text())["location"] == str(bases["qwen2"])
    assert all(p.startswith("질문: ") for p in _eval_prompts(clone))  # no template: the plain prompt


def _chat_api_renders_the_trained_template(clone: Path) -> None:
    """The OpenAI chat endpoint renders system and earlier turns through the version's chat template."""
    from fastapi.testclient import TestClient

    from loraops.core.config import load_params
    from loraops.serving import api

    params = load_params(clone / "params.yaml")
    catalog, engine, settings, _ = api.open_engine(params, ["interior-qa-lora"], cache_dir=clone / ".serve-cache")
    client = TestClient(api.create_app(catalog, engine, settings))
    question = {"role": "user", "content": "벽지가 들떴어요. 어떻게 하나요?"}

    def usage(*messages: dict) -> dict:
        r = client.post("/v1/chat/completions", json={"model": "interior-qa-lora/1", "max_tokens": 4,
                                                      "messages": list(messages)})
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    trained, bare = usage(question), usage({"role": "system", "content": "짧게."}, question)
    turns = usage({"role": "user", "content": "안녕하세요"}, {"role": "assistant", "content": "네, 말씀하세요."}, question)
    assert trained["prompt_tokens"] != bare["prompt_tokens"] and turns["prompt_tokens"] > trained["prompt_tokens"]
    last = client.post("/v1/chat/completions", json={"model": "interior-qa-lora/1", "messages": [question, {
        "role": "assistant", "content": "네"}]})
    assert last.status_code == 400 and "the last message must be the user's" in last.text


def _merged_export_renders_what_the_adapter_does(clone: Path, fmt) -> None:
    from transformers import AutoTokenizer

    from loraops.serving import export

    out = export.merged("models:/interior-qa-lora/1", clone / "exports/merged")
    merged = AutoTokenizer.from_pretrained(out["out"])
    adapter = AutoTokenizer.from_pretrained(clone / "models/adapter")
    prompt = "질문: 벽지가 들떴어요\n답변: "
    rendered = merged.apply_chat_template([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                                          tokenize=False, add_generation_prompt=True)
    assert rendered == fmt.text(adapter, prompt)
    manifest = json.loads((Path(out["out"]) / "loraops_export.json").read_text())
    assert manifest["prompt_format"]["system_prompt"] == SYSTEM
    config = json.loads((Path(out["out"]) / "generation_config.json").read_text())
    assert adapter.convert_tokens_to_ids("<|eot_id|>") in config["eos_token_id"]


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
