"""Foundation models: the registry (CLIP, SAM, DINOv2), their weights and their feature functions.

The names below load on first use, so that components.models.dense_modes (plain values, what
components/labelling/settings.py and components/config/ build on) is importable without torch.
"""

from __future__ import annotations

from components.lazy import lazy_exports

_WHERE = {
    "DENSE_MODES": "dense_modes",
    "MODES": "clip_dense",
    "ClipBundle": "registry",
    "DenseFeatures": "clip_dense",
    "DenseMode": "dense_modes",
    "MissingWeightsError": "weights",
    "ModelSpec": "specs",
    "MaskImage": "masks",
    "PointMask": "masks",
    "SamImage": "sam",
    "WeightFile": "specs",
    "WeightStatus": "weights",
    "autocast_context": "registry",
    "build_clip": "registry",
    "build_dino": "registry",
    "build_sam": "registry",
    "build_teacher": "registry",
    "embed_image": "masks",
    "clip_preprocess": "clip_dense",
    "dense_features": "clip_dense",
    "dino_preprocess": "dino",
    "fetch_weights": "weights",
    "get_spec": "registry",
    "list_specs": "registry",
    "patch_features": "dino",
    "prototypes": "clip_dense",
    "resolve_device": "registry",
    "tiled_features": "clip_dense",
    "weights_status": "weights",
}
__all__ = sorted(_WHERE)

__getattr__ = lazy_exports(__name__, _WHERE)
