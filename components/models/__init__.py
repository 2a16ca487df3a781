"""Foundation models: the registry (CLIP, SAM, DINOv2), their weights and their feature functions."""

from components.models.clip_dense import (
    MODES,
    DenseFeatures,
    clip_preprocess,
    dense_features,
    prototypes,
    tiled_features,
)
from components.models.dino import dino_preprocess, patch_features
from components.models.registry import (
    ClipBundle,
    ModelSpec,
    autocast_context,
    build_clip,
    build_dino,
    build_sam,
    get_spec,
    list_specs,
    resolve_device,
)
from components.models.sam import PointMask, SamImage
from components.models.weights import (
    MissingWeightsError,
    WeightFile,
    WeightStatus,
    fetch_weights,
    weights_status,
)

__all__ = [
    "MODES",
    "ClipBundle",
    "DenseFeatures",
    "MissingWeightsError",
    "ModelSpec",
    "PointMask",
    "SamImage",
    "WeightFile",
    "WeightStatus",
    "autocast_context",
    "build_clip",
    "build_dino",
    "build_sam",
    "clip_preprocess",
    "dense_features",
    "dino_preprocess",
    "fetch_weights",
    "get_spec",
    "list_specs",
    "patch_features",
    "prototypes",
    "resolve_device",
    "tiled_features",
    "weights_status",
]
