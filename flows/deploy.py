"""Serve the five flows as Prefect deployments named `loraops` against PREFECT_API_URL."""

from __future__ import annotations

from prefect import serve

from loraops import concurrency, form
from loraops.config import load_params
from loraops.flows.finetune import finetune
from loraops.flows.promote import promote, rollback
from loraops.flows.reproduce import reproduce
from loraops.flows.sweep import sweep_flow


def deployments(params_file: str = "params.yaml") -> list:
    """The deployments; the finetune form defaults to the sections of the current params file."""
    defaults = form.defaults(load_params(params_file)) | {"params_file": params_file}
    return [
        finetune.to_deployment(name="loraops", parameters=defaults, tags=["loraops"],
                               description="prepare → train → evaluate → register → gate"),
        promote.to_deployment(name="loraops", tags=["loraops"]),
        rollback.to_deployment(name="loraops", tags=["loraops"]),
        reproduce.to_deployment(name="loraops", tags=["loraops"]),
        sweep_flow.to_deployment(name="loraops", tags=["loraops"], description="Optuna trials → the best → gate",
                                 parameters=form.sweep_defaults(load_params(params_file)) | {"params_file": params_file}),
    ]


def serve_all(params_file: str = "params.yaml", limit: int | None = None) -> None:
    """Create the `gpu` concurrency limit if needed, then serve the deployments until interrupted."""
    concurrency.ensure_gpu_limit()
    serve(*deployments(params_file), limit=limit)
