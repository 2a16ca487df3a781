"""The labelling flow runs unchanged on a Dask LocalCluster of 2 worker processes, and its outputs
equal the threaded run's byte for byte (tasks move paths and small records, never tensors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from demoworld.synthetic import write_synthetic_unlabelled
from flows.label import run_label
from tests.flows.test_label import _outputs

pytestmark = pytest.mark.slow

PARAMS = {
    "paths": {"images": "imgs", "incoming": "incoming", "pseudo": "pseudo", "reports": "reports"},
    "models": {"profile": "demo", "device": "cpu", "dtype": "fp32"},
    "label": {
        "vocabulary": "voc21", "grid": 2, "sam_size": 64, "label_size": 48, "shard_size": 2,
        "crop_batch": 4, "num_workers": 1,
        "amg": {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                "min_area_frac": 0.0, "max_area_frac": 1.0},
    },
}


def _project(root: Path, runner: dict) -> Path:
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "orchestration": runner}))
    write_synthetic_unlabelled(root / "imgs", num_images=5, seed=3, size=(48, 64))
    return root


def test_label_flow_on_a_dask_cluster_equals_the_threaded_run(tmp_path, monkeypatch, prefect_harness):
    threaded = _project(tmp_path / "threads", {"task_runner": "threads", "max_workers": 2})
    monkeypatch.chdir(threaded)
    assert run_label("params.yaml")["images_labelled"] == 5

    dask = _project(tmp_path / "dask", {"task_runner": "dask", "dask_workers": 2})
    monkeypatch.chdir(dask)
    summary = run_label("params.yaml")
    assert summary["images_labelled"] == 5 and summary["shards_this_run"] == 3

    expected, got = _outputs(threaded), _outputs(dask)
    assert sorted(got) == sorted(expected)
    assert len([name for name in got if name.startswith("shards/") and ".detections." not in name]) == 3
    for name in expected:
        assert got[name] == expected[name], name


def _worker_identity(index: int) -> dict:
    """Where a shard task ran: its worker's pinned GPU, process id and the model its cache holds."""
    import os
    import time

    from flows.common import cached_dino

    time.sleep(0.3)  # long enough that the scheduler spreads the shards over both workers
    return {"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
            "model": id(cached_dino("mini-dino")), "index": index}


def test_dask_auto_starts_one_pinned_worker_per_visible_gpu(monkeypatch, prefect_harness):
    """`dask_workers: auto` with two visible GPUs: two worker processes, each seeing only its own
    device, the shards split across them, and each worker builds its model once."""
    from prefect import flow, task

    from components.config import OrchestrationConfig
    from flows.runners import make_task_runner

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    runner = make_task_runner(OrchestrationConfig(task_runner="dask", dask_workers="auto"))
    shard = task(_worker_identity)

    @flow(task_runner=runner)
    def shards() -> list[dict]:
        return [f.result() for f in shard.map(list(range(8)))]

    ran = shards()
    assert sorted(r["index"] for r in ran) == list(range(8))
    gpus_by_pid: dict[int, set] = {}
    models_by_pid: dict[int, set] = {}
    for r in ran:
        gpus_by_pid.setdefault(r["pid"], set()).add(r["gpu"])
        models_by_pid.setdefault(r["pid"], set()).add(r["model"])
    assert len(gpus_by_pid) == 2, gpus_by_pid  # both workers got shards
    assert sorted(g for gpus in gpus_by_pid.values() for g in gpus) == ["0", "1"]  # one GPU each, distinct
    assert all(len(models) == 1 for models in models_by_pid.values())  # the model loads once per worker


def test_dask_auto_without_gpus_is_one_worker(monkeypatch):
    from components.config import OrchestrationConfig
    from flows.runners import make_task_runner, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []
    runner = make_task_runner(OrchestrationConfig(task_runner="dask", dask_workers="auto"))
    assert runner.cluster_kwargs["n_workers"] == 1


def test_dask_cluster_listens_on_127_0_0_1_only_and_starts_no_dashboard(monkeypatch):
    """Neither the LocalCluster nor the pinned-GPU cluster binds the dashboard's 8787 (or any
    address beyond 127.0.0.1): the scheduler's own HTTP endpoint takes a free local port."""
    import distributed

    from components.config import OrchestrationConfig
    from flows.runners import make_task_runner, pinned_gpu_cluster

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    runner = make_task_runner(OrchestrationConfig(task_runner="dask", dask_workers=1))
    for make in (lambda: distributed.LocalCluster(**runner.cluster_kwargs),
                 lambda: pinned_gpu_cluster([""])):
        with make() as cluster:
            scheduler = cluster.scheduler
            bound = [s.getsockname()[:2] for s in scheduler.http_server._sockets.values()]
            assert bound and all(host == "127.0.0.1" and port != 8787 for host, port in bound), bound
            assert scheduler.address.startswith("tcp://127.0.0.1:")
