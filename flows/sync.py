"""The `sync` DVC stage: new images from ``nightly.source_dir`` into ``paths.incoming``, so that
the next `label` run (the nightly job's) labels only those."""

from __future__ import annotations

from pathlib import Path

import typer

from components.config import load_params
from components.datasets.sync import sync_new_images
from flows.deferred import flow, get_run_logger, task

__all__ = ["sync_flow", "register"]


@task(retries=3, retry_delay_seconds=[5, 30, 120])
def sync_images(source: str, dest: str) -> int:
    """Copy new images from ``source`` into ``dest`` (retried: network shares hiccup)."""
    copied = sync_new_images(Path(source), Path(dest))
    get_run_logger().info("synced %d new images from %s into %s", len(copied), source, dest)
    return len(copied)


@flow(name="sync", flow_run_name="sync")
def sync_flow(params_path: str = "params.yaml") -> int:
    """The `sync` DVC stage: new images from nightly.source_dir into paths.incoming."""
    params = load_params(params_path)
    dest = Path(params.paths.incoming)
    dest.mkdir(parents=True, exist_ok=True)
    if not params.nightly.source_dir:
        get_run_logger().info("nightly.source_dir is not set: nothing to sync into %s", dest)
        return 0
    if not Path(params.nightly.source_dir).is_dir():  # a setting to fix, not an I/O hiccup to retry
        raise FileNotFoundError(f"nightly.source_dir {params.nightly.source_dir} is not a folder")
    return sync_images(params.nightly.source_dir, str(dest))


def register(app: typer.Typer) -> None:
    @app.command("sync")
    def sync_cmd(params: Path = typer.Option(Path("params.yaml"), help="settings file")) -> None:
        """Copy new images from nightly.source_dir into paths.incoming (the `sync` stage)."""
        sync_flow(str(params))
