"""What each stage of the paper profile costs on one GPU, *estimated* from counted FLOPs.

torch's FlopCounterMode counts the matmul/convolution FLOPs of the paper's architectures (CLIP
ViT-L/14-336, SAM vit_h, DINOv2 ViT-L/14) on the meta device, so nothing is computed and no weight
is needed; SAM's small prompt decoder is counted on the CPU. The per-image FLOPs, times the images
of each stage, over an assumed sustained throughput (``--tflops``, default 300: about 30 % of an
H100's dense bf16 peak), give hours. It ignores what is not a matmul (SAM's mask post-processing,
decoding, disk): a lower bound on time, to compare with ``bench/gpu.sh``, which measures.

    python bench/flops.py                 # about a minute on a CPU
    python bench/flops.py --tflops 150    # a more pessimistic utilisation
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import open_clip
import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer
from torch.utils.flop_counter import FlopCounterMode

from components.models.registry import init_model

# images per stage: COCO train2017 (the unlabelled set) and the seven benchmarks' val splits
TRAIN_IMAGES = 118_287
BENCHMARK_IMAGES = {"pv21": 1449, "pv20": 1449, "pc59": 5104, "co80": 5000, "cs171": 5000, "cityscapes": 500, "ade20k": 2000}
# 448-px windows at stride 224 over an image resized to short side 448 (Cityscapes is 2:1, the others ~4:3)
WINDOWS = {"cityscapes": 3}
DEFAULT_WINDOWS = 2


def tflop(fn: Callable[[], object]) -> float:
    """Forward TFLOPs of ``fn()`` as counted by torch."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e12


def per_image() -> dict[str, float]:
    """TFLOPs of one image's forwards, by model and input."""
    with torch.device("meta"):
        clip = open_clip.create_model("ViT-L-14-336", pretrained=None, device="meta")
        sam = sam_model_registry["vit_h"](checkpoint=None)
        dino = init_model("dinov2_vitl14")  # the registry's architecture of the paper's student
        out = {
            "clip_16_crops_336": tflop(lambda: clip.encode_image(torch.empty(16, 3, 336, 336))),
            "sam_encoder_1024": tflop(lambda: sam.image_encoder(torch.empty(1, 3, 1024, 1024))),
            "dino_518": tflop(lambda: dino(pixel_values=torch.empty(1, 3, 518, 518))),
            "dino_window_448": tflop(lambda: dino(pixel_values=torch.empty(1, 3, 448, 448))),
        }
    prompts = PromptEncoder(embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256)

    def decode_64_points() -> None:
        sparse, dense = prompts(points=(torch.rand(64, 1, 2) * 1024, torch.ones(64, 1, dtype=torch.int)), boxes=None, masks=None)
        decoder(image_embeddings=torch.zeros(1, 256, 64, 64), image_pe=prompts.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True)

    out["sam_amg_32x32_points"] = 16 * tflop(decode_64_points)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tflops", type=float, default=300.0, help="assumed sustained TFLOP/s of the GPU")
    args = parser.parse_args()
    f = per_image()
    for name, value in f.items():
        print(f"{name:24s} {value:8.3f} TFLOP")
    stage1 = f["clip_16_crops_336"] + f["sam_encoder_1024"] + f["sam_amg_32x32_points"]
    # the aligner step and TSupCon are ~0.1 TFLOP a sample (forward + backward): small next to the rest
    evaluate_base = sum(n * WINDOWS.get(b, DEFAULT_WINDOWS) * f["dino_window_448"] for b, n in BENCHMARK_IMAGES.items())
    refine = sum(BENCHMARK_IMAGES.values()) * (f["sam_encoder_1024"] + f["sam_amg_32x32_points"])
    rows = {
        "label (COCO train)": TRAIN_IMAGES * stage1,
        "features (COCO train)": TRAIN_IMAGES * f["dino_518"],
        "evaluate, seven benchmarks, base": evaluate_base,
        "evaluate, seven benchmarks, refined": evaluate_base + refine,
    }
    print(f"\nper image: Stage 1 {stage1:.2f} TFLOP; at {args.tflops:.0f} TFLOP/s sustained:")
    for name, total in rows.items():
        print(f"{name:38s} {total:12.0f} TFLOP  {total / args.tflops / 3600:6.2f} h")


if __name__ == "__main__":
    main()
