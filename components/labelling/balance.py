"""Balancing Stage 1.1 and Stage 1.2 pseudo labels into a training index (appendix §2.1, Table 2).

Stage 1.2 annotates every SAM mask, so it yields far more labelled pixels than Stage 1.1; the
paper trains on all Stage 1.1 maps plus a random 75% of the images' Stage 1.2 maps, each map a
separate training sample. An image a person corrected (components.labelling.corrections) trains on
its corrected map alone: the correction takes precedence over both of Stage 1's maps.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping

import numpy as np
import pandas as pd

__all__ = ["INDEX_COLUMNS", "VARIANTS", "CORRECTED", "balance_index"]

VARIANTS: tuple[str, str] = ("stage1_1", "stage1_2")
CORRECTED = "corrected"  # the variant of a corrected map (components.labelling.corrections)
INDEX_COLUMNS: tuple[str, ...] = ("sample_id", "image_id", "image_path", "variant", "shard", "row")
_RECORD_COLUMNS: tuple[str, ...] = ("image_id", "image_path", "shard", "row")


def balance_index(records: pd.DataFrame, ratio: float, seed: int, shares: Mapping[str, float] | None = None,
                  corrected: pd.DataFrame | None = None) -> pd.DataFrame:
    """The training index: every image's Stage 1.1 map plus ``ratio`` of the images' Stage 1.2 maps.

    records: one row per labelled image with columns image_id (unique), image_path, shard, row
    (where its maps are stored). The Stage 1.2 images are the first round(ratio · n) of
    ``np.random.Generator(PCG64(seed)).permutation`` over the sorted image ids (halves round up),
    so the result depends on (records, ratio, seed) only. Returns a DataFrame with
    :data:`INDEX_COLUMNS`, sorted by (image_id, variant); sample_id = "<image_id>/<variant>".

    shares: the share of the images per variant (params.yaml ``balance.variants`` over the paper's
    {stage1_1: 1.0, stage1_2: ratio}), e.g. {"stage1_sam3": 1.0}. Stage 1.2 keeps the permutation
    above; any other variant with a share below 1 draws its own, seeded by (seed, crc32 of its name).
    corrected: images with a corrected map (columns image_id, shard, row: where the map is); each
    such image of ``records`` has that map as its one sample (variant :data:`CORRECTED`) instead of
    its Stage 1 samples. The Stage 1.2 choice of the other images does not depend on it.
    """
    missing = [c for c in _RECORD_COLUMNS if c not in records.columns]
    if missing:
        raise ValueError(f"records lack columns {missing}; need {list(_RECORD_COLUMNS)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"balance ratio must be in [0, 1], got {ratio}")
    if records["image_id"].duplicated().any():
        dupes = records.loc[records["image_id"].duplicated(), "image_id"].head(5).tolist()
        raise ValueError(f"image ids must be unique, repeated: {dupes}")
    base = records.loc[:, list(_RECORD_COLUMNS)].sort_values("image_id", kind="stable").reset_index(drop=True)
    n = len(base)
    parts = []
    for variant, share in {VARIANTS[0]: 1.0, VARIANTS[1]: ratio, **(shares or {})}.items():
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"the share of {variant} must be in [0, 1], got {share}")
        rng = np.random.default_rng(seed if variant == VARIANTS[1] else [seed, zlib.crc32(variant.encode())])
        chosen = np.arange(n) if share == 1.0 else rng.permutation(n)[: math.floor(share * n + 0.5)]
        parts.append(base.iloc[np.sort(chosen)].assign(variant=variant))
    if corrected is not None and len(corrected):
        fixed = base.loc[base["image_id"].isin(corrected["image_id"]), ["image_id", "image_path"]]
        fixed = fixed.merge(corrected.loc[:, ["image_id", "shard", "row"]], on="image_id").assign(variant=CORRECTED)
        parts = [p.loc[~p["image_id"].isin(fixed["image_id"])] for p in parts] + [fixed]
    index = pd.concat(parts, ignore_index=True)
    index = index.sort_values(["image_id", "variant"], kind="stable").reset_index(drop=True)
    index.insert(0, "sample_id", index["image_id"] + "/" + index["variant"])
    index["row"] = index["row"].astype("int64")
    return index.loc[:, list(INDEX_COLUMNS)]
