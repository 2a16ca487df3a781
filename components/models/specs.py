"""What names a model: :class:`ModelSpec` (architecture, geometry, normalisation) and the
:class:`WeightFile` records of the files a real spec loads.

Plain frozen records: the registry (registry.py) builds them, the weights module (weights.py)
finds and fetches their files; neither imports the other for them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["Family", "FAMILIES", "ModelSpec", "WeightFile"]

# The concept teacher (SAM 3, Stage 1's own variant stage1_sam3) is a family of its own, not a mask
# model (it segments noun phrases, not points), built by the registry's ``build_teacher``.
Family = Literal["clip", "sam", "dino", "teacher"]
FAMILIES: tuple[str, ...] = ("clip", "sam", "dino", "teacher")


@dataclass(frozen=True)
class WeightFile:
    """One file a real spec needs and where it comes from.

    names: accepted file names, preferred first (e.g. safetensors before a pickle).
    local_dir: folder under the weights dir that may hold the file.
    url / sha256: direct download and the hex sha256 of the published file (None: not recorded).
    hub_repo: Hugging Face repo that holds the file under one of ``names``.
    size: bytes of the published file where recorded, else None.
    bundled: a copy shipped with the project, looked in last (the world stand-ins' files).
    gated: the hub repo asks each user to accept its licence first; downloads then need a token.
    """

    names: tuple[str, ...]
    local_dir: str
    url: str | None = None
    sha256: str | None = None
    hub_repo: str | None = None
    size: int | None = None
    bundled: Path | None = None
    gated: bool = False

    @property
    def name(self) -> str:
        """The preferred file name."""
        return self.names[0]


@dataclass(frozen=True)
class ModelSpec:
    """One named model.

    image_size: CLIP input side S; SAM encoder ``img_size``; a student's default input side (÷ patch_size).
    patch_size: ViT patch side in pixels.
    embed_dim: CLIP joint embedding dim D; SAM encoder output channels; a student's hidden size C.
    mean / std: per-channel RGB normalisation for pixels in [0, 1] (SAM's ``pixel_mean`` /
        ``pixel_std`` are these × 255; SAM normalises inside the model).
    weights: files a real spec loads (empty for miniatures).
    architecture: what builds it -- an open_clip model config name (real CLIP), a
        segment_anything ``sam_model_registry`` key (real SAM), or a JSON file in ``configs/``
        (miniatures; DINOv2).
    pretrained_tag: open_clip pretrained tag (real CLIP only).
    hub_repo: Hugging Face repo of the weights (real students and SAM 2.1).
    prefix_tokens: tokens before the patch tokens in the encoder's output (a student's class token
        plus its register tokens: 1 for DINOv2, 5 for DINOv2 with registers and DINOv3).
    licence: the licence the weights are published under, as their model card states it.
    """

    name: str
    family: Family
    miniature: bool
    image_size: int
    patch_size: int
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    architecture: str
    weights: tuple[WeightFile, ...] = ()
    pretrained_tag: str | None = None
    hub_repo: str | None = None
    prefix_tokens: int = 0
    licence: str = ""

    @property
    def gated(self) -> bool:
        """The hub asks each user to accept the licence first (downloads then need ``HF_TOKEN``)."""
        return any(f.gated for f in self.weights)

    @property
    def seed(self) -> int:
        """Seed of a miniature's random weights: fixed per name."""
        return zlib.crc32(self.name.encode())
