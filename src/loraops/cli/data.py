"""`loraops data publish` and `loraops hooks install`: a committed data version announced as a Prefect event."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from loraops.cli import ParamsOpt, app, friendly, params_of

data_app = typer.Typer(no_args_is_help=True, help="Data versions: announce a committed one to Prefect.")
hooks_app = typer.Typer(no_args_is_help=True, help="Git hooks that publish committed data versions.")
app.add_typer(data_app, name="data")
app.add_typer(hooks_app, name="hooks")


@data_app.command("publish")
@friendly
def data_publish(paths: Optional[list[str]] = typer.Argument(None, help="DVC-tracked data paths (default: data.path, "
                                                                           "rag.docs_path, the approved corrections)."),
                 push: bool = typer.Option(False, "--push", help="`dvc push` them first (runs elsewhere pull them)."),
                 changed: Optional[str] = typer.Option(None, "--changed-in", metavar="REV",
                                                       help="The paths whose .dvc file commit REV changed (the hook: "
                                                            "HEAD); nothing to do when it changed none."),
                 as_json: bool = typer.Option(False, "--json", help="Print what was published as JSON."),
                 params: Path = ParamsOpt) -> None:
    """Emit `loraops.data.updated` (path, git revision, DVC hash) to the Prefect server in PREFECT_API_URL, after
    `dvc add` and a git commit."""
    from loraops.orchestration.publish import changed_in, publish

    chosen = list(paths or [])
    if changed is not None:
        chosen += changed_in(Path("."), changed)
        if not chosen:
            typer.echo(f"no DVC-tracked data changed in {changed}: nothing to publish")
            return
    done = publish(Path("."), params_of(params, None), chosen, push=push,
                   say=(lambda _: None) if as_json else typer.echo)
    if as_json:
        typer.echo(json.dumps(done, ensure_ascii=False, indent=2))


@hooks_app.command("install")
@friendly
def hooks_install(force: bool = typer.Option(False, "--force", help="Replace a post-commit hook that is not loraops'.")
                  ) -> None:
    """Install a git post-commit hook that publishes the data versions a commit changes."""
    from loraops.orchestration.publish import install_hook

    typer.echo(f"installed {install_hook(Path('.'), force=force)}: a commit that changes a .dvc file publishes it")
