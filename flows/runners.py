"""The task runner a flow's tasks run on, and where its workers' GPUs are.

``orchestration.task_runner`` names one: threads (one process), a Dask cluster (local, or one
process per visible GPU, each pinned to its device) or a Ray cluster. Flows submit shard tasks
inside :func:`shard_resources`, so that on Ray each reserves its GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from components.config import OrchestrationConfig

__all__ = ["visible_gpus", "pinned_gpu_cluster", "make_task_runner", "shard_resources"]


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA device ids: CUDA_VISIBLE_DEVICES when it is set (its
    entries, which may be indices or UUIDs), else torch's device count; [] on a machine without GPUs."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() and d.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


_LOCAL_HTTP = "127.0.0.1:0"  # the Dask scheduler's HTTP endpoint: a free port on 127.0.0.1


def pinned_gpu_cluster(gpus: list[str], *, threads_per_worker: int = 1) -> Any:
    """A local Dask cluster with one worker process per GPU, each seeing only its own device.

    Every worker is a Nanny started with CUDA_VISIBLE_DEVICES set to one entry of ``gpus`` (what
    dask-cuda's LocalCUDACluster does), so ``cuda`` inside it is that GPU, and the per-process model
    caches below load each model once per GPU. Scheduler and workers listen on 127.0.0.1 only and
    no dashboard is started.
    """
    from distributed import Nanny, Scheduler, SpecCluster

    if not gpus:
        raise ValueError("pinned_gpu_cluster needs at least one GPU id")
    # The scheduler always serves HTTP (health, metrics): on a free local port, not 0.0.0.0:8787.
    scheduler = {"cls": Scheduler,
                 "options": {"host": "127.0.0.1", "dashboard": False, "dashboard_address": _LOCAL_HTTP}}
    workers = {
        f"gpu-{gpu}": {
            "cls": Nanny,
            "options": {"nthreads": threads_per_worker, "host": "127.0.0.1",
                        "env": {"CUDA_VISIBLE_DEVICES": gpu, "OMP_NUM_THREADS": str(threads_per_worker)}},
        }
        for gpu in gpus
    }
    return SpecCluster(workers=workers, scheduler=scheduler, name="fmbseg-gpus")


def make_task_runner(orch: OrchestrationConfig) -> Any:
    """The Prefect task runner named by ``orchestration.task_runner``.

    threads: a ThreadPoolTaskRunner (one process: models load once and are shared by threads).
    dask: prefect-dask on a LocalCluster of ``dask_workers`` processes, or ``dask_address``;
      ``dask_workers: auto`` starts one worker per visible GPU, each pinned to its device
      (:func:`pinned_gpu_cluster`), or a single worker where no GPU is visible.
    ray: prefect-ray on the cluster at ``ray_address`` (install the ``ray`` extra); shard tasks
      reserve ``gpus_per_task`` GPUs each (:func:`shard_resources`), so Ray places one per GPU.
    """
    if orch.task_runner == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=orch.max_workers)
    if orch.task_runner == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as err:
            raise RuntimeError(
                "orchestration.task_runner 'dask' needs prefect-dask: pip install -e '.[dask]'"
            ) from err

        if orch.dask_address:
            return DaskTaskRunner(address=orch.dask_address)
        if orch.dask_workers == "auto" and visible_gpus():
            return DaskTaskRunner(cluster_class=pinned_gpu_cluster, cluster_kwargs={"gpus": visible_gpus()})
        workers = 1 if orch.dask_workers == "auto" else orch.dask_workers
        # dashboard_address=None still binds 8787 (LocalCluster's HTTP server); see pinned_gpu_cluster.
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                            "host": "127.0.0.1", "dashboard_address": _LOCAL_HTTP,
                            "scheduler_kwargs": {"dashboard": False}}
        )
    if orch.task_runner == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError as err:
            raise RuntimeError(
                "orchestration.task_runner 'ray' needs prefect-ray: pip install -e '.[ray]'"
            ) from err
        return RayTaskRunner(address=orch.ray_address)
    raise ValueError(f"unknown task runner {orch.task_runner!r}; supported: threads, dask, ray")


@contextmanager
def shard_resources(orch: OrchestrationConfig) -> Iterator[None]:
    """Wrap the submission of shard tasks: on Ray each task then reserves ``gpus_per_task`` GPUs
    (prefect-ray's ``remote_options``), so with 1 Ray runs one shard per GPU at a time and pins it
    there; a no-op for the other runners and for ``gpus_per_task: 0``."""
    if orch.task_runner != "ray" or not orch.gpus_per_task:
        yield
        return
    from prefect_ray.context import remote_options

    with remote_options(num_gpus=orch.gpus_per_task):
        yield
