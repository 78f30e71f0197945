"""How a question becomes the text the model reads, from training to serving.

Two formats:

- **plain**: the filled ``data.template`` (or ``rag.template``) after the tokenizer's BOS; the answer ends with EOS.
  The tiny default and raw bases (polyglot-ko, Qwen2.5 base) use it.
- **chat**: the filled template is the user turn of a chat template (the base tokenizer's, for an instruct base, or a
  Jinja file in ``prompts/``), after an optional system turn (``data.system_prompt``); the model learns the assistant
  turn and the template's end-of-turn token, and generation stops on that token.

``data.chat_template: auto`` takes the tokenizer's chat template when it has one, else plain. Train resolves the
format once and writes it next to the adapter (:data:`PROMPT_FILE`), and the adapter's tokenizer carries that chat
template (or none); evaluate, the pyfunc model, `ask`, `serve` and the exports read it from there, so they prompt
exactly as training did.

What the model learns is found by rendering: the conversation with the answer, minus the prompt rendered with the
generation cue, is the assistant turn (``{% generation %}`` markers are not needed).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraops.core.errors import ConfigError, ModelError
from loraops.core.paths import TEMPLATES_DIR

PROMPT_FILE = "loraops_prompt.json"
"""The prompt format an adapter was trained with, in the adapter folder."""
_PROBE_QUESTION, _PROBE_ANSWER = "질문", "답변"


@dataclass(frozen=True)
class PromptFormat:
    """A resolved prompt format (see the module docstring)."""

    chat_template: str | None = None
    system_prompt: str | None = None
    source: str = "none"  # "tokenizer", a path under prompts/, or "none" (plain)
    end_of_turn: list[str] = field(default_factory=list)  # the special tokens that close the assistant turn

    @property
    def chat(self) -> bool:
        return self.chat_template is not None

    @property
    def describe(self) -> str:
        if not self.chat:
            return "plain template (no chat template)"
        ends = ", ".join(self.end_of_turn) or "EOS"
        return f"chat template from {self.source}, assistant turn ends with {ends}"

    # ------------------------------------------------------------------ rendering
    def messages(self, prompt: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": prompt}]

    def render(self, tokenizer: Any, messages: list[dict[str, str]], generation: bool = True) -> str:
        """``messages`` through the chat template (with the assistant cue when ``generation``)."""
        if not self.chat:
            raise ModelError("a plain-template version has no chat template to render messages with")
        return str(tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                 add_generation_prompt=generation))

    def text(self, tokenizer: Any, prompt: str) -> str:
        """What the tokenizer encodes, without adding special tokens, to answer one filled ``prompt``."""
        if not self.chat:
            return (tokenizer.bos_token or "") + prompt
        return self.render(tokenizer, self.messages(prompt))

    def shown(self, tokenizer: Any, prompt: str) -> str:
        """The prompt as reports show it: the filled template, or the whole rendered chat prompt."""
        return self.render(tokenizer, self.messages(prompt)) if self.chat else prompt

    def conversation(self, tokenizer: Any, messages: list[dict[str, str]]) -> str:
        """A chat request's messages (system, earlier turns, the last user turn) rendered for generation; the trained
        system prompt goes first when the request brings none."""
        if self.system_prompt and not any(m["role"] == "system" for m in messages):
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self.render(tokenizer, messages)

    def around(self, tokenizer: Any, prompt: str) -> tuple[str, str]:
        """The rendered text before and after the user's content (BOS, system turn, headers; the generation cue)."""
        sentinel = "\x00loraops-user\x00"
        rendered = self.text(tokenizer, sentinel)
        if rendered.count(sentinel) != 1:
            return "", ""
        before, after = rendered.split(sentinel)
        return before, after

    # ------------------------------------------------------------------ training
    def pair_ids(self, tokenizer: Any, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        """Token ids of the prompt (not learned) and of the answer with its end of turn (learned).

        Plain: ``<bos> prompt`` and ``answer <eos>``. Chat: the rendered prompt, and the assistant turn found by
        rendering the conversation with the answer (trailing whitespace after the turn's end dropped); EOS is
        appended when the template closes the turn without a special token.

        Raises:
            ModelError: a template whose conversation does not start with its own generation prompt.
        """
        if not self.chat:
            bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            return bos + tokenizer(prompt, add_special_tokens=False)["input_ids"], answer_ids
        head = self.render(tokenizer, self.messages(prompt))
        full = self.render(tokenizer, [*self.messages(prompt), {"role": "assistant", "content": answer}], generation=False)
        if not full.startswith(head):
            raise ModelError(f"chat template ({self.source}): the conversation with the answer does not start with the "
                             "prompt rendered with add_generation_prompt, so the assistant turn cannot be found; "
                             "use a template that renders the prompt as a prefix, or data.chat_template=none")
        turn = full[len(head):].rstrip()
        ids = tokenizer(turn, add_special_tokens=False)["input_ids"]
        if not self.end_of_turn and tokenizer.eos_token_id is not None:
            ids = [*ids, tokenizer.eos_token_id]
        return tokenizer(head, add_special_tokens=False)["input_ids"], ids

    # ------------------------------------------------------------------ generation
    def stop_ids(self, tokenizer: Any, model: Any = None) -> list[int]:
        """The token ids that end an answer: EOS, the template's end-of-turn tokens, and the generation config's."""
        ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids += [tokenizer.convert_tokens_to_ids(token) for token in self.end_of_turn]
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None) if self.chat else None
        ids += configured if isinstance(configured, list) else [configured] if isinstance(configured, int) else []
        return list(dict.fromkeys(i for i in ids if isinstance(i, int) and i >= 0))

    def eos_argument(self, tokenizer: Any, model: Any = None) -> Any:
        """``eos_token_id`` for ``generate``: the tokenizer's EOS for a plain format (as before), else the stop list."""
        return self.stop_ids(tokenizer, model) if self.chat else tokenizer.eos_token_id

    # ------------------------------------------------------------------ files
    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, folder: Path) -> None:
        (folder / PROMPT_FILE).write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, folder: str | Path) -> "PromptFormat":
        """The format saved with an adapter; plain for an adapter trained before formats were recorded."""
        path = Path(folder) / PROMPT_FILE
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(**{k: data[k] for k in ("chat_template", "system_prompt", "source", "end_of_turn") if k in data})
        except (ValueError, TypeError) as exc:
            raise ModelError(f"{path}: not a prompt format ({exc})") from None


def _tokenizer_template(tokenizer: Any) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    return template or None


def _special(tokenizer: Any) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(token, "special", False)}
    return ids


def resolve(chat_template: str, system_prompt: str | None, tokenizer: Any, root: Path = Path(".")) -> PromptFormat:
    """The format ``data.chat_template`` and ``data.system_prompt`` ask for, with this tokenizer.

    Raises:
        ConfigError: a template file that is missing or outside ``prompts/``; a system prompt without a chat template
            or one the template refuses; a template that does not render.
    """
    if chat_template == "none":
        template, source = None, "none"
    elif chat_template == "auto":
        template = _tokenizer_template(tokenizer)
        source = "tokenizer" if template else "none"
    else:
        path = Path(chat_template)
        inside = (root / path).resolve()
        if not inside.is_relative_to((root / TEMPLATES_DIR).resolve()):
            raise ConfigError(f"data.chat_template: {chat_template!r} is not in {TEMPLATES_DIR}/; keep chat templates "
                              f"there (train depends on {TEMPLATES_DIR}/, so editing one retrains), or use auto or none")
        if not inside.is_file():
            raise ConfigError(f"data.chat_template: {chat_template}: no such file (auto, none, or a Jinja file in "
                              f"{TEMPLATES_DIR}/)")
        template, source = inside.read_text(encoding="utf-8"), str(path)
    if template is None:
        if system_prompt:
            why = "data.chat_template=none" if chat_template == "none" else "the base's tokenizer has no chat template"
            raise ConfigError(f"data.system_prompt: a system turn needs a chat template ({why}); put the instruction "
                              "in data.template, or set data.chat_template to a Jinja file in prompts/")
        return PromptFormat()
    draft = PromptFormat(template, system_prompt or None, source)
    try:
        head = draft.render(tokenizer, draft.messages(_PROBE_QUESTION))
        full = draft.render(tokenizer, [*draft.messages(_PROBE_QUESTION),
                                        {"role": "assistant", "content": _PROBE_ANSWER}], generation=False)
    except Exception as exc:  # noqa: BLE001 - Jinja raises its own errors and the template's raise_exception
        key = "data.system_prompt" if system_prompt and "system" in str(exc).lower() else "data.chat_template"
        raise ConfigError(f"{key}: the chat template ({source}) does not render: {exc}") from None
    if not full.startswith(head):
        raise ConfigError(f"data.chat_template: the chat template ({source}) renders a conversation that does not start "
                          "with its own generation prompt, so the assistant turn cannot be found")
    if system_prompt and system_prompt not in head:
        raise ConfigError(f"data.system_prompt: the chat template ({source}) drops the system turn")
    closing = full[len(head):].rstrip()
    closing = closing[closing.rfind(_PROBE_ANSWER) + len(_PROBE_ANSWER):] if _PROBE_ANSWER in closing else ""
    special = _special(tokenizer)
    ends = [tokenizer.convert_ids_to_tokens(i) for i in tokenizer(closing, add_special_tokens=False)["input_ids"]
            if i in special]
    return PromptFormat(template, system_prompt or None, source, list(dict.fromkeys(ends)))
