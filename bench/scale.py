"""Stage 1 and the feature cache at scale: what the flows cost per image beyond the models.

Labels N synthetic images with the demo profile through the real flows (`fmbseg label`, then
`balance`, then `features`), each stage in a fresh process reporting to one running Prefect
server, the way `fmbseg pipeline` runs them (one shard at a time, so the seconds inside the models never
overlap), and prints for each stage and N:

- images/s end to end (the flow's wall time; the models are loaded before the clock starts);
- ms per image outside the model forwards (wall minus the seconds inside CLIP's vision tower, timed
  around ``clip_dense.dense_features``, and inside SAM's image encoder / prompt encoder / mask
  decoder and DINOv2, timed by forward hooks): decoding, the labelling math, writing, Prefect;
- peak RSS of the stage process (VmHWM);
- task runs the stage created on the Prefect server, against the target of 2 per shard + 5.

    python bench/scale.py [--images 500 2000] [--shard-size 100] [--stage label features]

Targets (issue 12): at N = 2,000 at most 10 ms per image outside the models, task runs <= 2 per
shard + 5, and the peak RSS at N = 2,000 within 10 % of N = 500 (memory flat in N).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
IMAGE_HW = (120, 160)


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _child(stage: str, project: Path) -> None:
    """Run one stage in this process with forward timers on its models; print a JSON record."""
    import torch

    from flows.common import cached_clip, cached_dino, cached_sam, stage_params

    os.chdir(project)
    params = stage_params("params.yaml")
    names, device, weights = params.models.selected, "cpu", params.models.weights_dir
    inside = [0.0]
    starts: dict[tuple[int, int], list[float]] = {}

    def pre(module: torch.nn.Module, args: Any) -> None:
        starts.setdefault((id(module), threading.get_ident()), []).append(time.perf_counter())

    def post(module: torch.nn.Module, args: Any, out: Any) -> None:
        inside[0] += time.perf_counter() - starts[(id(module), threading.get_ident())].pop()

    if stage == "label":
        import components.models.clip_dense as clip_dense

        sam = cached_sam(names.sam, device, weights)
        cached_clip(names.clip, device, weights)  # loaded before the clock starts, as SAM is
        modules = [sam.image_encoder, sam.prompt_encoder, sam.mask_decoder]
        # Stage 1 runs CLIP's vision tower through clip_dense.dense_features (its blocks one by one,
        # the last one modified), never through the tower's own forward, so a hook on the tower would
        # not fire: the pass is timed around that function instead.
        tower_pass = clip_dense.dense_features

        def timed_tower_pass(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return tower_pass(*args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - start

        clip_dense.dense_features = timed_tower_pass
    else:
        modules = [cached_dino(names.dino, device, weights)]
    for module in modules:
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    if stage == "label":
        from flows.label import run_label as run
    elif stage == "features":
        from flows.features import run_features as run
    else:
        from flows.balance import balance_flow as run
    start = time.perf_counter()
    run("params.yaml")
    wall = time.perf_counter() - start
    print(json.dumps({"wall": wall, "inside": inside[0], "rss_mib": _vm_hwm_mib()}))


def _count_task_runs(api: str) -> int:
    """Task runs the server holds (its REST endpoint `POST /task_runs/count`)."""
    request = urllib.request.Request(f"{api}/task_runs/count", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(json.loads(response.read()))


def _project(root: Path, images: int, shard_size: int) -> Path:
    from components.config import deep_merge
    from demoworld.synthetic import write_synthetic_unlabelled
    from flows.common import profile_settings

    raw = profile_settings("demo")
    raw["models"]["profile"] = "demo"
    raw = deep_merge(raw, {"paths": {"images": "images"}, "label": {"shard_size": shard_size},
                           "features": {"shard_size": shard_size},
                           # one shard at a time, so that model seconds never overlap in the sum
                           "orchestration": {"task_runner": "threads", "max_workers": 1}})
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    write_synthetic_unlabelled(root / "images", num_images=images, seed=0, size=IMAGE_HW)
    return root


def _run_stage(stage: str, project: Path, env: dict[str, str]) -> dict[str, Any]:
    before = _count_task_runs(env["PREFECT_API_URL"])
    proc = subprocess.run([sys.executable, __file__, "--child", stage, "--project", str(project)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    record["task_runs"] = _count_task_runs(env["PREFECT_API_URL"]) - before
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[500, 2000])
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--stage", nargs="+", choices=("label", "features"), default=["label", "features"])
    parser.add_argument("--child", choices=("label", "balance", "features"), help=argparse.SUPPRESS)
    parser.add_argument("--project", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.project)
        return

    from flows.server import prefect_server

    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, prefect_server(home=Path(tmp) / "prefect") as api:
        os.environ["PREFECT_API_URL"] = env["PREFECT_API_URL"] = api
        print(f"# demo profile, {IMAGE_HW[1]}x{IMAGE_HW[0]} synthetic images, shard size {args.shard_size}, "
              f"one Prefect server at {api}, stage processes with OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
        for n in args.images:
            project = _project(Path(tmp) / f"n{n}", n, args.shard_size)
            shards = math.ceil(n / args.shard_size)
            for stage in ("label", "balance", "features"):
                if stage == "features" and "features" not in args.stage:
                    break
                record = _run_stage(stage, project, env)
                if stage == "balance" or stage not in args.stage:
                    continue
                rows.append({"stage": stage, "N": n, "shards": shards, **record})
    print("\n| stage | N | images/s | ms/image outside models | peak RSS MiB | task runs | target task runs |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        outside = 1000 * (r["wall"] - r["inside"]) / r["N"]
        print(f"| {r['stage']} | {r['N']} | {r['N'] / r['wall']:.1f} | {outside:.1f} | {r['rss_mib']:.0f} | "
              f"{r['task_runs']} | <= {2 * r['shards'] + 5} |")
    for stage in args.stage:
        by_n = {r["N"]: r["rss_mib"] for r in rows if r["stage"] == stage}
        if len(by_n) > 1:
            lo, hi = min(by_n), max(by_n)
            print(f"{stage}: peak RSS at N={hi} is {100 * (by_n[hi] / by_n[lo] - 1):+.1f} % of N={lo} (target within 10 %)")


if __name__ == "__main__":
    main()
