"""Layer 4: running stages for a flow (worktrees, in-process DVC reproduce) and the Prefect form."""
