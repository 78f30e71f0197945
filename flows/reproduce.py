"""`reproduce` flow: rebuild a run from its lineage card and compare (wrapper over loraops.reproduce)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from loraops.core.config import load_params
from loraops.registry import reproduce as reproducer


@flow(name="reproduce", log_prints=True)
def reproduce(
    ref: str = Field(..., description="What to rebuild: an MLflow run id, models:/<name>/<version> or models:/<name>@<alias>."),
    params_file: str = Field("params.yaml", description="Params file (registry.reproduce_tolerance for GPU runs)."),
) -> dict[str, Any]:
    """Retrain and re-evaluate ``ref`` (run id, models:/name/version or models:/name@alias) in an isolated worktree."""
    report = reproducer.reproduce(ref, load_params(params_file))
    text = reproducer.describe(report)
    create_markdown_artifact("```\n" + text + "\n```", key="reproduce-report")
    print(text)
    if not report["reproduced"]:
        raise RuntimeError(f"{ref} was not reproduced: {text.splitlines()[0]}")
    return report
