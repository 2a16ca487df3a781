"""Stage 2 input: frozen DINOv2 patch features, cached as fp16 shards or computed on the fly."""

from components.features.cache import (
    FeatureCache,
    finalize_cache,
    plan_cache,
    read_manifest,
    settings_hash,
    unique_images,
    write_shard,
    write_uncached_manifest,
)
from components.features.encode import DinoEncoder, PixelSource, encode_images, load_pixels

__all__ = [
    "DinoEncoder",
    "FeatureCache",
    "PixelSource",
    "encode_images",
    "finalize_cache",
    "load_pixels",
    "plan_cache",
    "read_manifest",
    "settings_hash",
    "unique_images",
    "write_shard",
    "write_uncached_manifest",
]
