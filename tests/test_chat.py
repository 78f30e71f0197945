"""Prompt formats on the bases teams fine-tune: what is rendered, what is learned, where generation stops.

Local folders of a Llama-3-style instruct (end of turn ≠ EOS, no pad), a Qwen2 ChatML instruct (no BOS, a default
system turn, pad ≠ EOS), a Gemma-2-style model (no system role, sliding window, soft-capping) and a GPT-NeoX base
(BOS = EOS = pad after loading, no template), built by tests/bases.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bases import build_base, sample_texts
from helpers import REPO
from loraops.core.config import ModelSection
from loraops.core.errors import ConfigError
from loraops.modeling import prompting
from loraops.modeling.model import load_tokenizer
from loraops.stages.preview import CLOSE, OPEN, marked
from loraops.stages.train import collator, tokenize_pair

pytestmark = pytest.mark.slow
PROMPT, ANSWER = "질문: 벽지가 들떴어요. 왜 그런가요?\n답변: ", "시공 때 풀이 부족했거나 습기 때문입니다."
SYSTEM = "당신은 인테리어 하자 상담원입니다."


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat-bases")
    texts = sample_texts(REPO)
    return {arch: build_base(arch, texts, root / arch)
            for arch in ("llama_instruct", "qwen2_instruct", "gemma2", "gpt_neox")}


def _tokenizer(path: Path):
    return load_tokenizer(str(path), ModelSection(base=str(path)))


@pytest.mark.parametrize("arch, markers, end", [
    ("llama_instruct", ["<|begin_of_text|>", "<|start_header_id|>user<|end_header_id|>"], "<|eot_id|>"),
    ("qwen2_instruct", ["<|im_start|>system\nYou are a helpful assistant.", "<|im_start|>user\n"], "<|im_end|>"),
    ("gemma2", ["<bos><start_of_turn>user\n", "<start_of_turn>model\n"], "<end_of_turn>"),
    ("gpt_neox", ["<|endoftext|>질문:"], "<|endoftext|>"),
])
def test_only_the_assistant_turn_and_its_end_of_turn_token_are_learned(bases, arch, markers, end):
    tok = _tokenizer(bases[arch])
    fmt = prompting.resolve("auto", None, tok)
    assert fmt.chat == (arch != "gpt_neox")
    item = tokenize_pair(tok, PROMPT, ANSWER, 512, fmt)
    ids, labels = item["input_ids"], item["labels"]
    prompt_ids = [i for i, label in zip(ids, labels) if label == -100]
    learned = [label for label in labels if label != -100]
    assert labels[:len(prompt_ids)] == [-100] * len(prompt_ids)  # one prompt, then the answer: nothing after it
    assert tok.decode(prompt_ids, skip_special_tokens=False) == fmt.text(tok, PROMPT)  # what generation reads too
    assert all(marker in fmt.text(tok, PROMPT) for marker in markers)
    assert tok.decode(learned, skip_special_tokens=False) == ANSWER + end
    assert learned[-1] == tok.convert_tokens_to_ids(end) and learned[-1] in fmt.stop_ids(tok)
    assert marked(tok, ids, labels).endswith(f"{OPEN}{ANSWER}{end}{CLOSE}")
    # batched as train batches them: the end of turn keeps its label even where pad = EOS (GPT-NeoX after loading)
    short = tokenize_pair(tok, PROMPT, "네.", 512, fmt)
    for packed in (False, True):
        batch = collator(tok, packed)([item, short])
        assert int((batch["labels"] == learned[-1]).sum()) == 2, (arch, packed)


def test_end_of_turn_unlike_eos_stops_generation_and_pad_is_not_eos(bases):
    llama, qwen = _tokenizer(bases["llama_instruct"]), _tokenizer(bases["qwen2_instruct"])
    fmt = prompting.resolve("auto", None, llama)
    eot = llama.convert_tokens_to_ids("<|eot_id|>")
    assert eot != llama.eos_token_id and fmt.end_of_turn == ["<|eot_id|>"]
    assert fmt.stop_ids(llama) == [llama.eos_token_id, eot]
    assert qwen.pad_token != qwen.eos_token and prompting.resolve("auto", None, qwen).end_of_turn == ["<|im_end|>"]


def test_system_prompts_template_files_and_their_refusals(bases, tmp_path):
    llama, gemma, neox = (_tokenizer(bases[a]) for a in ("llama_instruct", "gemma2", "gpt_neox"))
    with_system = prompting.resolve("auto", SYSTEM, llama)
    assert f"<|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>" in with_system.text(llama, PROMPT)
    assert with_system.text(llama, PROMPT) != prompting.resolve("auto", None, llama).text(llama, PROMPT)
    with pytest.raises(ConfigError, match="data.system_prompt: .*System role not supported"):
        prompting.resolve("auto", SYSTEM, gemma)
    with pytest.raises(ConfigError, match="data.system_prompt: a system turn needs a chat template"):
        prompting.resolve("auto", SYSTEM, neox)
    with pytest.raises(ConfigError, match="data.system_prompt"):
        prompting.resolve("none", SYSTEM, llama)
    assert not prompting.resolve("none", None, llama).chat  # `none`: the plain template even on an instruct base
    # a file in prompts/ overrides the tokenizer's; one elsewhere, or missing, is refused naming the key
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts/plain-chat.jinja").write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}", encoding="utf-8")
    own = prompting.resolve("prompts/plain-chat.jinja", None, llama, tmp_path)
    assert own.text(llama, PROMPT) == f"[user] {PROMPT}<|eot_id|>[assistant] " and own.source == "prompts/plain-chat.jinja"
    assert own.end_of_turn == ["<|eot_id|>"]
    (tmp_path / "elsewhere.jinja").write_text("{{ messages }}", encoding="utf-8")
    for path, message in (("elsewhere.jinja", "is not in prompts/"), ("prompts/missing.jinja", "no such file")):
        with pytest.raises(ConfigError, match=f"data.chat_template: .*{message}"):
            prompting.resolve(path, None, llama, tmp_path)


def test_a_model_trained_to_end_its_turn_stops_there(bases):
    """Overfit a Llama-3-style instruct on two pairs; greedy answers stop at <|eot_id|> (not EOS), and only the
    format's stop list makes them stop there."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraops.core.config import EvalSection
    from loraops.modeling.generation import generate

    tok = _tokenizer(bases["llama_instruct"])
    fmt = prompting.resolve("auto", None, tok)
    pairs = [("질문: 벽지가 들떴어요\n답변: ", "풀이 부족했습니다."), ("질문: 곰팡이가 폈어요\n답변: ", "환기가 필요합니다.")]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(bases["llama_instruct"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    items = [tokenize_pair(tok, p, a, 128, fmt) for p, a in pairs]
    model.train()
    for _ in range(120):
        for item in items:
            loss = model(input_ids=torch.tensor([item["input_ids"]]), labels=torch.tensor([item["labels"]])).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    cfg = EvalSection(max_new_tokens=40, batch_size=2, stop_strings=[])
    answers = generate(model, tok, [p for p, _ in pairs], cfg, "cpu", progress=False, fmt=fmt)
    assert answers == [a for _, a in pairs]
    enc = tok([fmt.text(tok, pairs[0][0])], return_tensors="pt", add_special_tokens=False)
    stopped = model.generate(**enc, max_new_tokens=40, do_sample=False, eos_token_id=fmt.stop_ids(tok, model),
                             pad_token_id=tok.pad_token_id)
    endless = model.generate(**enc, max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    new = stopped[0, enc["input_ids"].shape[1]:].tolist()
    assert new[-1] == tok.convert_tokens_to_ids("<|eot_id|>") and len(new) < 40
    assert endless.shape[1] > stopped.shape[1]  # EOS alone does not end an instruct model's turn


def test_a_long_chat_prompt_is_cut_inside_the_question_keeping_system_turn_and_cue(bases):
    tok = _tokenizer(bases["llama_instruct"])
    fmt = prompting.resolve("auto", SYSTEM, tok)
    long = "질문: " + "벽지가 들떴어요. " * 40 + "왜 그런가요?\n답변: "
    item = tokenize_pair(tok, long, ANSWER, 192, fmt)
    shown = tok.decode(item["input_ids"], skip_special_tokens=False)
    assert len(item["input_ids"]) <= 192 and shown.startswith("<|begin_of_text|><|start_header_id|>system")
    assert SYSTEM in shown and "왜 그런가요?\n답변:<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" in shown
    assert tok.decode([t for t in item["labels"] if t != -100], skip_special_tokens=False).startswith(ANSWER[:5])
