"""CLIP's dense feature modes, declared once: plain values, importable without torch.

components/models/clip_dense.py computes them; components/labelling/settings.py (Stage 1's
``dense_mode``) and components/config/schemas.py (params.yaml ``label.dense_mode``) type theirs with
:data:`DenseMode`.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["DenseMode", "DENSE_MODES"]

# how CLIP's last block turns into per-patch features (components/models/clip_dense.py)
DenseMode = Literal["vanilla", "maskclip", "fmbseg", "clearclip"]
DENSE_MODES: tuple[str, ...] = get_args(DenseMode)
