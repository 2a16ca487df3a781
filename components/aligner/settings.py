"""The settings of Stage 2 training, declared once: plain values, importable without torch.

components/config/schemas.py builds params.yaml's ``aligner`` and ``train`` sections on these names (the
same Literal aliases), and flows/common.py ``train_settings`` fills :class:`TrainSettings` from
them by field name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

__all__ = ["AlignerKind", "LossName", "ALIGNER_KINDS", "LOSS_NAMES", "TrainSettings"]

# the alignment module M (paper §3.3; Table 3 ablates the lighter two)
AlignerKind = Literal["transformer", "mlp", "linear"]
# the training loss (Table 3): TSupCon (Eq. 1), the prototype cross-entropy, plain SupCon
LossName = Literal["tsupcon", "prototype", "supcon"]
ALIGNER_KINDS: tuple[str, ...] = get_args(AlignerKind)
LOSS_NAMES: tuple[str, ...] = get_args(LossName)


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines the trained weights, besides the data and the prototypes."""

    in_dim: int  # encoder width C
    kind: AlignerKind
    num_heads: int
    loss: LossName
    temperature: float  # τ: every similarity is divided by it
    lr: float
    momentum: float
    weight_decay: float
    epochs: int
    batch_size: int  # images per step
    seed: int  # model init and shuffling
    ignore_index: int = 255
