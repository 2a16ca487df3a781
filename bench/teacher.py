"""Teacher against student: seconds per image to label with SAM 3 and to segment with the student
(a DINOv3 student and the one-block aligner, base prediction), at vocabularies of 21, 171 and 847
classes, on the same images. Real architectures (``facebook/sam3``'s config, the student and text
specs of the registry) with random weights: the cost is the architecture's, not the weights'.

Per image, SAM 3 pays one vision pass (fixed) and one detector pass per prompt (decoded
``--chunk`` prompts at a time against the cached vision features); the vocabulary's text pass is
paid once per vocabulary and reported apart. Its detector cost is linear in the prompts by
construction, so by default it is timed on ``--probe`` chunks and extrapolated to each vocabulary
(the table says so); ``--full`` decodes every prompt. The student pays one sliding-window
encoder pass and a [K, H, W] cosine map per image; its prototypes are computed once per
vocabulary (also apart).

    python bench/teacher.py [--classes 21,171,847] [--student dinov3_vitl16] [--text ViT-L-14-336/openai]
                            [--chunk 16] [--probe 2] [--full] [--images 1] [--device auto]
                            [--skip-teacher | --skip-student]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Sam3Config, Sam3Model

from components.aligner.checkpoint import InferenceSpec
from components.aligner.model import Aligner
from components.datasets.registry import class_file_path, display_name, read_class_file
from components.labelling.concepts import ConceptSettings, fuse_concepts, prompt_order
from components.labelling.settings import AmgSettings
from components.models import build_clip, build_dino, get_spec, resolve_device
from components.models.registry import _tokenizer
from components.models.sam3 import SAM3_CONTEXT, Sam3Teacher
from components.segmenter import Segmenter

IMAGE_HW = (480, 640)
VOCABULARIES = {21: "voc21", 171: "cocostuff171", 847: "ade847"}


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _classes(count: int) -> list[str]:
    name = VOCABULARIES.get(count)
    if name is None:
        raise SystemExit(f"--classes: {count} has no shipped vocabulary; choose from {sorted(VOCABULARIES)}")
    return [display_name(line) for line in read_class_file(class_file_path(name))]


def teacher_rows(images: list[np.ndarray], counts: list[int], device: torch.device, chunk: int, probe: int,
                 full: bool) -> list[dict[str, object]]:
    torch.manual_seed(0)
    model = Sam3Model(Sam3Config()).eval().requires_grad_(False).to(device)
    teacher = Sam3Teacher(model, _tokenizer(SAM3_CONTEXT), image_size=model.config.image_size)
    settings = ConceptSettings(chunk_size=chunk)
    rows = []
    for count in counts:
        classes = _classes(count)
        start = _clock(device)
        vocabulary = teacher.encode_vocabulary(classes)
        text_s = _clock(device) - start
        order = prompt_order(torch.arange(count))
        vision_s, decode_s, decoded = 0.0, 0.0, 0
        for image in images:
            start = _clock(device)
            vision = teacher.encode_image(image)
            vision_s += _clock(device) - start
            todo = order if full else order[: probe * chunk]
            start = _clock(device)
            fuse_concepts(teacher.iter_chunks(vision, vocabulary, todo, chunk), torch.arange(count), count,
                          image.shape[:2], settings)
            decode_s += _clock(device) - start
            decoded += int(todo.numel())
        per_prompt = decode_s / decoded
        fixed = vision_s / len(images)
        rows.append({"model": "SAM 3 teacher", "classes": count, "fixed_s": fixed, "per_class_s": per_prompt,
                     "per_image_s": fixed + per_prompt * count, "vocabulary_once_s": text_s,
                     "measured": "all prompts" if full else f"{decoded // len(images)} prompts, extrapolated"})
    return rows


def student_rows(images: list[np.ndarray], counts: list[int], device: torch.device, student: str, text: str,
                 short_side: int) -> list[dict[str, object]]:
    dino_spec, clip = get_spec(student), build_clip(text, device=device, random_weights=True)
    torch.manual_seed(0)
    aligner = Aligner(dino_spec.embed_dim, clip.spec.embed_dim, kind="transformer").eval().to(device)
    window = short_side - short_side % dino_spec.patch_size
    segmenter = Segmenter(
        aligner=aligner, dino=build_dino(student, device=device, random_weights=True), dino_spec=dino_spec,
        clip=clip, inference=InferenceSpec(sam="vit_h", templates=("a photo of a {}.",), short_side=window,
                                           window=window, stride=window // 2,
                                           amg=AmgSettings(min_area_frac=0.0, max_area_frac=1.0)),
        device=device,
    )
    rows = []
    for count in counts:
        classes = _classes(count)
        start = _clock(device)
        segmenter.vocabulary(classes)
        text_s = _clock(device) - start
        segmenter.segment(images[0], classes)  # warm-up
        start = _clock(device)
        for image in images:
            segmenter.segment(image, classes)
        per_image = (_clock(device) - start) / len(images)
        rows.append({"model": f"student {student} + aligner (base)", "classes": count, "per_image_s": per_image,
                     "vocabulary_once_s": text_s, "measured": "all classes"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", default="21,171,847")
    parser.add_argument("--student", default="dinov3_vitl16")
    parser.add_argument("--text", default="ViT-L-14-336/openai")
    parser.add_argument("--short-side", type=int, default=448)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--probe", type=int, default=2, help="chunks decoded per image and vocabulary (not --full)")
    parser.add_argument("--full", action="store_true", help="decode every prompt instead of extrapolating")
    parser.add_argument("--images", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-teacher", action="store_true")
    parser.add_argument("--skip-student", action="store_true",
                        help="time the teacher only (needs no student spec: e.g. before dinov3_vitl16 is registered)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    counts = [int(c) for c in args.classes.split(",")]
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (*IMAGE_HW, 3), dtype=np.uint8) for _ in range(args.images)]
    torch.set_grad_enabled(False)
    rows = [] if args.skip_student else student_rows(images, counts, device, args.student, args.text, args.short_side)
    if not args.skip_teacher:
        rows += teacher_rows(images, counts, device, args.chunk, args.probe, args.full)
    print(f"device {device}, {args.images} image(s) of {IMAGE_HW[1]}x{IMAGE_HW[0]}, random weights")
    print("| model | classes | s / image | fixed s | s / class | vocabulary once, s | measured |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        fixed = f"{r['fixed_s']:.2f}" if "fixed_s" in r else ""
        per_class = f"{r['per_class_s']:.3f}" if "per_class_s" in r else ""
        print(f"| {r['model']} | {r['classes']} | {r['per_image_s']:.2f} | {fixed} | {per_class} | "
              f"{r['vocabulary_once_s']:.2f} | {r['measured']} |")
    teacher = {r["classes"]: r for r in rows if r["model"] == "SAM 3 teacher"}
    student = {r["classes"]: r for r in rows if r["model"] != "SAM 3 teacher"}
    for count in counts:
        if count in teacher and count in student:
            t = teacher[count]
            print(f"{count} classes: student {t['per_image_s'] / student[count]['per_image_s']:.1f}x faster; "
                  f"one class costs the teacher {t['per_class_s'] / t['fixed_s']:.3f} of its fixed cost")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
