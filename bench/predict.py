"""Speed of `fmbseg predict`: images per second, base and SAM-refined, and the share of wall time
spent inside model forwards.

Runs the loop the command's task runs (``components.predictions.predict_images``: hash and decode
JPEGs on reader threads, segment batches of images with the windows of a batch sharing DINOv2
forwards, write label PNGs, COCO RLE records and the jsonl on a writer thread) on N synthetic
VOC-size JPEGs (500 x 375) with the profile's models, params.yaml's ``evaluate`` protocol (the
demo profile merges configs/demo.yaml on top; what train records in a checkpoint) and
``label.vocabulary`` as the classes (171 for the paper profile), with an aligner of params.yaml's
``aligner`` kind and random weights. The text prototypes are computed once, untimed, as is a
warm-up run. Not counted: the command's one-off costs (Python and model loading, a Prefect flow
run: seconds, once per command).

"in models" sums the forwards of DINOv2, the aligner and SAM's image encoder, prompt encoder and
mask decoder (forward hooks). Real specs whose weights are absent run with random weights (same
architecture and cost; the header says so).

    python bench/predict.py --profile demo|paper [--images N] [--batch-size 8] [--mode both|base|refined]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _shared import ForwardTimer, clock, load_params

from components.aligner.model import Aligner
from components.config import Params
from components.models import build_clip, build_dino, build_sam, get_spec, resolve_device, weights_status
from components.predictions import list_sources, predict_images
from components.segmenter import Segmenter
from demoworld.synthetic import write_synthetic_unlabelled
from flows.evaluate import inference_spec
from flows.label import vocabulary_lines

IMAGE_HW = (375, 500)
MODULES = ("dino", "aligner", "sam_encoder", "sam_decoder")


def build(params: Params, device: torch.device, dtype: str) -> tuple[Segmenter, ForwardTimer, list[str]]:
    """The segmenter (random weights where a real spec's files are absent), its timer, and the
    names of the specs that run with random weights."""
    names = params.models.selected
    random = {n: not get_spec(n).miniature and not all(s.present for s in weights_status([get_spec(n)]))
              for n in (names.clip, names.sam, names.dino)}
    clip = build_clip(names.clip, device=device, random_weights=random[names.clip])
    dino = build_dino(names.dino, device=device, random_weights=random[names.dino])
    sam = build_sam(names.sam, device=device, random_weights=random[names.sam])
    torch.manual_seed(0)
    aligner = Aligner(get_spec(names.dino).embed_dim, get_spec(names.clip).embed_dim,
                      kind=params.aligner.kind, num_heads=params.aligner.num_heads).to(device).eval()
    segmenter = Segmenter(aligner=aligner, dino=dino, dino_spec=get_spec(names.dino), clip=clip,
                          inference=inference_spec(params), sam=lambda: sam, device=device, dtype=dtype)
    timer = ForwardTimer(
        {"dino": [dino], "aligner": [aligner], "sam_encoder": [sam.image_encoder],
         "sam_decoder": [sam.prompt_encoder, sam.mask_decoder]},
        device,
    )
    return segmenter, timer, sorted(n for n, r in random.items() if r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=("paper", "demo"), default="demo")
    parser.add_argument("--images", type=int, default=8, help="timed images per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed images first (per variant)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per model batch (--batch-size)")
    parser.add_argument("--mode", choices=("both", "base", "refined"), default="both")
    parser.add_argument("--device", default=None, help="default: models.device of the profile")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="autocast on cuda")
    args = parser.parse_args()

    params = load_params(args.profile)
    device = resolve_device(args.device or params.models.device)
    dtype = args.dtype or params.models.dtype
    classes = vocabulary_lines(params.label.vocabulary)
    torch.set_grad_enabled(False)
    segmenter, timer, random = build(params, device, dtype)
    segmenter.vocabulary(classes)  # text prototypes: once per vocabulary, untimed
    names, spec = params.models.selected, segmenter.inference
    print(f"# predict bench: profile {args.profile} (dino {names.dino}, sam {names.sam}, clip {names.clip}), "
          f"device {device}, dtype {dtype if device.type == 'cuda' else 'fp32'}, threads {torch.get_num_threads()}")
    print(f"# {args.images} timed JPEGs of {IMAGE_HW[1]}x{IMAGE_HW[0]} (+{args.warmup} warm-up), batch "
          f"{args.batch_size}, short side {spec.short_side}, window {spec.window} / stride {spec.stride}, "
          f"AMG {spec.amg.points_per_side}^2 points, {len(classes)} classes ({params.label.vocabulary})")
    if random:
        print(f"# RANDOM weights (files absent): {', '.join(random)}")
    print("| variant | images/s | s/image | in models | " + " | ".join(MODULES) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(MODULES))
    modes = ("base", "refined") if args.mode == "both" else (args.mode,)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_unlabelled(root / "warmup", num_images=args.warmup, seed=1, size=IMAGE_HW)
        write_synthetic_unlabelled(root / "images", num_images=args.images, seed=0, size=IMAGE_HW)
        for mode in modes:
            refine = mode == "refined"
            if args.warmup:
                predict_images(segmenter, list_sources([root / "warmup"]), classes, root / f"warm-{mode}",
                               key=mode, refine=refine, batch_size=args.batch_size)
            sources = list_sources([root / "images"])
            timer.reset()
            start = clock(device)
            predict_images(segmenter, sources, classes, root / f"out-{mode}", key=mode, refine=refine,
                           batch_size=args.batch_size)
            wall = clock(device) - start
            inside = sum(timer.seconds.values())
            shares = " | ".join(f"{100 * timer.seconds[m] / wall:.1f}%" for m in MODULES)
            n = len(sources)
            print(f"| {mode} | {n / wall:.3f} | {wall / n:.3f} | {100 * inside / wall:.1f}% | {shares} |", flush=True)


if __name__ == "__main__":
    main()
