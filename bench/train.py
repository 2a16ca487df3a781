"""Stage 2 speed: feature-cache images/second, training steps/second, and the loss at M = 6845.

For the profile given (``demo``: params.yaml with configs/demo.yaml merged over it; ``paper``:
params.yaml as is), with that profile's DINOv2 (real architectures with RANDOM weights when the
weights are not installed: speed only, never results), CLIP text width, feature size, batch size
and aligner:

1. feature cache: ``--images`` synthetic 640x480 JPEGs through the real cache writer (decoding
   threads + batched forwards + fp16 memmap shard); images/second end to end;
2. training: ``--steps`` optimizer steps of the real trainer over that cache (random pseudo
   labels, 10% unlabelled); steps/second;
3. the loss alone, forward + backward, at the paper's M = 5 x 37 x 37 = 6845 patches and the
   profile's text width D against K = 171 prototypes: seconds and peak extra memory (CUDA: max
   allocated above the inputs; CPU: the peak resident set (VmHWM, reset first) above the resident
   set before, in a fresh process; ru_maxrss would carry the parent's peak across fork + exec).

    python bench/train.py --profile demo
    python bench/train.py --profile paper --images 2 --steps 2
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image

from components.aligner.data import AlignerSamples
from components.aligner.losses import get_loss
from components.aligner.train import train_aligner
from components.config import Params, deep_merge, parse_params
from components.features.cache import (
    FeatureCache,
    finalize_cache,
    plan_cache,
    settings_hash,
    unique_images,
    write_shard,
)
from components.features.encode import DinoEncoder
from components.io import unlabelled_for
from components.models.registry import build_dino, get_spec, resolve_device
from components.models.weights import MissingWeightsError
from flows.common import train_settings

ROOT = Path(__file__).resolve().parents[1]
PAPER_M = 5 * 37 * 37  # 5 images a batch x 1369 patches (ViT-L/14 at 518 px)
NUM_CLASSES = 171  # COCO-Stuff


def profile_params(profile: str) -> Params:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    if profile == "demo":
        raw = deep_merge(raw, yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text()))
    elif profile != "paper":
        raise ValueError(f"unknown profile {profile!r}; supported: demo, paper")
    return parse_params(raw, f"{profile} profile")


def dino_model(name: str, device: torch.device) -> tuple[torch.nn.Module, bool]:
    """The profile's DINOv2, or its architecture with random weights when the weights are missing."""
    try:
        return build_dino(name, device=device), False
    except MissingWeightsError:
        return build_dino(name, device=device, random_weights=True), True


class RandomLabels:
    """Pseudo label maps for the benchmark: [L, L] uint8, 10% unlabelled (255)."""

    def __init__(self, size: int, num_classes: int) -> None:
        self.size, self.num_classes = size, num_classes

    def read(self, image_id: str, variant: str) -> np.ndarray:
        rng = np.random.default_rng(abs(hash((image_id, variant))) % 2**32)
        label = rng.integers(0, self.num_classes, (self.size, self.size), dtype=np.uint8)
        label[rng.random(label.shape) < 0.1] = 255
        return label


def bench_cache(params: Params, work: Path, num_images: int, device: torch.device) -> dict[str, float]:
    feats = params.features
    spec = get_spec(params.models.selected.dino)
    model, random_weights = dino_model(spec.name, device)
    encoder = DinoEncoder(model, device=device, dtype=params.models.dtype)
    rng = np.random.default_rng(0)
    rows = []
    for k in range(num_images):
        path = work / "images" / f"{k:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
        rows.append({"image_id": f"{k:05d}", "image_path": path.relative_to(work).as_posix(), "variant": "stage1_1"})
    index = pd.DataFrame(rows)
    images = unique_images(index, work, num_workers=feats.num_workers)
    settings = settings_hash(spec.name, feats.image_size, precision=params.models.dtype)
    plan = plan_cache(work / "features", images, settings=settings, shard_size=feats.shard_size)
    t0 = time.perf_counter()
    for shard in plan.todo:
        write_shard(work / "features", shard, encoder, settings=settings, project_root=work,
                    image_size=feats.image_size, mean=spec.mean, std=spec.std, batch_size=feats.batch_size,
                    num_workers=feats.num_workers)
    seconds = time.perf_counter() - t0
    finalize_cache(work / "features", images, dino=spec.name, image_size=feats.image_size,
                   precision=params.models.dtype)
    index.to_parquet(work / "index.parquet")
    return {"images": num_images, "seconds": seconds, "images_per_second": num_images / seconds,
            "random_weights": random_weights}


def bench_training(params: Params, work: Path, steps: int, device: torch.device) -> dict[str, float]:
    cache = FeatureCache(work / "features")
    index = pd.read_parquet(work / "index.parquet")
    batch = params.train.batch_size
    repeats = -(-steps * batch // len(index))  # enough samples for `steps` steps in one epoch
    samples = pd.concat([index] * repeats, ignore_index=True).iloc[: steps * batch]
    text_dim = get_spec(params.models.selected.clip).embed_dim
    dataset = AlignerSamples(samples, inputs=cache, labels=RandomLabels(params.label.label_size, NUM_CLASSES),
                             grid=cache.grid, num_classes=NUM_CLASSES)
    prototypes = torch.nn.functional.normalize(torch.randn(NUM_CLASSES, text_dim), dim=-1)
    t = params.train
    train = t.model_copy(update={"epochs": 1, "seed": 0})
    settings = train_settings(params.aligner, train, in_dim=cache.dim, ignore_index=unlabelled_for(NUM_CLASSES))
    stamps: list[float] = []
    train_aligner(dataset, prototypes, settings, device=device, num_workers=t.num_workers,
                  on_step=lambda step, loss: stamps.append(time.perf_counter()))
    per_step = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]  # the first step warms up
    return {"steps": len(stamps), "patches_per_step": batch * cache.grid[0] * cache.grid[1],
            "steps_per_second": 1.0 / statistics.median(per_step) if per_step else float("nan")}


def _proc_status_kib(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _loss_once(name: str, dim: int, device: str, repeats: int, out: multiprocessing.Queue) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(PAPER_M, dim, generator=g).to(device).requires_grad_(True)
    labels = torch.randint(0, NUM_CLASSES, (PAPER_M,), generator=g)
    labels[torch.rand(PAPER_M, generator=g) < 0.1] = 255
    labels, text = labels.to(device), torch.randn(NUM_CLASSES, dim, generator=g).to(device)
    loss_fn = get_loss(name)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to now
        base = _proc_status_kib("VmRSS")
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss_fn(z, labels, text, 0.1).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        z.grad = None
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else (_proc_status_kib("VmHWM") - base) / 1024
    out.put({"seconds": statistics.median(times), "peak_mib": peak})


def bench_loss(name: str, dim: int, device: torch.device, repeats: int) -> dict[str, float]:
    """The loss at M = 6845 in a fresh process (so the peak memory is the loss's alone)."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=_loss_once, args=(name, dim, str(device), repeats, out))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"the loss benchmark process failed (exit code {proc.exitcode})")
    result = out.get(timeout=10)
    return {"M": PAPER_M, "D": dim, "K": NUM_CLASSES, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="demo", help="demo | paper")
    parser.add_argument("--images", type=int, default=32, help="images to encode into the cache")
    parser.add_argument("--steps", type=int, default=20, help="training steps to time")
    parser.add_argument("--device", default=None, help="default: the profile's models.device")
    parser.add_argument("--repeats", type=int, default=3, help="loss repetitions (median)")
    args = parser.parse_args()
    params = profile_params(args.profile)
    device = resolve_device(args.device or params.models.device)
    print(f"profile {args.profile}: dino {params.models.selected.dino} at {params.features.image_size} px, "
          f"aligner {params.aligner.kind}, loss {params.train.loss}, batch {params.train.batch_size}, "
          f"device {device}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = bench_cache(params, Path(tmp), args.images, device)
        print(f"feature cache: {cache['images']} images in {cache['seconds']:.2f} s = "
              f"{cache['images_per_second']:.2f} images/s" + ("  (random weights)" if cache["random_weights"] else ""))
        train = bench_training(params, Path(tmp), args.steps, device)
        print(f"training: {train['steps']} steps of {train['patches_per_step']} patches, "
              f"{train['steps_per_second']:.2f} steps/s (median, after the first step)")
    text_dim = get_spec(params.models.selected.clip).embed_dim
    loss = bench_loss(params.train.loss, text_dim, device, args.repeats)
    print(f"loss {params.train.loss} at M={loss['M']}, D={loss['D']}, K={loss['K']}: "
          f"{loss['seconds'] * 1000:.1f} ms forward+backward, peak {loss['peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
