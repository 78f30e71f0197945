"""What a flow run's outcome is called, and which outcomes are no success.

The finetune and sweep flows name their last state after :func:`loraops.judge.report.outcome`; the promote flow after
:func:`promotion_outcome`. An outcome in :data:`NOT_SUCCESS` ends the run in a Failed-type state, so Prefect draws it
red and counts it among failed runs; the others end Completed.
"""

from __future__ import annotations

from typing import Any

NOT_SUCCESS = ("Refused", "Worse than base", "Rejected", "Timed out")
"""Outcomes that end a Prefect flow run in a Failed-type state (red, counted among failed runs); every other outcome
(Promoted, Approved, Registered, Unchanged) ends Completed."""


def promotion_outcome(result: dict[str, Any]) -> str:
    """The promote flow's outcome: Promoted, Approved (by a reviewer), Unchanged (already production), Refused (by
    the gate), Rejected (by a reviewer) or Timed out (no reviewer answered)."""
    approval = result.get("approval") or {}
    if result.get("promoted"):
        if result.get("previous") == result.get("version") and not approval:
            return "Unchanged"
        return "Approved" if approval.get("approved") else "Promoted"
    if approval:
        return "Timed out" if approval.get("reviewer") == "(nobody)" else "Rejected"
    return "Refused"
