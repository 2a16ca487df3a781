"""Speed of the evaluate stage: images per second for base and refined inference, and the share of
wall time spent inside model forwards.

Runs the component loop the flow runs (``evaluate_batch``: decode image and label from disk,
predict, count into the confusion matrix) on N synthetic PV-21 images of VOC size (500 x 375, so
the PV-21 prompt set of 21 classes + 91 stuff prompts), with the profile's models and PV-21's
effective ``evaluate`` settings -- ``evaluate.protocol`` and ``evaluate.overrides`` applied, built by
the segmenter the evaluate stage scores (the demo profile merges configs/demo.yaml on top) and an aligner of
params.yaml's ``aligner`` kind with random weights. The text prototypes are computed once, untimed.

- base: sliding windows (all windows of an image in one DINOv2 forward) -> aligner -> cosine ->
  bilinear -> argmax.
- refined: base plus SAM's automatic masks (one image-encoder pass) painted by majority vote.

"in models" sums the forwards of DINOv2, the aligner and SAM's image encoder, prompt encoder and
mask decoder (forward hooks). Real specs whose weights are absent run with random weights (same
architecture and cost; the header says so).

    python bench/evaluate.py --profile demo|paper [--images N] [--warmup 1] [--device cpu] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from _shared import ForwardTimer, clock, load_params

from components.aligner.checkpoint import InferenceSpec
from components.aligner.model import Aligner
from components.config import Params
from components.datasets.readers import CanonicalDataset
from components.evaluation.benchmark import evaluate_batch
from components.models import (
    build_clip,
    build_dino,
    build_sam,
    get_spec,
    resolve_device,
    weights_status,
)
from components.segmenter import Segmenter, VocabularySegmenter
from demoworld.synthetic import write_synthetic_benchmark

IMAGE_HW = (375, 500)
MODULES = ("dino", "aligner", "sam_encoder", "sam_decoder")


def build(params: Params, device: torch.device, dtype: str, data: CanonicalDataset) -> dict[str, Any]:
    """The models (random weights where a real spec's files are absent) and both segmenters."""
    names = params.models.selected
    random = {n: not get_spec(n).miniature and not all(s.present for s in weights_status([get_spec(n)]))
              for n in (names.clip, names.sam, names.dino)}
    clip = build_clip(names.clip, device=device, random_weights=random[names.clip])
    dino = build_dino(names.dino, device=device, random_weights=random[names.dino])
    sam = build_sam(names.sam, device=device, random_weights=random[names.sam])
    torch.manual_seed(0)
    aligner = Aligner(get_spec(names.dino).embed_dim, get_spec(names.clip).embed_dim,
                      kind=params.aligner.kind, num_heads=params.aligner.num_heads).to(device).eval()
    ev = params.evaluate.for_benchmark("pv21")  # the protocol's settings for PV-21 (evaluate.protocol, overrides)
    segmenter = Segmenter(aligner=aligner, dino=dino, dino_spec=get_spec(names.dino), clip=clip,
                          inference=InferenceSpec.from_settings(ev, names.sam), sam=lambda: sam, device=device,
                          dtype=dtype)
    settings = {"synonyms": ev.synonyms, "bg_prompts": ev.bg_prompts, "bg_threshold": ev.bg_threshold,
                "logit_scale": ev.logit_scale}
    # the text prototypes: computed once here, untimed
    timer = ForwardTimer(
        {"dino": [dino], "aligner": [aligner], "sam_encoder": [sam.image_encoder],
         "sam_decoder": [sam.prompt_encoder, sam.mask_decoder]},
        device,
    )
    return {
        "base": VocabularySegmenter.for_benchmark(segmenter, data.classes, data.meta, refine=False, **settings),
        "refined": VocabularySegmenter.for_benchmark(segmenter, data.classes, data.meta, refine=True, **settings),
        "timer": timer,
        "random": sorted(n for n, r in random.items() if r),
    }


def run(name: str, built: dict[str, Any], data: CanonicalDataset, ids: list[str], warmup: int,
        device: torch.device) -> dict[str, Any]:
    """Score ``ids`` with one segmenter after ``warmup`` untimed images; wall and forward seconds."""
    segment, timer = built[name], built["timer"]
    variants = ("base",) if name == "base" else ("base", "refined")
    num_classes = len(data.classes)
    if warmup:
        evaluate_batch(data, ids[:warmup], segment=segment, num_classes=num_classes, variants=variants)
    timer.reset()
    start = clock(device)
    evaluate_batch(data, ids[warmup:], segment=segment, num_classes=num_classes, variants=variants)
    wall = clock(device) - start
    return {"wall": wall, "images": len(ids) - warmup, "forwards": dict(timer.seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("paper", "demo"), default="demo")
    parser.add_argument("--images", type=int, default=8, help="timed images per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images first (per variant)")
    parser.add_argument("--mode", choices=("both", "base", "refined"), default="both")
    parser.add_argument("--device", default=None, help="default: models.device of the profile")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="autocast on cuda")
    args = parser.parse_args()

    params = load_params(args.profile)
    device = resolve_device(args.device or params.models.device)
    dtype = args.dtype or params.models.dtype
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_benchmark("pv21", Path(tmp), num_images=args.images + args.warmup, size=IMAGE_HW)
        data = CanonicalDataset(root, "val")
        built = build(params, device, dtype, data)
        names = params.models.selected
        ev = params.evaluate.for_benchmark("pv21")
        print(f"# evaluate bench: protocol {params.evaluate.protocol}, profile {args.profile} (dino {names.dino}, sam {names.sam}, clip {names.clip}), "
              f"device {device}, dtype {dtype if device.type == 'cuda' else 'fp32'}, threads {torch.get_num_threads()}")
        print(f"# {args.images} timed images of {IMAGE_HW[1]}x{IMAGE_HW[0]} (+{args.warmup} warm-up), short side "
              f"{ev.short_side}, window {ev.window} / stride {ev.stride}, AMG {ev.amg.points_per_side}^2 points, "
              f"{len(built['base'].vocabulary.prompts)} prompts")
        if built["random"]:
            print(f"# RANDOM weights (files absent): {', '.join(built['random'])}")
        print("| variant | images/s | s/image | in models | " + " | ".join(MODULES) + " |")
        print("|---|---:|---:|---:|" + "---:|" * len(MODULES))
        modes = ("base", "refined") if args.mode == "both" else (args.mode,)
        for mode in modes:
            result = run(mode, built, data, data.ids, args.warmup, device)
            wall, n = result["wall"], result["images"]
            inside = sum(result["forwards"].values())
            shares = " | ".join(f"{100 * result['forwards'][m] / wall:.1f}%" for m in MODULES)
            print(f"| {mode} | {n / wall:.3f} | {wall / n:.3f} | {100 * inside / wall:.1f}% | {shares} |")


if __name__ == "__main__":
    main()
