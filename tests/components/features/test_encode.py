"""The DINOv2 feature cache (components/features) with the miniature DINOv2 and real image files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from components.datasets.readers import read_image_rgb
from components.features.cache import (
    INDEX_COLUMNS,
    FeatureCache,
    finalize_cache,
    plan_cache,
    read_manifest,
    settings_hash,
    unique_images,
    write_shard,
    write_uncached_manifest,
)
from components.features.encode import DinoEncoder, encode_images
from components.models.dino import dino_preprocess, patch_features
from components.models.registry import IMAGENET_MEAN, IMAGENET_STD, build_dino, get_spec

SIZE = 56  # a 4 x 4 patch grid



@pytest.fixture(scope="module")
def encoder() -> DinoEncoder:
    return DinoEncoder(build_dino("mini-dino"), device=torch.device("cpu"), dtype="fp32")


def write_image(path: Path, seed: int, size: tuple[int, int] = (40, 30)) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def make_index(root: Path, ids: list[str], seed: int = 0) -> pd.DataFrame:
    """A train index over PNG images under root/images (both variants for the even ones)."""
    rows = []
    for k, image_id in enumerate(ids):
        path = f"images/{image_id}.png"
        write_image(root / path, seed + k, size=(40 + 7 * k, 30 + 3 * k))
        variants = ["stage1_1", "stage1_2"] if k % 2 == 0 else ["stage1_1"]
        rows += [{"image_id": image_id, "image_path": path, "variant": v} for v in variants]
    return pd.DataFrame(rows)


def build_cache(root: Path, images, encoder: DinoEncoder, *, shard_size: int, size: int = SIZE, only: int | None = None,
                precision: str = "fp32", dino: str = "mini-dino"):
    settings = settings_hash(dino, size, precision=precision)
    plan = plan_cache(root / "features", images, settings=settings, shard_size=shard_size)
    for shard in plan.todo[:only]:
        write_shard(root / "features", shard, encoder, settings=settings, project_root=root, image_size=size,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, batch_size=2, num_workers=2)
    return plan


def test_cache_holds_each_images_patch_features(tmp_path, encoder) -> None:
    index = make_index(tmp_path, ["b", "a", "c", "d", "e"])
    images = unique_images(index, tmp_path, num_workers=2)
    assert [im.image_id for im in images] == ["a", "b", "c", "d", "e"]  # one per image, sorted
    plan = build_cache(tmp_path, images, encoder, shard_size=2)
    assert [len(s.images) for s in plan.todo] == [2, 2, 1] and not plan.done
    manifest = finalize_cache(tmp_path / "features", images, dino="mini-dino", image_size=SIZE, precision="fp32")
    assert manifest == read_manifest(tmp_path / "features")
    assert (manifest["cache"], manifest["grid"], manifest["dim"], manifest["num_images"], manifest["num_shards"]) == (
        True, [4, 4], 32, 5, 3)
    table = pd.read_parquet(tmp_path / "features" / "index.parquet")
    assert tuple(table.columns) == INDEX_COLUMNS and table["image_id"].tolist() == ["a", "b", "c", "d", "e"]

    cache = FeatureCache(tmp_path / "features")
    assert len(cache) == 5 and cache.grid == (4, 4) and cache.dim == 32 and "c" in cache
    for image_id, path in zip(index["image_id"], index["image_path"], strict=True):
        pixels = np.array(Image.open(tmp_path / path).convert("RGB"))
        with torch.no_grad():
            expected = patch_features(encoder.model, dino_preprocess(pixels, SIZE))[0]
        got = cache.read(image_id)
        assert got.shape == (4, 4, 32) and got.dtype == np.float16
        torch.testing.assert_close(torch.from_numpy(got).float(), expected, atol=2e-3, rtol=2e-3)
    assert torch.equal(cache.sample("a", "ignored")["features"], torch.from_numpy(cache.read("a")))
    with pytest.raises(KeyError, match="no cached features"):
        cache.read("zzz")
    clone = pickle.loads(pickle.dumps(cache))  # a DataLoader worker maps the shards itself
    assert clone._maps == {} and np.array_equal(clone.read("e"), cache.read("e"))


def test_resume_and_incremental_runs_encode_only_what_is_missing(tmp_path, encoder) -> None:
    index = make_index(tmp_path, ["a", "b", "c", "d", "e"])
    images = unique_images(index, tmp_path, num_workers=0)
    build_cache(tmp_path, images, encoder, shard_size=2, only=1)  # killed after the first shard
    resumed = build_cache(tmp_path, images, encoder, shard_size=2)
    assert len(resumed.done) == 1 and sum(len(s.images) for s in resumed.todo) == 3
    assert not build_cache(tmp_path, images, encoder, shard_size=2).todo  # complete: nothing to do
    finalize_cache(tmp_path / "features", images, dino="mini-dino", image_size=SIZE, precision="fp32")
    before = FeatureCache(tmp_path / "features").read("b")

    # a new image and a changed one: only those two are encoded
    more = pd.concat([index, make_index(tmp_path, ["f"], seed=50)], ignore_index=True)
    write_image(tmp_path / "images" / "c.png", seed=99)
    images2 = unique_images(more, tmp_path, num_workers=2)
    plan = build_cache(tmp_path, images2, encoder, shard_size=2)
    assert [[im.image_id for im in s.images] for s in plan.todo] == [["c", "f"]]
    finalize_cache(tmp_path / "features", images2, dino="mini-dino", image_size=SIZE, precision="fp32")
    cache = FeatureCache(tmp_path / "features")
    assert len(cache) == 6 and np.array_equal(cache.read("b"), before)

    # another input size: everything again, and the old shards go
    plan = build_cache(tmp_path, images2, encoder, shard_size=4, size=28)
    assert not plan.done and sum(len(s.images) for s in plan.todo) == 6
    manifest = finalize_cache(tmp_path / "features", images2, dino="mini-dino", image_size=28, precision="fp32")
    assert manifest["grid"] == [2, 2]
    assert len(list((tmp_path / "features" / "shards").glob("*.npy"))) == manifest["num_shards"] == 2


def test_precision_is_part_of_the_key(tmp_path, encoder) -> None:
    # bf16 features are not fp32 ones: switching models.dtype encodes everything again
    assert settings_hash("mini-dino", SIZE, precision="bf16") != settings_hash("mini-dino", SIZE, precision="fp32")
    images = unique_images(make_index(tmp_path, ["a", "b"]), tmp_path, num_workers=0)
    build_cache(tmp_path, images, encoder, shard_size=2, precision="bf16")
    assert finalize_cache(tmp_path / "features", images, dino="mini-dino", image_size=SIZE,
                          precision="bf16")["precision"] == "bf16"
    with pytest.raises(RuntimeError, match="2 images have no features"):
        finalize_cache(tmp_path / "features", images, dino="mini-dino", image_size=SIZE, precision="fp32")
    plan = build_cache(tmp_path, images, encoder, shard_size=2, precision="fp32")
    assert not plan.done and sum(len(s.images) for s in plan.todo) == 2


def test_the_student_spec_is_part_of_the_key(tmp_path, encoder) -> None:
    """Switching the student (DINOv2 -> DINOv3) never reuses the other encoder's features."""
    assert settings_hash("mini-dino", 112, precision="fp32") != settings_hash("mini-dinov3", 112, precision="fp32")
    images = unique_images(make_index(tmp_path, ["a", "b", "c"]), tmp_path, num_workers=0)
    build_cache(tmp_path, images, encoder, shard_size=2)
    finalize_cache(tmp_path / "features", images, dino="mini-dino", image_size=SIZE, precision="fp32")
    v3 = DinoEncoder(build_dino("mini-dinov3"), device=torch.device("cpu"), dtype="fp32")
    side = 4 * get_spec("mini-dinov3").patch_size
    plan = build_cache(tmp_path, images, v3, shard_size=2, size=side, dino="mini-dinov3")
    assert not plan.done and sum(len(s.images) for s in plan.todo) == 3
    manifest = finalize_cache(tmp_path / "features", images, dino="mini-dinov3", image_size=side, precision="fp32")
    assert manifest["dino"] == "mini-dinov3" and manifest["grid"] == [4, 4] and manifest["num_shards"] == 2
    assert len(list((tmp_path / "features" / "shards").glob("*.npy"))) == 2  # DINOv2's shards are gone
    pixels = dino_preprocess(read_image_rgb(tmp_path / "images" / "b.png"), side)
    expected = patch_features(v3.model, pixels)[0].half().numpy()
    np.testing.assert_array_equal(FeatureCache(tmp_path / "features").read("b"), expected)


def test_a_killed_runs_temporary_files_are_removed_by_the_next_plan(tmp_path, encoder) -> None:
    index = make_index(tmp_path, ["a", "b"])
    images = unique_images(index, tmp_path, num_workers=0)
    build_cache(tmp_path, images, encoder, shard_size=1, only=1)
    shards = tmp_path / "features" / "shards"
    leftover = shards / ".0123abcd.npy.k2j3h4.npy.tmp"  # what atomic_path leaves when killed
    leftover.write_bytes(b"half a shard")
    plan = build_cache(tmp_path, images, encoder, shard_size=1, only=0)
    assert not leftover.exists() and len(plan.done) == 1


def test_a_truncated_feature_shard_is_redone(tmp_path, encoder, caplog) -> None:
    images = unique_images(make_index(tmp_path, ["a", "b"]), tmp_path, num_workers=0)
    build_cache(tmp_path, images, encoder, shard_size=1)
    shard = sorted((tmp_path / "features" / "shards").glob("*.npy"))[0]
    shard.write_bytes(shard.read_bytes()[:-64])
    with caplog.at_level("WARNING"):
        plan = build_cache(tmp_path, images, encoder, shard_size=1, only=0)
    assert len(plan.done) == 1 and len(plan.todo) == 1 and "damaged" in caplog.text


def test_finalize_refuses_missing_features(tmp_path, encoder) -> None:
    images = unique_images(make_index(tmp_path, ["a", "b", "c"]), tmp_path, num_workers=0)
    build_cache(tmp_path, images, encoder, shard_size=2, only=1)
    with pytest.raises(RuntimeError, match="1 images have no features"):
        finalize_cache(tmp_path / "features", images, dino="mini-dino", image_size=SIZE, precision="fp32")


def test_uncached_manifest_replaces_the_cache(tmp_path, encoder) -> None:
    images = unique_images(make_index(tmp_path, ["a"]), tmp_path, num_workers=0)
    build_cache(tmp_path, images, encoder, shard_size=2)
    finalize_cache(tmp_path / "features", images, dino="mini-dino", image_size=SIZE, precision="fp32")
    manifest = write_uncached_manifest(tmp_path / "features", dino="mini-dino", image_size=SIZE, precision="fp32")
    assert manifest["cache"] is False and read_manifest(tmp_path / "features") == manifest
    assert not list((tmp_path / "features" / "shards").iterdir())
    assert not (tmp_path / "features" / "index.parquet").exists()
    with pytest.raises(ValueError, match="no cached features"):
        FeatureCache(tmp_path / "features")


def test_bad_inputs(tmp_path) -> None:
    index = make_index(tmp_path, ["a", "b"])
    with pytest.raises(ValueError, match="more than one path"):
        unique_images(pd.concat([index, index.assign(image_path="images/b.png")]), tmp_path, num_workers=0)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        unique_images(index.assign(image_path="images/missing.png"), tmp_path, num_workers=0)
    with pytest.raises(ValueError, match="lacks columns"):
        unique_images(index.drop(columns="image_path"), tmp_path, num_workers=0)
    with pytest.raises(FileNotFoundError, match="fmbseg features"):
        read_manifest(tmp_path / "nothing")


def test_encode_images_batches_in_order(tmp_path, encoder) -> None:
    paths = [tmp_path / f"{k}.png" for k in range(5)]
    for k, p in enumerate(paths):
        write_image(p, k)
    batches = list(encode_images(encoder, paths, image_size=SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                 batch_size=2, num_workers=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    single = list(encode_images(encoder, paths[3:4], image_size=SIZE, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                batch_size=1, num_workers=0))
    np.testing.assert_allclose(batches[1][1].astype(np.float32), single[0][0].astype(np.float32), atol=2e-3)


def test_encoder_features_can_feed_a_trained_module(encoder) -> None:
    features = encoder(torch.randn(2, 3, SIZE, SIZE))
    assert features.shape == (2, 4, 4, 32) and not features.requires_grad
    head = torch.nn.Linear(32, 3)
    head(features).sum().backward()  # no inference-mode tensors: training on the fly works
    assert head.weight.grad is not None
