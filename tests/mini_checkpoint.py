"""A random-weight aligner checkpoint over the miniature models (what a demo-profile train writes)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from components.aligner.checkpoint import InferenceSpec, save_checkpoint
from components.aligner.model import Aligner
from components.labelling.settings import AmgSettings

MINI_INFERENCE = InferenceSpec(
    sam="mini-sam", templates=("a photo of a {}.",), short_side=56, window=56, stride=28,
    amg=AmgSettings(points_per_side=4, points_per_batch=16, pred_iou_thresh=0.0, stability_score_thresh=0.0,
                    min_area_frac=0.0, max_area_frac=1.0),
)


def write_mini_checkpoint(path: Path, *, class_names: Sequence[str] = ("thing", "stuff"),
                          inference: InferenceSpec = MINI_INFERENCE, encoder_spec: str = "mini-dino",
                          text_spec: str = "mini-clip", run_id: str | None = None, seed: int = 0) -> Path:
    """A seeded random transformer aligner (32 -> 32) trained on nothing, with `class_names` as its
    training vocabulary."""
    torch.manual_seed(seed)
    return save_checkpoint(
        path, model=Aligner(32, 32, kind="transformer", num_heads=4), encoder_spec=encoder_spec, image_size=56,
        text_spec=text_spec, templates=["a photo of a {}."], class_names=list(class_names),
        prototypes=F.normalize(torch.randn(len(class_names), 32), dim=-1), inference=inference, params={},
        mlflow_run_id=run_id,
    )
