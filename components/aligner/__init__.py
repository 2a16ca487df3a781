"""Stage 2: the alignment module, its losses (TSupCon, Eq. 1-4) and patch-level label pooling.

The names below load on first use, so that components.aligner.settings (plain values, what
components/config/ builds on) is importable without torch.
"""

from __future__ import annotations

from components.lazy import lazy_exports

_WHERE = {
    "ALIGNER_KINDS": "settings",
    "LOSSES": "losses",
    "Aligner": "model",
    "LossFn": "losses",
    "get_loss": "losses",
    "pool_labels": "pooling",
    "prototype_loss": "losses",
    "supcon_loss": "losses",
    "tsupcon_loss": "losses",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
