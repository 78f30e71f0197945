"""Review before use: with ``registry.gate.require_approval`` production moves only when a reviewer approves.

The `promote` flow judges the candidate; when the gate passes it shows the verdict and sample answers per slice
(`review.approval_request`) and pauses with a typed form (`Approval`) in the Prefect UI's Resume dialog. An
approval promotes (audited with the reviewer's name and comment); a rejection, or no answer within
``registry.gate.approval_timeout_hours``, moves nothing and is audited as ``reject``.

`loraops promote` starts that flow on the Prefect server's promote deployment of the project
(``promote/promote-<registry.model_name>``, served by `loraops deploy`) and says where to answer.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal, cast

from prefect.input import RunInput
from pydantic import Field

from loraops.core.config import Params
from loraops.core.errors import ConfigError
from loraops.core.results import Promotion, Signoff
from loraops.registry import versions as registry
from loraops.review import rubric as review



class Approval(RunInput):
    """The reviewer's answer to a promotion the gate passed."""

    decision: Literal["approve", "reject"] = Field(description="approve: production moves to this version; "
                                                               "reject: nothing moves.")
    reviewer: str = Field(min_length=1, description="Your name, recorded in the audit trail.")
    comment: str = Field("", description="Why; recorded with the decision.")


def with_approval(name: str, version: str | None, params: Params, log: Any = print) -> Promotion:
    """Judge; when the gate passes, pause this flow run for a reviewer and promote only on an approval."""
    from prefect.artifacts import create_markdown_artifact
    from prefect.exceptions import FlowPauseTimeout
    from prefect.flow_runs import pause_flow_run

    verdict = registry.promote(name, version, params, dry_run=True)
    if not verdict.passed:  # refused by the gate, or already production: recorded as without approval
        return registry.promote(name, verdict.version, params)
    hours = params.registry.gate.approval_timeout_hours
    request = review.approval_request(verdict, registry.review_sample(name, verdict.version, params), hours)
    create_markdown_artifact(request, key="approval-request", description=f"{name} v{verdict.version}")
    log(f"the gate passed {name} v{verdict.version}: waiting for a reviewer's approval (Resume, in the Prefect UI)")
    try:
        answer = pause_flow_run(wait_for_input=Approval.with_initial_data(description=request),
                                timeout=int(hours * 3600), poll_interval=5)
    except FlowPauseTimeout:
        return registry.reject(name, verdict.version, "(nobody)", f"no approval within {hours:g} h", verdict)
    if answer.decision == "approve":
        return registry.promote(name, verdict.version, params,
                                approval=Signoff(answer.reviewer, answer.comment, approved=True))
    return registry.reject(name, verdict.version, answer.reviewer, answer.comment, verdict)


def request_approval(name: str, version: str | None, params_file: str, overrides: list[str] | None = None,
                     wait_s: float = 300) -> dict[str, Any]:
    """Start the promote deployment and wait until it pauses for approval (or ends); say where to answer.

    Raises:
        ConfigError: no Prefect server (PREFECT_API_URL), or no promote deployment served on it.
    """
    from prefect.client.schemas.objects import FlowRun
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    from loraops.core.config import load_params
    from loraops.orchestration.form import deployment_name

    deployment = f"promote/{deployment_name(load_params(params_file, list(overrides or [])).registry.model_name, 'promote')}"
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        raise ConfigError("registry.gate.require_approval: a reviewer approves in the Prefect UI, so promotion runs on a "
                          "Prefect server: start one and the deployments (`make ui`, `loraops deploy`), set "
                          "PREFECT_API_URL, and run `loraops promote` again (or start the promote deployment in the UI)")
    try:
        started = run_deployment(deployment, parameters={"name": name, "version": version or "", "params_file": params_file,
                                                          "overrides": list(overrides or [])},
                                 timeout=0)
        run = cast(FlowRun, started)  # called from sync code, Prefect's sync_compatible returns the FlowRun itself
    except ObjectNotFound:
        raise ConfigError(f"no deployment {deployment} on {api}: start `loraops deploy` in the project") from None
    ui = os.environ.get("PREFECT_UI_URL") or api.removesuffix("/").removesuffix("/api")
    link = f"{ui}/runs/flow-run/{run.id}"
    deadline = time.time() + wait_s
    state: Any = run.state  # a State (None only before the server has set one; the loop reads it again)
    while time.time() < deadline:
        state = _state(run.id)
        if state.type.value == "PAUSED" or state.is_final():
            break
        time.sleep(2)
    if state.type.value == "PAUSED":
        return {"state": "PAUSED", "flow_run": str(run.id), "url": link,
                "message": f"{name}: the gate passed; waiting for a reviewer's approval in the Prefect UI: {link} "
                           "(Resume → approve or reject)"}
    client = registry.mlflow_client()
    target = registry.resolve(client, name, version=version, alias=None if version else "candidate").version
    production = registry.alias_version(client, name, "production")
    promoted = production == str(target)
    return {"state": state.type.value, "flow_run": str(run.id), "url": link, "promoted": promoted,
            "message": f"the promote run ended {state.name} ({link}): production is "
                       f"{'v' + production if production else 'not set'}; v{target} {'promoted' if promoted else 'not promoted'}"}


def _state(flow_run_id: Any) -> Any:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(flow_run_id).state
