"""Prefect global concurrency limits that loraops takes: ``gpu`` for training and generation, and one
``promote-<model>`` per registered model so alias moves are serialised across hosts in team mode.

Slots are leased: a holder that dies stops renewing its lease and the server frees the slot.
"""

from __future__ import annotations

from typing import Any


def ensure_limit(name: str, slots: int) -> int:
    """Create the global concurrency limit ``name`` with ``slots`` if it is missing; return its size."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name).limit
        except ObjectNotFound:
            try:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            except ObjectAlreadyExists:  # a concurrent run created it first
                return client.read_global_concurrency_limit_by_name(name).limit
            return slots


def slot(name: str, timeout_seconds: float | None = None, lease_duration: float = 600) -> Any:
    """Hold one leased slot of the limit ``name`` (which must exist)."""
    from prefect.concurrency.sync import concurrency

    return concurrency(name, occupy=1, timeout_seconds=timeout_seconds, lease_duration=lease_duration, strict=True)
