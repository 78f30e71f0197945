"""`promote` and `rollback` flows: thin wrappers over loraops.registry."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from loraops import registry
from loraops.config import load_params


@flow(name="promote", log_prints=True)
def promote(name: str | None = None, version: str | None = None, force: bool = False, reason: str | None = None,
            params_file: str = "params.yaml") -> dict[str, Any]:
    """Move alias production to a version (default: candidate) only if the gate passes, or when forced with a reason."""
    params = load_params(params_file)
    result = registry.promote(name or params.registry.model_name, version, params, force=force, reason=reason)
    text = registry.describe(result)
    create_markdown_artifact("```\n" + text + "\n```", key="promotion-decision")
    print(text)
    return result


@flow(name="rollback", log_prints=True)
def rollback(name: str | None = None, params_file: str = "params.yaml") -> dict[str, Any]:
    """Point production back at the previous production version (audited)."""
    params = load_params(params_file)
    result = registry.rollback(name or params.registry.model_name, params)
    print(registry.describe(result))
    return result
