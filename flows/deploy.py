"""Serve the five flows as Prefect deployments against PREFECT_API_URL, each named after the flow and the project's registered
model (``finetune/finetune-interior-qa-lora``)."""

from __future__ import annotations

import asyncio
import os
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

from prefect.events import DeploymentEventTrigger
from prefect.events.schemas.automations import Posture
from prefect.runner import Runner

from loraops.core import concurrency, events
from loraops.core.config import Params, load_params
from loraops.core.errors import ConfigError
from loraops.flows.finetune import finetune
from loraops.flows.promote import promote, rollback
from loraops.flows.reproduce import reproduce
from loraops.flows.sweep import sweep_flow
from loraops.orchestration import form
from loraops.orchestration.publish import PUBLISHED


ENTRYPOINTS = {"finetune": "flows/finetune.py:finetune", "promote": "flows/promote.py:promote",
               "rollback": "flows/promote.py:rollback", "reproduce": "flows/reproduce.py:reproduce",
               "sweep": "flows/sweep.py:sweep_flow"}
"""Where a worker finds each flow in its clone of the project (``loraops deploy --pool``)."""


def specs(params_file: str = "params.yaml") -> list[tuple[Any, str, dict[str, Any]]]:
    """Each deployment: its flow, the flow's key in :data:`ENTRYPOINTS`, and the deployment's settings; the finetune
    form defaults to the sections of the current params file."""
    params = load_params(params_file)
    defaults = form.defaults(params) | {"params_file": params_file}
    model = params.registry.model_name
    tags = ["loraops", model]

    def named(flow: str) -> str:
        return form.deployment_name(model, flow)

    return [
        (finetune, "finetune", dict(name=named("finetune"), parameters=defaults, tags=tags, triggers=data_triggers(params),
                                    cron=retrain_schedule(params, params_file),
                                    description=f"{model}: prepare → train → evaluate → register → gate" + (
                                        " · retrains when data is published" if params.retrain.on_data else ""))),
        (promote, "promote", dict(name=named("promote"), tags=tags, parameters={"params_file": params_file},
                                  description=f"{model}: move production to a version through the gate (and a reviewer)")),
        (rollback, "rollback", dict(name=named("rollback"), tags=tags, parameters={"params_file": params_file},
                                    description=f"{model}: production back to the version before")),
        (reproduce, "reproduce", dict(name=named("reproduce"), tags=tags,
                                      description=f"{model}: rebuild a run from its lineage card and compare")),
        (sweep_flow, "sweep", dict(name=named("sweep"), tags=tags, description=f"{model}: Optuna trials → the best → gate",
                                   parameters=form.sweep_defaults(params) | {"params_file": params_file})),
    ]


def deployments(params_file: str = "params.yaml") -> list:
    """The deployments served by one process (``loraops deploy``)."""
    return [flow.to_deployment(**settings) for flow, _, settings in specs(params_file)]


def deploy_to_pool(pool: str, params_file: str = "params.yaml", source: str | None = None,
                   root: Path = Path(".")) -> list[str]:
    """Register the deployments on the process work pool ``pool``: each run is picked up by a worker
    (``prefect worker start --pool POOL`` on a GPU host), which clones the project (``source``, default the git remote
    ``origin``) at the branch's newest commit and runs the flow there; its data comes from the DVC remote. Returns the
    deployments' names."""
    from prefect.runner.storage import GitRepository

    from loraops.orchestration.pool import ensure_pool, project_source

    url, branch = project_source(root)
    url = source or url
    ensure_pool(pool)
    names = []
    for flow, key, settings in specs(params_file):
        remote = flow.from_source(source=GitRepository(url=url, branch=branch), entrypoint=ENTRYPOINTS[key])
        remote.deploy(work_pool_name=pool, build=False, push=False, print_next_steps=False, **settings)
        names.append(f"{flow.name}/{settings['name']}")
    return names


def retrain_schedule(params: Params, params_file: str) -> str | None:
    """``retrain.schedule``, checked as Prefect reads a cron line.

    Raises:
        ConfigError: not a cron line (the file and key named, instead of Prefect's traceback at deploy).
    """
    from prefect.client.schemas.schedules import CronSchedule
    from pydantic import ValidationError

    cron = params.retrain.schedule
    if cron is None:
        return None
    try:
        CronSchedule(cron=cron)
    except ValidationError:
        raise ConfigError(f"{params_file}: retrain.schedule {cron!r} is not a cron line (e.g. '0 2 * * *': 02:00 "
                          "UTC every day)") from None
    return cron


def data_triggers(params: Params) -> list[DeploymentEventTrigger]:
    """With ``retrain.on_data``: the finetune deployment's trigger on ``loraops.data.updated`` for this project.

    Debounced as Prefect documents it: the trigger fires on the first event and ignores the others for
    ``debounce_seconds`` (``within``), and the run it creates starts that long after (``schedule_after``), so a burst of
    publishes starts one run, which trains the newest version published (``data_revision: published``) with the params
    file as found at that revision (``use_form: false``)."""
    retrain = params.retrain
    if not retrain.on_data:
        return []
    window = timedelta(seconds=retrain.debounce_seconds)
    related = ({"match_related": {"prefect.resource.role": "data", "prefect.resource.name": list(retrain.paths)}}
               if retrain.paths else {})
    return [DeploymentEventTrigger(
        name=f"retrain {params.registry.model_name} on new data",
        description="A published data version (`loraops data publish`, the git hook) starts a run on it",
        expect={events.DATA_UPDATED}, match=events.project_resource(params.registry.model_name),
        posture=Posture.Reactive, threshold=1, within=window, schedule_after=window,
        parameters={"data_revision": PUBLISHED, "use_form": False, "params_file": retrain.params_file}, **related)]


class BoundedShutdownRunner(Runner):
    """Prefect's runner, whose shutdown on SIGTERM cannot hang.

    Prefect's own handler pauses the deployments and cancels runs through the API before it exits; when the Prefect
    server is already gone, that waits on it forever and a second SIGTERM is ignored. This one exits anyway after
    :attr:`shutdown_seconds`.
    """

    shutdown_seconds = 15.0

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        timer = threading.Timer(self.shutdown_seconds, os._exit, args=(143,))
        timer.daemon = True
        timer.start()
        super().handle_sigterm(*args, **kwargs)


def serve_all(params_file: str = "params.yaml", limit: int | None = None) -> None:
    """Create the `gpu` concurrency limit if needed, then serve the deployments until interrupted (as Prefect's
    ``serve`` does, with a shutdown that ends even when the server is gone)."""
    concurrency.ensure_gpu_limit()
    runner = BoundedShutdownRunner(pause_on_shutdown=True, limit=limit)
    served = deployments(params_file)
    for deployment in served:
        runner.add_deployment(deployment)
    names = ", ".join(f"{d.flow_name}/{d.name}" for d in served)
    print(f"serving the deployments {names}; start runs from the Prefect UI "
          f"({os.environ.get('PREFECT_UI_URL') or os.environ.get('PREFECT_API_URL', '').removesuffix('/api')}/deployments) "
          f"or with `prefect deployment run {served[0].flow_name}/{served[0].name}`", flush=True)
    try:
        asyncio.run(runner.start())
    except KeyboardInterrupt:
        pass
