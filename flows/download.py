"""`fmbseg download <dataset>`: the `download@<dataset>` stage.

Fetches (or locates, or, with ``download.synthetic``, writes the synthetic twin of) every source a
dataset needs under ``paths.raw``, then converts it to the canonical layout at
``paths.datasets/<dataset>``. The converters are the same in both modes.
"""

from __future__ import annotations

from pathlib import Path

import typer

from components.config import load_params
from flows.deferred import flow, get_run_logger, task

__all__ = ["download_flow", "register", "LOCK_FILE_NAME"]

LOCK_FILE_NAME = "downloads.lock.json"  # sha256 pins of sources without a published checksum (git-tracked)


@task(retries=2, retry_delay_seconds=[30, 120])
def fetch_source(source: str, raw_dir: str, lock_file: str, url: str | None, root: str | None) -> str:
    """Download, verify and extract one source (resumable; retried on top of its own retries)."""
    from components.datasets.download import download_source

    return str(download_source(source, raw_dir=Path(raw_dir), lock_file=Path(lock_file), url_override=url,
                               local_root=Path(root) if root else None, progress=True))


@task
def write_twin(source: str, raw_dir: str, num_images: int, seed: int) -> str:
    """Write the synthetic twin of one source in its raw on-disk format."""
    from demoworld.synthetic import write_synthetic_source

    return str(write_synthetic_source(source, Path(raw_dir) / source, num_images=num_images, seed=seed))


@task
def convert(dataset: str, raw_dirs: dict[str, str], out_dir: str, expect_count: int | None) -> str:
    """Convert raw sources to the canonical layout (written atomically)."""
    from components.datasets.convert import convert_benchmark

    return str(convert_benchmark(dataset, raw_dirs={k: Path(v) for k, v in raw_dirs.items()},
                                 out_dir=Path(out_dir), expect_count=expect_count, progress=True))


@flow(name="download", flow_run_name="download-{dataset}")
def download_flow(dataset: str, params_path: str = "params.yaml") -> str:
    """Fetch and convert ``dataset``; returns its canonical root."""
    from components.datasets.registry import get_benchmark

    params = load_params(params_path)
    spec = get_benchmark(dataset)
    raw_dir = params.paths.raw
    if params.download.synthetic:
        expect = params.download.twin_images(dataset)
        raw_dirs = {s: write_twin(s, raw_dir, expect, params.download.seed) for s in spec.sources}
    else:
        overrides = params.datasets
        unknown = set(overrides) - {s for s in _all_sources()}
        if unknown:
            raise ValueError(f"datasets.{sorted(unknown)[0]}: overrides are keyed by source; known sources: "
                             f"{', '.join(sorted(_all_sources()))} ({dataset} uses {', '.join(spec.sources)})")
        lock_file = str(Path(params.paths.data) / LOCK_FILE_NAME)
        raw_dirs = {}
        for source in spec.sources:
            override = overrides.get(source)
            raw_dirs[source] = fetch_source(source, raw_dir, lock_file, override.url if override else None,
                                            override.root if override else None)
        expect = spec.expected_images
    out = convert(dataset, raw_dirs, str(Path(params.paths.datasets) / dataset), expect)
    get_run_logger().info("%s ready at %s", dataset, out)
    return out


def _all_sources() -> list[str]:
    from components.datasets.registry import SOURCES

    return list(SOURCES)


def register(app: typer.Typer) -> None:
    @app.command("download")
    def download_cmd(
        dataset: str = typer.Argument(..., help="coco_train, pv21, pv20, pc59, pc60, pc459, co80, coco_object, cs171, cityscapes, ade20k, ade847"),
        params: Path = typer.Option(Path("params.yaml"), "--params", help="settings file"),
    ) -> None:
        """Download (or locate) a dataset's sources, verify them and convert to the canonical layout."""
        download_flow(dataset, str(params))
