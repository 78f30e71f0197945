"""Work pools for `loraops deploy --pool`: where workers clone the project from, and the process pool itself."""

from __future__ import annotations

import subprocess
from pathlib import Path

from loraops.core.errors import ConfigError


def project_source(root: Path) -> tuple[str, str]:
    """Where workers clone the project from: the git remote ``origin`` (else this repository's folder, which only
    this machine can reach), and the current branch.

    Raises:
        ConfigError: not a git repository, or a detached HEAD (workers follow a branch).
    """
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    if not branch or branch == "HEAD":
        raise ConfigError(f"{root}: workers clone a branch of the project's git repository; check one out (not a "
                          "detached HEAD)")
    return git("remote", "get-url", "origin") or str(root.resolve()), branch


def ensure_pool(pool: str) -> bool:
    """Create the process work pool ``pool`` if missing; True when created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            found = client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            except ObjectAlreadyExists:
                return False
            return True
        if found.type != "process":
            raise ConfigError(f"--pool {pool}: a work pool of type {found.type!r} exists under that name; loraops "
                              "deploys to a process pool (prefect worker start --pool NAME on each GPU host)")
        return False
