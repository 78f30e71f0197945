"""The finetune form in the Prefect UI: the settings people change most first, every other setting grouped after.

The flow's parameters are built here from the params model, so the form and ``params.yaml`` cannot drift:

- quick fields (data path and format, base model, learning rate, steps, LoRA rank, eval size, model name,
  auto-promote) come first, as plain typed inputs;
- then one group per params section, without the quick fields, each described by its docstring;
- each group shows the keys people change from run to run (:data:`SHOWN`); the others keep the params file's
  values, reached through the ``params_file`` and ``overrides`` fields;
- line breaks in every text value are written ``\\n`` (the UI's text inputs are one line high, so a real line
  break hid everything after it); ``X | None`` fields are plain inputs (empty text = none), and an optional block
  (``eval.tone``) has an ``enabled`` switch;

Form values that differ from the params file become ``--set``-style overrides, so a run from the UI records
exactly what the user changed.
"""

from __future__ import annotations

import copy
import json
import typing
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, ConfigDict, Field, create_model

from loraops.core.config import (AugmentSection, DataSection, EvalSection, LoraSection, ModelSection, Params,
                                 RagSection, RegistrySection, SweepSection, TrainSection, load_params)

QUICK: dict[str, tuple[str, str]] = {
    "data_path": ("data.path", "Data file, relative to the project (CSV, JSONL, JSON or Parquet)."),
    "data_format": ("data.format", "wide: id, 질문_1.., category, 답변_1..; qa: one pair a row; alpaca; chat messages."),
    "base_model": ("model.base", "Hub id (e.g. Qwen/Qwen2.5-0.5B), a local directory, or tiny-ko (built offline)."),
    "learning_rate": ("train.learning_rate", "Peak learning rate of the LoRA weights, e.g. 0.0002 for a 1B base."),
    "max_steps": ("train.max_steps", "Optimiser steps; bounds the run."),
    "lora_rank": ("lora.r", "LoRA rank r (capacity of the adapter); alpha stays in the lora group."),
    "eval_questions": ("eval.max_samples", "Score at most this many test questions (a stratified sample); 0 = all."),
    "model_name": ("registry.model_name", "Registered model name in MLflow."),
    "auto_promote": ("registry.auto_promote", "Promote to production when the gate passes."),
}
"""Form field → dotted params key and its description."""

SECTIONS: dict[str, type[BaseModel]] = {"data": DataSection, "model": ModelSection, "lora": LoraSection, "train": TrainSection,
            "eval": EvalSection, "registry": RegistrySection, "rag": RagSection, "augment": AugmentSection}
SHOWN: dict[str, tuple[str, ...]] = {
    "data": ("question_column", "answer_column", "category_column", "attribute_columns", "template", "chat_template",
             "system_prompt"),
    "model": ("max_length", "revision", "trust_remote_code"),
    "lora": ("alpha", "dropout", "target_modules"),
    "train": ("batch_size", "gradient_accumulation", "warmup_ratio", "eval_steps", "precision", "quantization"),
    "eval": ("max_new_tokens", "batch_size", "stop_strings", "metrics", "tone"),
    "registry": ("gate.metric", "gate.min_gain", "gate.require_approval"),
    "rag": ("enabled", "docs_path", "k", "template"),
    "augment": ("enabled", "variants_per_question"),
}
"""The keys each form group shows, besides the quick fields: those people change from run to run. Every other key
(about seventy) keeps its params-file value; the form's ``params_file`` and ``overrides`` reach them. The form is
48 inputs instead of 114."""
LINE_BREAK_NOTE = " Write a line break as \\n."
ENABLED = "enabled"
"""The switch the form adds to an optional settings block (``eval.tone``): off = the block is null."""


def _escape(value: Any) -> Any:
    """Line breaks, tabs and backslashes of every text value written ``\\n``, ``\\t``, ``\\\\``: the UI's text
    inputs are one line high, so a real line break hid everything after it."""
    if isinstance(value, list):
        return [_escape(v) for v in value]
    if isinstance(value, dict):
        return {k: _escape(v) for k, v in value.items()}
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") if isinstance(value, str) else value


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def _unescape(value: Any) -> Any:
    """Undo :func:`_escape`: ``\\n`` → line break, ``\\t`` → tab, ``\\\\`` → backslash; anything else stays."""
    if isinstance(value, list):
        return [_unescape(v) for v in value]
    if isinstance(value, dict):
        return {k: _unescape(v) for k, v in value.items()}
    if not isinstance(value, str):
        return value
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value) and value[i + 1] in _ESCAPES:
            out.append(_ESCAPES[value[i + 1]])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def _optional(annotation: Any) -> tuple[bool, Any]:
    """Whether ``annotation`` is ``X | None``, and X."""
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return False, annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _without_null(schema: dict[str, Any]) -> None:
    """A ``X | None`` text or number field drawn as a plain input: Prefect's form would draw a "str | None" switch
    whose None side reads 'Property is type "None"'. An empty text means none; the model still accepts null."""
    options = [o for o in schema.pop("anyOf", []) if o.get("type") != "null"]
    if len(options) == 1:
        schema.update({k: v for k, v in options[0].items() if k not in schema})


def _form_model(title: str, section: type[BaseModel], keys: tuple[str, ...] | None, switch: bool = False
                ) -> type[BaseModel]:
    """``section`` as a form group: only ``keys`` (dotted keys reach into a nested block; None = every field), text
    described as escaped, ``X | None`` drawn plainly, an optional block (``ToneSection | None``) as the block itself
    under an ``enabled`` switch (``switch``: this model is such a block)."""
    wanted: dict[str, list[str]] = {}
    for key in keys if keys is not None else tuple(section.model_fields):
        head, _, rest = key.partition(".")
        wanted.setdefault(head, []).extend([rest] if rest else [])
    fields: dict[str, Any] = {}
    if switch:
        fields[ENABLED] = (bool, Field(False, description="On: use these settings. Off: none (null in the params "
                                                          "file)."))
    for name, inner in wanted.items():
        info = copy.copy(section.model_fields[name])
        optional, annotation = _optional(info.annotation)
        if _is_model(annotation):
            block = _form_model(name.replace("_", " ").title(), annotation, tuple(inner) or None, switch=optional)
            fields[name] = (block, Field(default_factory=block, description=info.description or annotation.__doc__))
            continue
        description = info.description or ""
        if (annotation is str or annotation == list[str]) and any(w in name for w in ("template", "prompt", "stop")):
            description += LINE_BREAK_NOTE
        if optional and annotation in (str, int, float):
            description += " Empty: none." if annotation is str else ""
            info.json_schema_extra = _without_null
        info.description = description
        fields[name] = (info.annotation, info)
    return create_model(f"{section.__name__}Form", __config__=ConfigDict(extra="forbid", title=title),
                        __doc__=section.__doc__, **fields)


def _group(name: str, section: type[BaseModel]) -> type[BaseModel]:
    """The section as a form group: its shown keys (:data:`SHOWN`, all for a section not listed) without the quick
    fields."""
    quick = {key.split(".", 1)[1] for key, _ in QUICK.values() if key.startswith(f"{name}.")}
    keys = SHOWN.get(name)
    keys = tuple(k for k in (keys if keys is not None else tuple(section.model_fields)) if k not in quick)
    return _form_model(name, section, keys)


GROUPS = {name: _group(name, section) for name, section in SECTIONS.items()}
SWEEP_GROUP = _group("sweep", SweepSection)
"""The sweep flow's form: trials, objective, pruning, parallel and the search space."""


def _form_values(model: type[BaseModel], values: dict[str, Any] | None) -> dict[str, Any]:
    """A group's (or block's) form values from the params tree: only its fields, text escaped, none as "" for text,
    an optional block with its switch."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if _is_model(info.annotation):
            block = cast(type[BaseModel], info.annotation)
            current = (values or {}).get(name)
            if ENABLED in block.model_fields:
                inner = current if current is not None else block().model_dump(mode="json", exclude={ENABLED})
                out[name] = {ENABLED: current is not None} | _form_values(block, inner)
            else:
                out[name] = _form_values(block, current)
            continue
        if name == ENABLED and values is not None and name not in values:
            continue
        value = (values or {}).get(name)
        optional, annotation = _optional(info.annotation)
        out[name] = "" if value is None and optional and annotation is str else _escape(value)
    return out


def defaults(params: Params) -> dict[str, Any]:
    """The form's values for ``params`` (a deployment's defaults): quick fields, then every group."""
    tree = params.model_dump(mode="json")
    out: dict[str, Any] = {}
    for field, (key, _) in QUICK.items():
        value = _dig(tree, key)
        out[field] = 0 if field == "eval_questions" and value is None else value
    for name, group in GROUPS.items():
        out[name] = _form_values(group, tree[name])
    return out


def sweep_defaults(params: Params) -> dict[str, Any]:
    """The sweep form's values for ``params``: the sweep section (trials, objective, pruning, parallel, space)."""
    sweep = params.sweep.model_dump(mode="json")
    sweep["space"] = {key: {k: v for k, v in space.items() if v is not None and v is not False}  # only what is set
                      for key, space in sweep["space"].items()}
    return {"sweep": sweep}


def _dig(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        tree = tree[part]
    return tree


def _wanted(model: type[BaseModel], values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Dotted params keys → values from a group's form values: text unescaped, "" → none where none is allowed, an
    optional block switched off → null, switched on → the block as one value."""
    out: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if name not in values:
            continue
        value = values[name]
        if _is_model(info.annotation):
            block = cast(type[BaseModel], info.annotation)
            inner = value.model_dump(mode="json") if isinstance(value, BaseModel) else dict(value)
            if ENABLED in block.model_fields:
                on = inner.pop(ENABLED, False)
                out[f"{prefix}{name}"] = _unescape(inner) if on else None
            else:
                out.update(_wanted(block, inner, f"{prefix}{name}."))
            continue
        optional, annotation = _optional(info.annotation)
        value = _unescape(value)
        out[f"{prefix}{name}"] = None if optional and annotation is str and value == "" else value
    return out


def overrides(current: Params, quick: dict[str, Any], groups: dict[str, Any]) -> list[str]:
    """``dotted.key=value`` for every form value that differs from ``current`` (the params file of the run)."""
    wanted: dict[str, Any] = {}
    for name, group in groups.items():
        values = group.model_dump(mode="json") if hasattr(group, "model_dump") else dict(group)
        wanted.update(_wanted(GROUPS[name], values, f"{name}."))
    for field, value in quick.items():
        key = QUICK[field][0]
        wanted[key] = None if field == "eval_questions" and value == 0 else value
    tree = current.model_dump(mode="json")
    return [f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in wanted.items() if _dig(tree, key) != value]


def quick_field(field: str, default: Any) -> Any:
    """The pydantic Field of a quick form input (description, decimal step, bounds as in the params model)."""
    key, description = QUICK[field]
    section, name = key.split(".", 1)
    info = SECTIONS[section].model_fields[name]
    bounds = {k: getattr(m, k) for m in info.metadata for k in ("gt", "ge", "lt", "le") if getattr(m, k, None) is not None}
    if field == "eval_questions":
        bounds = {"ge": 0}
    return Field(default, description=description, **bounds)


__all__ = ["QUICK", "GROUPS", "defaults", "overrides", "quick_field"]


def deployment_name(model: str, flow: str) -> str:
    """A deployment's name: the flow, then the registered model of its project (``finetune-interior-qa-lora``), so the
    five deployments of a project read apart in the Prefect UI (whose list cuts long names at the end) and several
    projects can serve on one server."""
    return f"{flow}-{model}"


def run_name(model: str, created_as: str | None) -> str:
    """``<model> · <the name the run was created with>`` (a fresh slug when it had none); unchanged when it already
    starts with the model (a retried run keeps its name)."""
    from prefect.utilities.names import generate_slug

    name = (created_as or "").strip() or generate_slug(2)
    return name if name.startswith(f"{model} · ") else f"{model} · {name}"


def model_name_of(parameters: dict[str, Any], repo: Path) -> str:
    """The registered model a finetune run with these flow parameters trains (for its run name); ``finetune`` when
    the params file cannot be read (the run itself then fails with that message)."""
    if parameters.get("use_form", True) and parameters.get("model_name"):
        return str(parameters["model_name"])
    try:
        params = load_params(repo / parameters.get("params_file", "params.yaml"), list(parameters.get("overrides") or []))
    except Exception:  # noqa: BLE001 - any unreadable params file: the name falls back, the run reports the error
        return "finetune"
    return params.registry.model_name

