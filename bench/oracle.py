"""Stage 2's ceiling on the demo world: the aligner trained on the unlabelled twin's TRUE labels.

The coco_train twin is written from a seeded plan (demoworld/synthetic.py), so its label
maps can be drawn again although the twin stores none. In a demo workspace (`fmbseg demo
--workspace DIR`, which has run label, balance and features), this trains the aligner with the
workspace's settings (``-S`` overrides them, as on the stage commands) on the same images, patches
and train index, with one of two label sources:

- ``--labels true``: the plan's label maps, resized into the SAM frame as Stage 1's are;
- ``--labels pseudo``: Stage 1's pseudo labels (what `fmbseg train` uses);

and prints how far Stage 1's labels agree with the true ones, how far the trained aligner agrees
with its training labels, and its patch accuracy on held-out world scenes (true labels, the
features stage's preprocessing). It writes the checkpoint to ``--out``; score it with

    fmbseg evaluate --dataset pv21 -S paths.checkpoint=OUT -S paths.metrics=DIR -S evaluate.refine=false

so that the gap between the two label sources, and between either and a benchmark, says where the
demo's Stage 2 loses its signal (docs/demo-world.md).

    python bench/oracle.py --workspace demo --labels true --out /tmp/oracle.pt -S train.loss=prototype
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

HELD_OUT_SEED_OFFSET = 7  # held-out scenes: the twin's plan with another seed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", type=Path, required=True, help="a demo workspace that has run features")
    parser.add_argument("--labels", choices=("true", "pseudo"), default="true")
    parser.add_argument("--out", type=Path, required=True, help="where the checkpoint goes")
    parser.add_argument("-S", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for this run (train.* or aligner.*), as `fmbseg train -S`")
    parser.add_argument("--held-out", type=int, default=60, help="held-out world scenes to score")
    args = parser.parse_args()
    os.chdir(args.workspace)

    from components.aligner.checkpoint import load_aligner, save_checkpoint
    from components.aligner.pooling import pool_labels
    from components.aligner.train import train_aligner
    from components.config import load_params
    from components.datasets.convert import apply_lut, cocostuff_lut
    from components.features.encode import DinoEncoder
    from components.labelling.store import PseudoLabels
    from components.models.clip_dense import prototypes as text_prototypes
    from components.models.dino import dino_preprocess
    from components.models.registry import get_spec
    from demoworld.synthetic import synthetic_scenes
    from flows.cli import parse_set
    from flows.common import cached_clip, cached_dino, output_root, project_path
    from flows.train import _manifest, _train_settings, _training_data

    params = load_params("params.yaml", parse_set(args.overrides))
    pseudo = PseudoLabels(output_root(params))
    side = params.label.label_size
    lut = cocostuff_lut("cs171")

    def true_label(raw: np.ndarray) -> np.ndarray:
        """A plan's raw COCO-Stuff map -> the 171-class map in the SAM frame (nearest), as Stage 1 writes."""
        return np.asarray(Image.fromarray(apply_lut(raw.astype(np.uint8), lut, what="plan")).resize(
            (side, side), Image.Resampling.NEAREST))

    scenes = synthetic_scenes("coco_train2017", num_images=params.download.synthetic_train_images
                              or params.download.synthetic_images, seed=params.download.seed)
    truth = {scene.id: true_label(scene.raw_label) for scene in scenes}
    index = pd.read_parquet(project_path(params, "train_index"))[["image_id", "variant"]].astype(str)
    missing = sorted(set(index["image_id"]) - set(truth))
    if missing:
        raise SystemExit(f"{len(missing)} train-index images are not in the twin's plan (e.g. {missing[0]}): "
                         "is this a demo workspace with its synthetic settings unchanged?")

    def agreement(pairs: list[tuple[np.ndarray, np.ndarray]], ignore: int) -> float:
        hits = total = 0
        for guess, want in pairs:
            valid = (guess != ignore) & (want != ignore)
            hits, total = hits + int((guess[valid] == want[valid]).sum()), total + int(valid.sum())
        return hits / max(total, 1)

    print(f"Stage 1 pseudo labels vs true labels (pixels both label): "
          f"{agreement([(pseudo.read(i, v), truth[i]) for i, v in index.to_numpy()], 255):.3f}")

    class Labels:
        vocabulary = pseudo.vocabulary

        def read(self, image_id: str, variant: str) -> np.ndarray:
            return truth[image_id] if args.labels == "true" else pseudo.read(image_id, variant)

    dataset, encoder = _training_data(params, Labels())
    clip = cached_clip(params.models.selected.clip, "cpu", params.models.weights_dir)
    with torch.no_grad():
        protos = text_prototypes(clip.model, clip.tokenizer, pseudo.vocabulary, list(params.label.templates)).float()
    settings = _train_settings(params, num_classes=protos.shape[0])
    print(settings)
    result = train_aligner(dataset, protos, settings, device="cpu", encoder=encoder,
                           on_epoch=lambda e, s: print(f"epoch {e + 1}: loss {s['loss']:.4f}"))
    model, unit = result.model, F.normalize(protos, dim=-1)

    def predict(features: torch.Tensor) -> torch.Tensor:  # [h, w, C] -> [h*w] class index
        return (F.normalize(model(features.flatten(0, 1)[None].float())[0], dim=-1) @ unit.T).argmax(-1)

    with torch.no_grad():
        fitted = agreement([(predict(item["features"]).numpy(), item["labels"].flatten().numpy())
                            for item in (dataset[i] for i in range(len(dataset)))], settings.ignore_index)
        manifest = _manifest(params)
        spec = get_spec(manifest["dino"])
        dino = DinoEncoder(cached_dino(spec.name, "cpu", params.models.weights_dir), device=torch.device("cpu"),
                           dtype="fp32")
        grid = manifest["image_size"] // spec.patch_size
        held_out = []
        for scene in synthetic_scenes("coco_train2017", num_images=args.held_out,
                                      seed=params.download.seed + HELD_OUT_SEED_OFFSET):
            want = pool_labels(torch.from_numpy(true_label(scene.raw_label).astype(np.int64)), (grid, grid), 255,
                               num_classes=protos.shape[0]).flatten()
            features = dino(dino_preprocess(scene.image, manifest["image_size"], spec.mean, spec.std))[0]
            held_out.append((predict(features).numpy(), want.numpy()))
    print(f"aligner vs its training labels ({args.labels}), patches: {fitted:.3f}")
    print(f"aligner vs true labels of {args.held_out} held-out scenes, patches: {agreement(held_out, 255):.3f}")

    base = load_aligner(project_path(params, "checkpoint"))
    save_checkpoint(args.out, model=model.cpu(), encoder_spec=base.encoder_spec, image_size=base.image_size,
                    text_spec=base.text_spec, templates=base.templates, class_names=pseudo.vocabulary,
                    prototypes=protos, inference=base.inference, params={"oracle_labels": args.labels},
                    mlflow_run_id=None)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
