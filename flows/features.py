"""`fmbseg features`: the frozen DINOv2 feature cache as a Prefect flow (the DVC stage `features`).

The flow lists the distinct images of the training index and hashes them, plans shards against the
completion records already on disk (only new or changed images, or all of them after a change of
encoder or input size), maps ``features_shard`` over the pending shards on the configured task
runner, then merges the records into the index and the manifest. With ``features.cache: false`` it
writes only a manifest saying so, and training computes the features on the fly.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from flows.common import (
    PARAMS_FILE,
    cached_dino,
    project_path,
    stage_params,
    table_artifact,
)
from flows.deferred import NO_CACHE, flow, get_run_logger, task
from flows.runners import make_task_runner
from flows.shards import map_shards

if TYPE_CHECKING:
    from components.features.cache import CacheImage, ShardPlan

__all__ = ["list_cache_images", "features_shard", "features_flow", "run_features", "register"]


@task(name="hash-images", cache_policy=NO_CACHE)
def list_cache_images(train_index: str, num_workers: int) -> list[CacheImage]:
    """The distinct images of the training index, sorted by id, with their sha256 (from the
    project's hash cache where a file's size and mtime are unchanged)."""
    import pandas as pd  # here, not at the top: pandas takes 1 s to import

    from components.features.cache import unique_images
    from components.hashcache import HashCache

    with HashCache() as hashes:
        return unique_images(pd.read_parquet(train_index, columns=["image_id", "image_path"]), ".",
                             num_workers=num_workers, sha256=hashes.sha256)


@task(name="features-shard", cache_policy=NO_CACHE, task_run_name="features-shard-{shard.shard_id}")
def features_shard(context: dict[str, Any], shard: ShardPlan, tally: str | None = None) -> dict[str, Any]:
    """Encode one shard and write it with its completion record, ticking the flow's progress tally
    (the file ``tally``, when given) per image encoded; returns {"shard_id", "images", "seconds"}."""
    from components.features.cache import write_shard
    from components.features.encode import DinoEncoder
    from components.models.registry import get_spec, resolve_device
    from components.progress import counter

    device = resolve_device(context["device"])
    spec = get_spec(context["dino"])
    encoder = DinoEncoder(cached_dino(context["dino"], str(device), context["weights_dir"]), device=device,
                          dtype=context["dtype"])
    record = write_shard(
        context["root"], shard, encoder, settings=context["settings"], project_root=".",
        image_size=context["image_size"], mean=spec.mean, std=spec.std, batch_size=context["batch_size"],
        num_workers=context["num_workers"],
        on_images=counter(tally),
    )
    return {"shard_id": record.shard_id, "images": len(record.images), "seconds": record.seconds}


@flow(name="features", flow_run_name="features", log_prints=True)
def features_flow(params_path: str = PARAMS_FILE) -> dict[str, Any]:
    """Student-encoder patch features of every training image under ``${paths.features}``; returns the manifest."""
    from components.features.cache import finalize_cache, plan_cache, settings_hash, write_uncached_manifest

    start = time.perf_counter()
    log = get_run_logger()
    params = stage_params(params_path)
    root = project_path(params, "features")
    dino, feats = params.models.selected.dino, params.features
    if not feats.cache:
        manifest = write_uncached_manifest(root, dino=dino, image_size=feats.image_size, precision=params.models.dtype)
        print(f"features.cache is false: training computes {dino} features on the fly; wrote {root}/manifest.json")
        return manifest

    images = list_cache_images(str(project_path(params, "train_index")), feats.num_workers)
    settings = settings_hash(dino, feats.image_size, precision=params.models.dtype)
    plan = plan_cache(root, images, settings=settings, shard_size=feats.shard_size)
    todo = sum(len(s.images) for s in plan.todo)
    log.info("%d images: %d cached, %d to encode in %d shards (%s at %d px)",
             len(images), len(images) - todo, todo, len(plan.todo), dino, feats.image_size)
    context = {
        "root": root.as_posix(),
        "dino": dino,
        "device": params.models.device,
        "dtype": params.models.dtype,
        "weights_dir": params.models.weights_dir,
        "image_size": feats.image_size,
        "batch_size": feats.batch_size,
        "num_workers": feats.num_workers,
        "settings": settings,
    }
    reports = map_shards(features_shard, context, plan.todo, name=lambda shard: shard.shard_id,
                         size=lambda shard: len(shard.images), out=root, orchestration=params.orchestration,
                         desc="features", key="features-progress")
    manifest = finalize_cache(root, images, dino=dino, image_size=feats.image_size, precision=params.models.dtype)
    encode_seconds = sum(r["seconds"] for r in reports)
    rows = [
        {"quantity": "images", "value": len(images)},
        {"quantity": "images_encoded_this_run", "value": todo},
        {"quantity": "shards", "value": manifest["num_shards"]},
        {"quantity": "shards_this_run", "value": len(reports)},
        {"quantity": "images_per_second", "value": round(todo / encode_seconds, 2) if encode_seconds else 0.0},
        {"quantity": "wall_seconds", "value": round(time.perf_counter() - start, 2)},
    ]
    print("\n".join(f"{r['quantity']:>28}  {r['value']}" for r in rows))
    table_artifact(rows, key="features-summary", description="DINOv2 feature cache: counts and speed")
    return manifest


def run_features(params_path: str = PARAMS_FILE) -> dict[str, Any]:
    """Run :func:`features_flow` on the task runner params.yaml's ``orchestration`` names, holding
    the lock on its output (a second run fails at once; a killed run's temporary files go)."""
    from components.io import output_lock

    params = stage_params(params_path)
    with output_lock(project_path(params, "features"), stage="features"):
        return features_flow.with_options(task_runner=make_task_runner(params.orchestration))(params_path)


def register(app: typer.Typer) -> None:
    @app.command("features")
    def features_cmd(params: Path = typer.Option(Path(PARAMS_FILE), help="settings file")) -> None:
        """Stage 2 input: DINOv2 patch features of every training image, cached as fp16 shards (resumable)."""
        from components.io import OutputBusyError

        try:
            run_features(str(params))
        except OutputBusyError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
