"""The Prefect events loraops emits, so teams can automate on them (README "Automate on loraops events").

- ``loraops.data.updated`` (`loraops data publish`): a committed data version; resource ``loraops.project.<model>``,
  payload: path, git revision, DVC content hash.
- ``loraops.model.promoted | refused | rejected | rolled-back``: every audited move or refusal of ``production``;
  resource ``loraops.model.<name>``, related the version judged, payload: from/to versions, who, verdict.

Events go to the Prefect server named by PREFECT_API_URL (a server you run: `make ui-prefect`, team mode). Without
one nothing is sent, nor to the temporary server of a local `loraops run` (no automation runs there, and it stops
with the run).
"""

from __future__ import annotations

import logging
import os
from typing import Any

DATA_UPDATED = "loraops.data.updated"
MODEL_EVENTS = {"promote": "loraops.model.promoted", "refuse": "loraops.model.refused",
                "reject": "loraops.model.rejected", "rollback": "loraops.model.rolled-back"}
"""Audit action → event name."""

log = logging.getLogger(__name__)


def project_resource(model: str) -> dict[str, str]:
    return {"prefect.resource.id": f"loraops.project.{model}", "prefect.resource.name": model}


def model_resource(model: str) -> dict[str, str]:
    return {"prefect.resource.id": f"loraops.model.{model}", "prefect.resource.name": model}


def server_configured() -> bool:
    """A Prefect server of the user's (not the temporary one a local run serves for itself)."""
    from loraops.core.concurrency import local_mode

    return bool(os.environ.get("PREFECT_API_URL")) and not local_mode()


def emit(event: str, resource: dict[str, str], payload: dict[str, Any],
         related: list[dict[str, str]] | None = None) -> str:
    """Send one event to the Prefect server now (not through Prefect's background worker, so a short command's event
    is sent before it exits); return its id.

    Raises:
        OSError, and Prefect's client errors: the server could not be reached.
    """
    from prefect.events import Event
    from prefect.events.clients import get_events_client
    from prefect.utilities.asyncutils import run_coro_as_sync

    message = Event(event=event, resource=resource, payload=payload, related=related or [])

    async def send() -> None:
        async with get_events_client() as client:
            await client.emit(message)

    run_coro_as_sync(send())
    return str(message.id)


def emit_quietly(event: str, resource: dict[str, str], payload: dict[str, Any],
                 related: list[dict[str, str]] | None = None) -> str | None:
    """:func:`emit` when a Prefect server is configured; a failure to send is logged, never raised (the registry
    move it reports has happened and is audited in MLflow either way)."""
    if not server_configured():
        return None
    try:
        return emit(event, resource, payload, related)
    except Exception as exc:  # noqa: BLE001 - an unreachable event feed must not undo or fail a promotion
        log.warning("could not send the Prefect event %s: %s", event, exc)
        return None
