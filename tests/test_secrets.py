"""Secrets stay in the environment: refused in params, masked in what loraops records and prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, make_workspace, small_loop_overrides
from loraops.core.config import load_params
from loraops.core.errors import ConfigError
from loraops.core.secrets import MASK, redact, redact_text, secret_values

HF = "hf_" + "Q" * 10 + "loraopsMarker1"
OPENAI = "sk-" + "loraopsMarker2" + "x" * 12
PASSWORD = "loraops-Marker3-pw"


def test_secret_values_come_from_variables_named_like_secrets():
    env = {"HF_TOKEN": HF, "MLFLOW_TRACKING_PASSWORD": PASSWORD, "TOKENIZERS_PARALLELISM": "false-ish",
           "SSH_AUTH_SOCK": "/tmp/ssh-XXXX/agent.1", "GOOGLE_APPLICATION_CREDENTIALS": "/etc/gcp.json", "HOME": "/root"}
    assert secret_values(env) == sorted([HF, PASSWORD], key=len, reverse=True)


def test_redaction_masks_values_token_shapes_url_passwords_and_secret_fields(monkeypatch):
    monkeypatch.setenv("MY_SERVICE_PASSWORD", PASSWORD)
    text = f"using {PASSWORD} and {OPENAI} via https://bot:{PASSWORD}x@mlflow.example/ and hf_{'a' * 30}"
    masked = redact_text(text)
    assert PASSWORD not in masked and OPENAI not in masked and "hf_aaaa" not in masked and masked.count(MASK) == 4
    card = {"git_diff": f"+KEY = '{OPENAI}'", "nested": [{"api_key": "plain", "hf_token": "x"}], "seed": 42,
            "eval": {"max_new_tokens": 64}, "tokenizer_sha256": "ab12", "path": "data/raw/x.csv"}
    assert redact(card) == {**card, "git_diff": f"+KEY = '{MASK}'", "nested": [{"api_key": MASK, "hf_token": MASK}]}


@pytest.mark.parametrize("override", [f"model.base=https://user:{PASSWORD}@hub.example/m", f"model.revision={HF}",
                                      f"data.template={OPENAI} {{question}}"])
def test_params_refuse_secrets_naming_the_key(monkeypatch, override):
    monkeypatch.setenv("SOME_PASSWORD", PASSWORD)
    key = override.split("=", 1)[0]
    with pytest.raises(ConfigError, match=rf"{key}: looks like a secret"):
        load_params(REPO / "params.yaml", [override])


@pytest.mark.slow
@pytest.mark.integration
def test_no_marker_secret_reaches_mlflow_prefect_or_the_lineage(tmp_path):
    """A run with secrets in the environment and one typed into the code (a dirty tree, --allow-dirty): grep every
    byte loraops wrote — the MLflow store, its artifacts, DVC's lock, Prefect's database — for the markers."""
    ws = make_workspace(tmp_path / "ws", small_loop_overrides("train.max_steps=30", "train.eval_steps=10"))
    # in a tracked script no stage runs: the lineage's git diff carries it, and the stages still run in the flow's
    # process (a change under src/loraops would make every stage a process of its own, for nothing this test checks)
    with (ws / "scripts/sync_codedeps.py").open("a", encoding="utf-8") as fh:
        fh.write(f"\n# a key someone pasted by mistake: {OPENAI}\n")
    home = tmp_path / "prefect-home"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_TOKEN": HF, "OPENAI_API_KEY": OPENAI,
           "MLFLOW_TRACKING_PASSWORD": PASSWORD, "PREFECT_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "loraops.cli", "run", "--allow-dirty"], cwd=ws, env=env,
                            capture_output=True, text=True, timeout=900)
    # 30 steps: registered, and promoted or refused by the gate (3); what is checked is every byte written on the way
    assert result.returncode in (0, 3), result.stdout[-3000:] + result.stderr[-3000:]
    assert "registered interior-qa-lora v1" in result.stdout
    markers = [m.encode() for m in ("loraopsMarker1", "loraopsMarker2", "loraops-Marker3")]
    searched, diffs = 0, 0
    for root in (ws / "mlruns", home):
        for path in Path(root).rglob("*"):
            if path.is_file():
                searched += 1
                data = path.read_bytes()
                assert not [m for m in markers if m in data], f"a secret reached {path}"
                diffs += b"a key someone pasted by mistake" in data
    assert searched > 20 and diffs  # the dirty tree's diff was recorded (masked), so the line was there to leak
    for text in (result.stdout, result.stderr, (ws / "dvc.lock").read_text()):
        assert not [m for m in markers if m.decode() in text]


def test_redaction_leaves_ordinary_params_alone():
    """The lineage card's params are what `loraops reproduce` rebuilds from: nothing in them may be masked."""
    from loraops.core.config import Params

    tree = Params().model_dump(mode="json")
    assert redact(tree) == tree
