"""Per-image time of the three foundation-model steps of the pipeline, and how much of it is glue.

Steps (each from a uint8 RGB 640x480 picture to features on the CPU):

- CLIP: the paper's tiling -- resize to G·S (1344 for ViT-L/14-336, G = 4), 16 crops through one
  ``tiled_features`` call (fmbseg mode), crops batched ``--crop-batch`` at a time;
- SAM: one image embedding (``SamImage``: ResizeLongestSide, normalise + pad, image encoder);
- student (DINOv2, DINOv3): one forward at the spec's input side (518 for DINOv2, 512 for DINOv3:
  about 512 px on each one's patch grid, 37² and 32² patches).

"model s" is the time inside the network (the ``tiled_features`` call; SAM's image encoder,
timed by forward hooks; the DINOv2 forward); "outside" is the rest of the step's wall time
(resizing, normalisation, copies) as a share of it. Real specs whose weights are absent run with
random weights (same architecture and cost; the table says so).

``--mask-models`` compares mask models instead (SAM v1 and SAM 2.1 through the one interface,
components/models/masks.py) on one square image of ``--mask-side`` (the SAM frame, 518 in the
paper): the image encode (``embed_image``), a 16-point prompt batch (16 prompt sets of one point,
one decoder call: Stage 1.1's shape) and 1024-point automatic masks (32 × 32 grid, 64 per batch)
with every filter at 0 so that each candidate goes through every step (upsampling, stability,
boxes, NMS): the cost upper bound, independent of what random weights predict.
``--mask-steps`` picks which of the three to run (the automatic masks of the real sizes take
minutes on a CPU).

    python bench/models.py --profile demo|paper|modern [--repeats 3] [--warmup 1] [--device auto]
    python bench/models.py --students dinov3_vitl16 dinov2_vitl14   # students only, with their ratio
    python bench/models.py --mask-models vit_h sam2.1-hiera-large [--mask-steps encode prompts amg]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from components.config import load_params
from components.models import (
    SamImage,
    autocast_context,
    build_clip,
    build_dino,
    build_sam,
    clip_preprocess,
    dino_preprocess,
    embed_image,
    get_spec,
    list_specs,
    patch_features,
    resolve_device,
    tiled_features,
    weights_status,
)

REPO = Path(__file__).resolve().parents[1]
IMAGE_HW = (480, 640)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class ForwardTimer:
    """Wall seconds spent inside a module's forward calls, summed (forward pre / post hooks)."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.device, self.seconds, self._start = device, 0.0, 0.0
        module.register_forward_pre_hook(self._pre)
        module.register_forward_hook(self._post)

    def _pre(self, module: torch.nn.Module, args: tuple) -> None:
        self._start = _clock(self.device)

    def _post(self, module: torch.nn.Module, args: tuple, output: object) -> None:
        self.seconds += _clock(self.device) - self._start


Step = Callable[[np.ndarray], float]  # image -> seconds inside the model


def clip_step(name: str, device: torch.device, random: bool, grid: int, crop_batch: int) -> tuple[str, Step]:
    model, _, spec = build_clip(name, device=device, random_weights=random)
    side = grid * spec.image_size

    def step(image: np.ndarray) -> float:
        pixels = clip_preprocess(image, side, spec.mean, spec.std)[0].to(device)
        start = _clock(device)
        feats = tiled_features(model, pixels, grid, "fmbseg", batch_size=crop_batch)
        inside = _clock(device) - start
        feats.patches.cpu()
        return inside

    return f"{grid * grid}-crop tiling {side}x{side}", step


def sam_step(name: str, device: torch.device, random: bool) -> tuple[str, Step]:
    sam = build_sam(name, device=device, random_weights=random)
    timer = ForwardTimer(sam.image_encoder, device)

    def step(image: np.ndarray) -> float:
        before = timer.seconds
        SamImage(sam, image).predictor.features.cpu()
        return timer.seconds - before

    return f"embedding {IMAGE_HW[1]}x{IMAGE_HW[0]}", step


def dino_step(name: str, device: torch.device, random: bool) -> tuple[str, Step]:
    model = build_dino(name, device=device, random_weights=random)
    size = get_spec(name).image_size

    def step(image: np.ndarray) -> float:
        pixels = dino_preprocess(image, size).to(device)
        start = _clock(device)
        feats = patch_features(model, pixels)
        inside = _clock(device) - start
        feats.cpu()
        return inside

    return f"forward {size}x{size}", step


MASK_STEPS: tuple[str, ...] = ("encode", "prompts", "amg")


def mask_model_row(name: str, device: torch.device, side: int, steps: tuple[str, ...]) -> tuple[str, ...]:
    """Seconds of one image's encode, 16-point prompt batch and 1024-point automatic masks for one
    mask-model spec ("-" for a step not run), with random weights where its files are absent."""
    spec = get_spec(name)
    random = not spec.miniature and not all(s.present for s in weights_status([spec]))
    model = build_sam(name, device=device, random_weights=random)
    image = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    points = np.random.default_rng(1).uniform(0, side, (16, 1, 2))
    seconds = dict.fromkeys(MASK_STEPS, "-")
    start = _clock(device)
    embedded = embed_image(model, image)
    seconds["encode"] = f"{_clock(device) - start:.2f}"
    if "prompts" in steps:
        embedded.masks_from_point_sets(points)  # warm-up: first decoder call
        start = _clock(device)
        embedded.masks_from_point_sets(points)
        seconds["prompts"] = f"{_clock(device) - start:.3f}"
    if "amg" in steps:
        start = _clock(device)
        records = embedded.automatic_masks(points_per_side=32, points_per_batch=64, pred_iou_thresh=0.0,
                                           stability_score_thresh=0.0, box_nms_thresh=0.7)
        seconds["amg"] = f"{_clock(device) - start:.2f} ({len(records)} kept)"
    weights = "seeded mini" if spec.miniature else ("RANDOM" if random else "checkpoint")
    return (name, type(model).__name__, weights, *(seconds[s] for s in MASK_STEPS))


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    table = [header, *rows]
    widths = [max(len(r[c]) for r in table) for c in range(len(header))]
    for r in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("paper", "demo", "modern"), default="demo")
    parser.add_argument("--students", nargs="+", default=None,
                        help="time only these student specs (the first is the ratios' reference)")
    parser.add_argument("--repeats", type=int, default=3, help="timed images per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="bf16", help="autocast on cuda")
    parser.add_argument("--grid", type=int, default=4, help="G: CLIP crops per side")
    parser.add_argument("--crop-batch", type=int, default=16, help="CLIP crops per forward")
    parser.add_argument("--mask-models", nargs="+", metavar="SPEC", help="compare these mask models instead")
    parser.add_argument("--mask-side", type=int, default=518, help="side of the square mask-model image")
    parser.add_argument("--mask-steps", nargs="+", choices=MASK_STEPS, default=list(MASK_STEPS))
    args = parser.parse_args()
    for name in args.mask_models or ():
        if name not in list_specs("sam"):
            parser.error(f"{name!r} is not a mask model; known: {', '.join(list_specs('sam'))}")

    device = resolve_device(args.device)
    if args.mask_models:
        threads = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
        print(f"mask models | device {device} ({threads}) | fp32 | one {args.mask_side}x{args.mask_side} image\n")
        with torch.inference_mode():
            rows = [mask_model_row(n, device, args.mask_side, tuple(args.mask_steps)) for n in args.mask_models]
        print_table(("model", "class", "weights", "encode s", "16-point prompts s", "1024-point AMG s"), rows)
        return
    profile = load_params(REPO / "params.yaml").models.profiles[args.profile]
    image = np.random.default_rng(0).integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8)
    threads = (
        f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    )
    dtype = "fp32" if device.type == "cpu" else args.dtype
    print(
        f"profile {args.profile} | device {device} ({threads}) | dtype {dtype} | "
        f"{args.warmup} warm-up + {args.repeats} timed images\n"
    )

    rows = []
    cases = (
        (profile.clip, lambda n, r: clip_step(n, device, r, args.grid, args.crop_batch)),
        (profile.sam, lambda n, r: sam_step(n, device, r)),
        (profile.dino, lambda n, r: dino_step(n, device, r)),
    ) if args.students is None else tuple((n, lambda n, r: dino_step(n, device, r)) for n in args.students)
    with torch.inference_mode():
        for name, make in cases:
            random = not get_spec(name).miniature and not all(s.present for s in weights_status([get_spec(name)]))
            start = time.perf_counter()
            what, step = make(name, random)
            build = time.perf_counter() - start
            with autocast_context(device, dtype):
                for _ in range(args.warmup):
                    step(image)
                inside = wall = 0.0
                for _ in range(args.repeats):
                    start = _clock(device)
                    inside += step(image)
                    wall += _clock(device) - start
            weights = "seeded mini" if get_spec(name).miniature else ("RANDOM" if random else "checkpoint")
            rows.append(
                (name, weights, what, build, wall / args.repeats, inside / args.repeats, 1 - inside / wall)
            )

    print_table(
        ("model", "weights", "step", "build s", "s/image", "model s", "outside", "x first"),
        [(n, w, s, f"{b:.2f}", f"{t:.3f}", f"{i:.3f}", f"{o:.1%}", f"{t / rows[0][4]:.2f}")
         for n, w, s, b, t, i, o in rows],
    )


if __name__ == "__main__":
    main()
