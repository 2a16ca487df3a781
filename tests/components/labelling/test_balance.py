"""The Stage 1.1 / Stage 1.2 balance of the training index (appendix §2.1, Table 2)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from components.labelling.balance import INDEX_COLUMNS, balance_index


def _records(n: int) -> pd.DataFrame:
    ids = [f"im{i:04d}" for i in range(n)]
    rng = np.random.default_rng(5)
    order = rng.permutation(n)  # records arrive in any order
    return pd.DataFrame(
        {
            "image_id": [ids[i] for i in order],
            "image_path": [f"data/images/{ids[i]}.jpg" for i in order],
            "shard": [f"data/pseudo/stage1/shards/s{i // 7}.parquet" for i in order],
            "row": [i % 7 for i in order],
        }
    )


@pytest.mark.parametrize("ratio, expected", [(0.0, 0), (0.33, 13), (0.75, 30), (1.0, 40)])
def test_every_stage1_1_map_and_a_ratio_of_stage1_2_maps(ratio: float, expected: int) -> None:
    records = _records(40)
    index = balance_index(records, ratio, seed=0)
    assert tuple(index.columns) == INDEX_COLUMNS
    assert (index["variant"] == "stage1_1").sum() == 40
    assert (index["variant"] == "stage1_2").sum() == expected
    assert set(index.loc[index["variant"] == "stage1_1", "image_id"]) == set(records["image_id"])
    assert index["sample_id"].is_unique
    assert (index["sample_id"] == index["image_id"] + "/" + index["variant"]).all()
    merged = index.merge(records, on="image_id", suffixes=("", "_rec"))
    assert (merged["shard"] == merged["shard_rec"]).all() and (merged["row"] == merged["row_rec"]).all()
    assert (merged["image_path"] == merged["image_path_rec"]).all()


def test_the_choice_is_the_seeded_permutation_over_sorted_ids() -> None:
    records = _records(10)
    index = balance_index(records, 0.75, seed=3)
    ids = sorted(records["image_id"])
    chosen = sorted(ids[i] for i in np.random.default_rng(3).permutation(10)[:8])  # round(7.5) = 8: halves round up
    assert index.loc[index["variant"] == "stage1_2", "image_id"].tolist() == chosen


def test_deterministic_for_a_seed_and_independent_of_record_order() -> None:
    records = _records(50)
    a = balance_index(records, 0.75, seed=1)
    b = balance_index(records.sample(frac=1.0, random_state=9), 0.75, seed=1)
    pd.testing.assert_frame_equal(a, b)
    c = balance_index(records, 0.75, seed=2)
    assert set(c.loc[c["variant"] == "stage1_2", "image_id"]) != set(a.loc[a["variant"] == "stage1_2", "image_id"])


def test_bad_input_is_refused() -> None:
    records = _records(4)
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\]"):
        balance_index(records, 1.5, seed=0)
    with pytest.raises(ValueError, match="lack columns"):
        balance_index(records.drop(columns=["shard"]), 0.5, seed=0)
    with pytest.raises(ValueError, match="unique"):
        balance_index(pd.concat([records, records.iloc[:1]]), 0.5, seed=0)


def test_a_corrected_image_trains_on_its_corrected_map_alone() -> None:
    records = _records(40)
    plain = balance_index(records, 0.75, seed=0)
    corrected = pd.DataFrame({"image_id": ["im0003", "im0017", "not-in-the-store"],
                              "shard": "data/pseudo/corrections/corrections.parquet", "row": [0, 1, 2]})
    index = balance_index(records, 0.75, seed=0, corrected=corrected)
    fixed = index.loc[index["image_id"].isin(["im0003", "im0017"])]
    assert fixed["sample_id"].tolist() == ["im0003/corrected", "im0017/corrected"]
    assert fixed["row"].tolist() == [0, 1] and fixed["image_path"].tolist() == [
        "data/images/im0003.jpg", "data/images/im0017.jpg"]
    others = plain.loc[~plain["image_id"].isin(["im0003", "im0017"])].reset_index(drop=True)
    assert index.loc[~index["image_id"].isin(["im0003", "im0017"])].reset_index(drop=True).equals(others)
