"""What a flow run's outcome is called, and which outcomes are no success.

The finetune and sweep flows name their last state after :func:`loraops.judge.report.outcome`; the promote flow after
:func:`promotion_outcome`. An outcome in :data:`NOT_SUCCESS` ends the run in a Failed-type state, so Prefect draws it
red and counts it among failed runs; the others end Completed.
"""

from __future__ import annotations

from loraops.core.results import Promotion

NOT_SUCCESS = ("Refused", "Worse than base", "Rejected", "Timed out")
"""Outcomes that end a Prefect flow run in a Failed-type state (red, counted among failed runs); every other outcome
(Promoted, Approved, Registered, Unchanged) ends Completed."""


def promotion_outcome(result: Promotion) -> str:
    """The promote flow's outcome: Promoted, Approved (by a reviewer), Unchanged (already production), Refused (by
    the gate), Rejected (by a reviewer) or Timed out (no reviewer answered)."""
    approval = result.approval
    if result.promoted:
        if result.unchanged and approval is None:
            return "Unchanged"
        return "Approved" if approval is not None and approval.approved else "Promoted"
    if approval is not None:
        return "Timed out" if approval.reviewer == "(nobody)" else "Rejected"
    return "Refused"
