"""`promote` and `rollback` flows: thin wrappers over loraops.registry.

With ``registry.gate.require_approval`` the promote flow pauses after the gate passes, shows the verdict and sample
answers per slice with a typed form in the Prefect UI, and moves production only on an approval (audited with the
reviewer's name); a rejection, or no answer within ``registry.gate.approval_timeout_hours``, moves nothing.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.exceptions import FlowPauseTimeout
from prefect.flow_runs import pause_flow_run
from prefect.input import RunInput
from pydantic import Field

from loraops import registry, review
from loraops.config import Params, load_params


class Approval(RunInput):
    """The reviewer's answer to a promotion the gate passed."""

    decision: Literal["approve", "reject"] = Field(description="approve: production moves to this version; "
                                                               "reject: nothing moves.")
    reviewer: str = Field(min_length=1, description="Your name, recorded in the audit trail.")
    comment: str = Field("", description="Why; recorded with the decision.")


def with_approval(name: str, version: str | None, params: Params) -> dict[str, Any]:
    """Judge; when the gate passes, pause for a reviewer's approval and promote only on it."""
    verdict = registry.promote(name, version, params, dry_run=True)
    if not verdict.get("passed"):  # refused by the gate, or already production: recorded as without approval
        return registry.promote(name, verdict["version"], params)
    hours = params.registry.gate.approval_timeout_hours
    request = review.approval_request(verdict, registry.review_sample(name, verdict["version"], params), hours)
    create_markdown_artifact(request, key="approval-request", description=f"{name} v{verdict['version']}")
    get_run_logger().info("the gate passed %s v%s: waiting for a reviewer's approval in the Prefect UI (Resume)",
                          name, verdict["version"])
    try:
        answer = pause_flow_run(wait_for_input=Approval.with_initial_data(description=request),
                                timeout=int(hours * 3600), poll_interval=5)
    except FlowPauseTimeout:
        return registry.reject(name, verdict["version"], "(nobody)", f"no approval within {hours:g} h", verdict)
    if answer.decision == "approve":
        return registry.promote(name, verdict["version"], params,
                                approval={"reviewer": answer.reviewer, "comment": answer.comment, "approved": True})
    return registry.reject(name, verdict["version"], answer.reviewer, answer.comment, verdict)


@flow(name="promote", log_prints=True)
def promote(
    name: str = Field("", description="Registered model; empty = registry.model_name of the params file."),
    version: str = Field("", description="Version number to promote; empty = the version holding alias candidate."),
    force: bool = Field(False, description="Promote even if the gate refuses (needs a reason; audited)."),
    reason: str = Field("", description="Why, when forcing; recorded in the audit trail."),
    params_file: str = Field("params.yaml", description="Params file with the gate policy (registry.gate)."),
) -> dict[str, Any]:
    """Move alias production to a version (default: candidate) only if the gate passes (and, with
    registry.gate.require_approval, a reviewer approves here), or when forced with a reason."""
    params = load_params(params_file)
    name = name or params.registry.model_name
    if params.registry.gate.require_approval and not force:
        result = with_approval(name, version or None, params)
    else:
        result = registry.promote(name, version or None, params, force=force, reason=reason or None)
    text = registry.describe(result)
    create_markdown_artifact("```\n" + text + "\n```", key="promotion-decision")
    print(text)
    return result


@flow(name="rollback", log_prints=True)
def rollback(
    name: str = Field("", description="Registered model; empty = registry.model_name of the params file."),
    params_file: str = Field("params.yaml", description="Params file naming the registered model."),
) -> dict[str, Any]:
    """Point production back at the previous production version (audited)."""
    params = load_params(params_file)
    result = registry.rollback(name or params.registry.model_name, params)
    print(registry.describe(result))
    return result
