"""Stage 2: the alignment module, its losses (TSupCon, Eq. 1-4) and patch-level label pooling."""

from components.aligner.losses import LOSSES, LossFn, get_loss, prototype_loss, supcon_loss, tsupcon_loss
from components.aligner.model import ALIGNER_KINDS, Aligner
from components.aligner.pooling import pool_labels

__all__ = [
    "ALIGNER_KINDS",
    "LOSSES",
    "Aligner",
    "LossFn",
    "get_loss",
    "pool_labels",
    "prototype_loss",
    "supcon_loss",
    "tsupcon_loss",
]
