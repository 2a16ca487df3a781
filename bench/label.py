"""Speed of Stage 1 (the `label` stage): images per second and the share of wall time spent
inside model forwards, for our pipeline and for a straightforward one.

Both label the same N synthetic 640x480 JPEGs (decoded from disk, one shard written at the end)
with the profile's models and params.yaml's ``label`` settings (the demo profile merges
configs/demo.yaml on top):

- ``fmbseg``: the label stage's own shard pipeline, called as the flow calls it
  (components.labelling.shard.label_shard): images decoded on ``label.num_workers`` threads ahead
  of the models (decoding only: torch resizing on those threads would fight the models for the
  intra-op pool); one CLIP vision pass per image (all crops batched ``crop_batch`` at a time, CLS
  and patches from one pass); one SAM image-encoder pass serving the Stage 1.1 prompts and the
  automatic masks, whose generator drops candidates by predicted IoU before upsampling them.
- ``straightforward``: images decoded in line; per crop, ``encode_image`` for the CLS embedding
  and a separate ``dense_features`` pass for the patches; a SamImage for Stage 1.1 and the stock
  ``SamAutomaticMaskGenerator`` (its own second encoder pass, every candidate upsampled) for
  Stage 1.2.

"in models" sums the CLIP vision passes (timed around the calls; for ``fmbseg``, the pipeline's
own "clip" step) and SAM's image encoder, prompt encoder and mask decoder (forward hooks). Real
specs whose weights are absent run with random weights (same architecture and cost; the header
says so). Per-image columns split wall time into CLIP / SAM encoder / prompts (Stage 1.1
decoding) / automatic masks / labelling (presence, mask labelling, painting) / I/O (waiting for
decoding, PNG + Parquet writing).

    python bench/label.py --profile demo|paper [--images N] [--mode both|fmbseg|straightforward]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from _shared import clock, load_params
from segment_anything import SamAutomaticMaskGenerator

from components.datasets.readers import read_image_rgb
from components.labelling.settings import Stage1Settings
from components.labelling.shard import label_shard
from components.labelling.stage1 import (
    AmgMask,
    decode_masks,
    embed_sam,
    prepare_image,
    presence,
    stage1_1,
    stage1_2,
    stage1_result,
)
from components.labelling.store import (
    ImageEntry,
    ShardRecord,
    detection_rows,
    labels_row,
    shard_paths,
    write_shard,
)
from components.models import (
    autocast_context,
    build_clip,
    build_sam,
    dense_features,
    get_spec,
    prototypes,
    resolve_device,
    weights_status,
)
from demoworld.synthetic import write_synthetic_unlabelled
from flows.label import stage1_settings, vocabulary_lines

IMAGE_HW = (480, 640)
STEPS = ("clip", "sam_encoder", "prompts", "amg", "labelling", "io")


class ForwardTimer:
    """Wall seconds inside the forwards of some modules, summed (forward pre / post hooks)."""

    def __init__(self, modules: list[torch.nn.Module], device: torch.device) -> None:
        self.seconds = 0.0
        self.device = device
        self._start = 0.0
        for module in modules:
            module.register_forward_pre_hook(self._pre)
            module.register_forward_hook(self._post)

    def _pre(self, module: torch.nn.Module, args: tuple) -> None:
        self._start = clock(self.device)

    def _post(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        self.seconds += clock(self.device) - self._start


class Clocks:
    """Per-step wall seconds plus the seconds inside CLIP passes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps = dict.fromkeys(STEPS, 0.0)
        self.clip_forward = 0.0

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start = clock(self.device)
        try:
            yield
        finally:
            self.steps[name] += clock(self.device) - start


def load_settings(profile: str) -> tuple[Any, Stage1Settings]:
    """The profile's settings -> (Params, Stage1Settings)."""
    params = load_params(profile)
    return params, stage1_settings(params.label)


def straightforward_clip(model: Any, clip_pixels: torch.Tensor, grid: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS per crop from ``encode_image`` and patches per crop from a second, separate pass."""
    side = clip_pixels.shape[1] // grid
    cls, rows = [], []
    for r in range(grid):
        row = []
        for c in range(grid):
            crop = clip_pixels[:, r * side : (r + 1) * side, c * side : (c + 1) * side][None]
            cls.append(model.encode_image(crop)[0])
            row.append(dense_features(model, crop, mode).patches[0])
        rows.append(torch.cat(row, dim=1))
    return torch.stack(cls), torch.cat(rows, dim=0)


def straightforward_image(image: Any, clip: Any, sam: Any, protos: torch.Tensor, settings: Stage1Settings,
                         device: torch.device, clocks: Clocks) -> tuple[Any, int, int]:
    """One image the straightforward way: a CLS pass and a patch pass per crop, and the stock
    SamAutomaticMaskGenerator (its own encoder pass, every candidate upsampled)."""
    side = settings.grid * clip.spec.image_size
    with clocks.step("io"):
        prepared = prepare_image(image, clip_side=side, mean=clip.spec.mean, std=clip.spec.std,
                                 sam_size=settings.sam_size)
    with clocks.step("clip"):
        t0 = clock(device)
        cls, patches = straightforward_clip(clip.model, prepared.clip_pixels.to(device), settings.grid,
                                            settings.dense_mode)
        clocks.clip_forward += clock(device) - t0
    with clocks.step("labelling"):
        found = presence(cls, protos, min_crops=settings.min_crops)
    with clocks.step("sam_encoder"):
        embedded = embed_sam(sam, prepared.sam_image)
    with clocks.step("prompts"):
        s11 = stage1_1(embedded, patches, protos, found, top_k_points=settings.top_k_points)
    with clocks.step("amg"):
        generator = SamAutomaticMaskGenerator(sam, **settings.amg.generator_args(), output_mode="coco_rle")
        amg = [AmgMask(r["segmentation"]["counts"].encode(), r["predicted_iou"], r["stability_score"], r["area"])
               for r in generator.generate(prepared.sam_image)]
    with clocks.step("labelling"):
        s12 = stage1_2(decode_masks(amg, settings.sam_size), patches, protos, found,
                       **settings.amg.size_filter())
        result = stage1_result(found, s11, s12, amg, label_size=settings.label_size)
    return result, prepared.height, prepared.width


def straightforward_shard(paths: list[Path], models: dict[str, Any], settings: Stage1Settings, device: torch.device,
                         dtype: str, out: Path, clocks: Clocks) -> None:
    """Label ``paths`` the straightforward way, decoded in line, and write them as one shard."""
    labels, detections, entries = [], [], []
    with torch.inference_mode(), autocast_context(device, dtype):
        for i, path in enumerate(paths):
            image = read_image_rgb(path)
            result, height, width = straightforward_image(image, models["clip"], models["sam"], models["prototypes"],
                                                          settings, device, clocks)
            with clocks.step("io"):
                entry = ImageEntry(path.stem, path.as_posix(), f"{i}")
                entries.append(entry)
                labels.append(labels_row(entry, result, height=height, width=width, sam_size=settings.sam_size))
                detections.extend(detection_rows(entry.image_id, result, models["vocabulary"]))
        with clocks.step("io"):
            record = ShardRecord("straightforward", "bench", "bench", entries,
                                 rows={e.image_id: i for i, e in enumerate(entries)})
            write_shard(out, record, labels, detections)


def run(mode: str, paths: list[Path], models: dict[str, Any], settings: Stage1Settings, workers: int,
        device: torch.device, dtype: str, out: Path) -> dict[str, Any]:
    """Label ``paths`` with one pipeline into one shard; returns wall seconds, per-step seconds,
    seconds in models and the automatic masks per image."""
    sam = models["sam"]
    sam_timer = ForwardTimer([sam.image_encoder, sam.prompt_encoder, sam.mask_decoder], device)
    sam_before = sam_timer.seconds
    start = clock(device)
    if mode == "fmbseg":  # the label stage's shard pipeline, timed by its own steps
        entries = [ImageEntry(path.stem, path.as_posix(), f"{i}") for i, path in enumerate(paths)]
        report = label_shard(out, mode, entries, clip=models["clip"], sam=sam, prototypes=models["prototypes"],
                             settings=settings, vocabulary=models["vocabulary"], settings_hash="bench",
                             mask_settings_hash="bench", dtype=dtype, num_workers=workers)
        steps = {step: report["timings"].get(step, 0.0) for step in STEPS}
        clip_seconds = steps["clip"]
    else:
        clocks = Clocks(device)
        straightforward_shard(paths, models, settings, device, dtype, out, clocks)
        steps, clip_seconds = clocks.steps, clocks.clip_forward
    wall = clock(device) - start
    amg = pq.read_table(shard_paths(out, mode)["labels"], columns=["amg_masks"]).column("amg_masks").to_pylist()
    return {"wall": wall, "steps": steps, "inside": clip_seconds + sam_timer.seconds - sam_before,
            "masks": sum(len(masks) for masks in amg)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("paper", "demo"), default="demo")
    parser.add_argument("--images", type=int, default=8, help="timed images per pipeline")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images first (per pipeline)")
    parser.add_argument("--mode", choices=("both", "fmbseg", "straightforward"), default="both")
    parser.add_argument("--device", default=None, help="default: models.device of the profile")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="autocast on cuda")
    parser.add_argument("--workers", type=int, default=None, help="decoding threads (default: label.num_workers)")
    args = parser.parse_args()

    params, settings = load_settings(args.profile)
    workers = params.label.num_workers if args.workers is None else args.workers
    device = resolve_device(args.device or params.models.device)
    dtype = "fp32" if device.type == "cpu" else (args.dtype or params.models.dtype)
    names = params.models.selected
    random = {n: not get_spec(n).miniature and not all(s.present for s in weights_status([get_spec(n)]))
              for n in (names.clip, names.sam)}
    start = time.perf_counter()
    clip = build_clip(names.clip, device=device, random_weights=random[names.clip])
    sam = build_sam(names.sam, device=device, random_weights=random[names.sam])
    vocabulary = vocabulary_lines(params.label.vocabulary)
    with torch.inference_mode(), autocast_context(device, dtype):
        protos = prototypes(clip.model, clip.tokenizer, vocabulary, params.label.templates).float()
    setup = time.perf_counter() - start
    models = {"clip": clip, "sam": sam, "prototypes": protos, "vocabulary": vocabulary}
    threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    weights = ", ".join(f"{n}: {'RANDOM' if random[n] else ('seeded mini' if get_spec(n).miniature else 'checkpoint')}"
                        for n in random)
    print(f"profile {args.profile} | device {device} ({threads}) | dtype {dtype} | {weights}\n"
          f"G={settings.grid} S={clip.spec.image_size} sam_size={settings.sam_size} label_size={settings.label_size} "
          f"AMG {settings.amg.points_per_side}^2 points | {args.warmup} warm-up + {args.images} timed images "
          f"{IMAGE_HW[1]}x{IMAGE_HW[0]} | {workers} decoding threads (fmbseg) | setup (build + {len(vocabulary)} prototypes) {setup:.1f} s\n")

    modes = ("fmbseg", "straightforward") if args.mode == "both" else (args.mode,)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_synthetic_unlabelled(Path(tmp) / "images", num_images=args.images + args.warmup, seed=0,
                                           size=IMAGE_HW)
        for mode in modes:
            if args.warmup:
                run(mode, paths[: args.warmup], models, settings, workers, device, dtype, Path(tmp) / "warmup")
            r = run(mode, paths[args.warmup :], models, settings, workers, device, dtype, Path(tmp) / mode)
            n = args.images
            rows.append([mode, f"{n / r['wall']:.3f}", f"{r['wall'] / n:.3f}"]
                        + [f"{r['steps'][s] / n:.3f}" for s in STEPS]
                        + [f"{r['inside'] / r['wall']:.1%}", f"{r['masks'] / n:.1f}"])
    header = ["pipeline", "images/s", "s/image"] + [f"{s} s" for s in STEPS] + ["in models", "masks/image"]
    table = [header] + rows
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
