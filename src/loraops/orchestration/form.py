"""The finetune form in the Prefect UI: the settings people change most first, every other setting grouped after.

The flow's parameters are built here from the params model, so the form and ``params.yaml`` cannot drift:

- quick fields (data path and format, base model, learning rate, steps, LoRA rank, eval size, model name,
  auto-promote) come first, as plain typed inputs;
- then one group per params section, without the quick fields, each described by its docstring;
- line breaks in the prompt template and the stop strings are written ``\\n`` (the UI's text inputs are one
  line high, so a real line break hid everything after it);

Form values that differ from the params file become ``--set``-style overrides, so a run from the UI records
exactly what the user changed.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from loraops.core.config import (AugmentSection, DataSection, EvalSection, LoraSection, ModelSection, Params,
                                 RagSection, RegistrySection, SweepSection, TrainSection, flatten, load_params)

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
ESCAPED = ("data.template", "data.system_prompt", "eval.stop_strings", "augment.teacher.prompt", "augment.teacher.document_prompt")
"""Keys whose line breaks the form shows as ``\\n``."""


def _escape(value: Any) -> Any:
    if isinstance(value, list):
        return [_escape(v) for v in value]
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t") if isinstance(value, str) else value


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def _unescape(value: Any) -> Any:
    """Undo :func:`_escape`: ``\\n`` → line break, ``\\t`` → tab, ``\\\\`` → backslash; anything else stays."""
    if isinstance(value, list):
        return [_unescape(v) for v in value]
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


def _group(name: str, section: type[BaseModel]) -> type[BaseModel]:
    """The section as a form group: without the quick fields, escaped multi-line fields described as such."""
    quick = {key.split(".", 1)[1] for key, _ in QUICK.values() if key.startswith(f"{name}.")}
    fields: dict[str, Any] = {}
    for field_name, info in section.model_fields.items():
        if field_name in quick:
            continue
        info = copy.copy(info)
        if f"{name}.{field_name}" in ESCAPED:
            info.description = (info.description or "") + " Write a line break as \\n."
        fields[field_name] = (info.annotation, info)
    return create_model(f"{section.__name__}Form", __config__=ConfigDict(extra="forbid"), __doc__=section.__doc__, **fields)


GROUPS = {name: _group(name, section) for name, section in SECTIONS.items()}
SWEEP_GROUP = _group("sweep", SweepSection)
"""The sweep flow's form: trials, objective, pruning, parallel and the search space."""


def defaults(params: Params) -> dict[str, Any]:
    """The form's values for ``params`` (a deployment's defaults): quick fields, then every group."""
    tree = params.model_dump(mode="json")
    out: dict[str, Any] = {}
    for field, (key, _) in QUICK.items():
        value = _dig(tree, key)
        out[field] = 0 if field == "eval_questions" and value is None else value
    for name, group in GROUPS.items():
        out[name] = {f: (_escape(tree[name][f]) if f"{name}.{f}" in ESCAPED else tree[name][f]) for f in group.model_fields}
        for key in ESCAPED:  # nested keys (augment.teacher.prompt)
            section, *parents, leaf = key.split(".")
            if section == name and parents:
                node = out[name]
                for part in parents:
                    node = node[part]
                node[leaf] = _escape(node[leaf])
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


def overrides(current: Params, quick: dict[str, Any], groups: dict[str, Any]) -> list[str]:
    """``dotted.key=value`` for every form value that differs from ``current`` (the params file of the run)."""
    wanted: dict[str, Any] = {}
    for name, group in groups.items():
        values = group.model_dump(mode="json") if hasattr(group, "model_dump") else dict(group)
        for key, value in flatten(values, f"{name}.").items():
            wanted[key] = _unescape(value) if any(key.startswith(e) for e in ESCAPED) else value
    for field, value in quick.items():
        key = QUICK[field][0]
        wanted[key] = None if field == "eval_questions" and value == 0 else value
    before = flatten(current.model_dump(mode="json"))
    return [f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in wanted.items() if before.get(key) != value]


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

