"""`promote` and `rollback` flows: thin wrappers over loraops.registry.

With ``registry.gate.require_approval`` the promote flow pauses after the gate passes, shows the verdict and sample
answers per slice with a typed form in the Prefect UI, and moves production only on an approval (audited with the
reviewer's name); a rejection, or no answer within ``registry.gate.approval_timeout_hours``, moves nothing.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import Field

from loraops.core.config import load_params
from loraops.core.outcomes import promotion_outcome
from loraops.flows.finetune import REPO, final_state
from loraops.orchestration import form
from loraops.registry import versions as registry
from loraops.review.approval import with_approval


def _model_of_run() -> str:
    """Which registered model a promote or rollback run moves: its ``name``, else the params file's."""
    parameters = flow_run.parameters
    if parameters.get("name"):
        return str(parameters["name"])
    return form.model_name_of({"use_form": False, "params_file": parameters.get("params_file", "params.yaml"),
                               "overrides": parameters.get("overrides") or []}, REPO)


def _run_name() -> str:
    """``interior-qa-lora · promote · brave-otter``: the model it moves first, as the finetune runs are named."""
    model, name = _model_of_run(), str(flow_run.name or "")
    return form.run_name(model, name if name.startswith(f"{model} · ") else f"{flow_run.flow_name} · {name}")


@flow(name="promote", log_prints=True, flow_run_name=_run_name)
def promote(
    name: str = Field("", description="Registered model; empty = registry.model_name of the params file."),
    version: str = Field("", description="Version number to promote; empty = the version holding alias candidate."),
    force: bool = Field(False, description="Promote even if the gate refuses (needs a reason; audited)."),
    reason: str = Field("", description="Why, when forcing; recorded in the audit trail."),
    params_file: str = Field("params.yaml", description="Params file with the gate policy (registry.gate)."),
    overrides: list[str] = Field([], description="Extra dotted.key=value settings (as `loraops promote --set`)."),
) -> Any:
    """Move alias production to a version (default: candidate) only if the gate passes (and, with
    registry.gate.require_approval, a reviewer approves here), or when forced with a reason."""
    params = load_params(params_file, list(overrides or []))
    name = name or params.registry.model_name
    if params.registry.gate.require_approval and not force:
        result = with_approval(name, version or None, params)
    else:
        result = registry.promote(name, version or None, params, force=force, reason=reason or None)
    text = registry.describe(result)
    create_markdown_artifact("```\n" + text + "\n```", key="promotion-decision")
    print(text)
    return final_state(promotion_outcome(result), text, result.to_dict())  # Rejected, Refused, Timed out: not green


@flow(name="rollback", log_prints=True, flow_run_name=_run_name)
def rollback(
    name: str = Field("", description="Registered model; empty = registry.model_name of the params file."),
    params_file: str = Field("params.yaml", description="Params file naming the registered model."),
) -> dict[str, Any]:
    """Point production back at the previous production version (audited)."""
    params = load_params(params_file)
    result = registry.rollback(name or params.registry.model_name, params)
    print(registry.describe(result))
    return result.to_dict()
