"""Aligner training (components/aligner/train.py) and its checkpoint (checkpoint.py), on in-memory data."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from components.aligner.checkpoint import InferenceSpec, load_aligner, save_checkpoint
from components.aligner.model import Aligner
from components.aligner.train import TrainSettings, pending_resume, train_aligner
from components.labelling.settings import AmgSettings

GRID = 4  # a 4 x 4 patch grid
IN_DIM, OUT_DIM, K = 16, 8, 3


class Interrupt(Exception):
    """Raised by an on_epoch hook to simulate a killed training."""


class FeatureSamples(Dataset):
    """Images whose patch features are their class mean plus noise; 1/4 of the patches unlabelled."""

    def __init__(self, num_images: int, seed: int = 0, as_pixels: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        means = 3 * torch.randn(K, IN_DIM, generator=g)
        self.labels = torch.randint(0, K, (num_images, GRID, GRID), generator=g)
        self.features = means[self.labels] + 0.5 * torch.randn(num_images, GRID, GRID, IN_DIM, generator=g)
        self.targets = self.labels.masked_fill(torch.rand(self.labels.shape, generator=g) < 0.25, 255)
        self.as_pixels = as_pixels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        # "pixels" here are the features in channel-first layout, so an encoder can undo it exactly
        key, value = ("pixels", self.features[i].permute(2, 0, 1)) if self.as_pixels else ("features", self.features[i])
        return {key: value, "labels": self.targets[i]}


def settings(**changes: object) -> TrainSettings:
    base = TrainSettings(
        in_dim=IN_DIM, kind="transformer", num_heads=4, loss="tsupcon", temperature=0.1, lr=0.05,
        momentum=0.9, weight_decay=1e-4, epochs=3, batch_size=5, seed=0,
    )
    return dataclasses.replace(base, **changes)


def prototypes() -> torch.Tensor:
    return F.normalize(torch.randn(K, OUT_DIM, generator=torch.Generator().manual_seed(1)), dim=-1)


def accuracy(model: Aligner, data: FeatureSamples, text: torch.Tensor) -> float:
    """Patch accuracy of argmax-cosine predictions against the clean labels (as at inference)."""
    with torch.no_grad():
        z = F.normalize(model.eval()(data.features.reshape(len(data), -1, IN_DIM)), dim=-1)
    return float(((z @ text.T).argmax(-1).reshape(data.labels.shape) == data.labels).float().mean())


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_training_learns_the_classes() -> None:
    data, text = FeatureSamples(20), prototypes()
    steps: list[tuple[int, float]] = []
    result = train_aligner(data, text, settings(epochs=6), on_step=lambda s, v: steps.append((s, v)))
    assert [s for s, _ in steps] == list(range(6 * 4))  # 20 images / 5 a batch = 4 steps an epoch
    assert result.steps == 24 and result.start_epoch == 0 and len(result.epochs) == 6
    assert result.epochs[-1]["loss"] < 0.9 * result.epochs[0]["loss"]
    assert result.epochs[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine annealed to 0
    assert result.epochs[0]["valid_patch_fraction"] == pytest.approx(float((data.targets != 255).float().mean()))
    torch.manual_seed(0)  # the trainer's initial weights (seed 0)
    untrained = Aligner(IN_DIM, OUT_DIM, kind="transformer", num_heads=4)
    assert accuracy(untrained, data, text) < 0.7
    assert accuracy(result.model, data, text) > 0.95


def test_16_bit_unlabelled_patches_train_the_same_weights_as_8_bit_ones() -> None:
    """A vocabulary past 255 classes marks unlabelled patches 65535: with the matching ignore_index the
    trained weights equal those of the same data marked 255; a mismatch with the dataset is refused."""
    narrow, wide = FeatureSamples(10), FeatureSamples(10)
    wide.targets = wide.targets.masked_fill(wide.targets == 255, 65535)
    wide.ignore_index = 65535
    a = train_aligner(narrow, prototypes(), settings(epochs=1), device="cpu").model
    b = train_aligner(wide, prototypes(), settings(epochs=1, ignore_index=65535), device="cpu").model
    assert_same_weights(a, b)
    with pytest.raises(ValueError, match="the loss ignores 255"):
        train_aligner(wide, prototypes(), settings(epochs=1), device="cpu")


def test_samples_of_16_bit_label_maps_pool_with_65535_as_unlabelled() -> None:
    import numpy as np
    import pandas as pd

    from components.aligner.data import AlignerSamples

    label = np.full((8, 8), 65535, np.uint16)
    label[:4] = 299
    label[4:, :2] = 256
    maps = type("Maps", (), {"read": lambda self, i, v: label})()
    inputs = type("Zeros", (), {"sample": lambda self, i, p: {"features": torch.zeros(4, 4, 3)}})()
    index = pd.DataFrame({"image_id": ["x"], "image_path": ["x.png"], "variant": ["stage1_1"]})
    samples = AlignerSamples(index, inputs=inputs, labels=maps, grid=(4, 4), num_classes=300)
    assert samples.ignore_index == 65535
    pooled = samples[0]["labels"]
    assert (pooled[:2] == 299).all() and (pooled[2:, 0] == 256).all() and (pooled[2:, 1:] == 65535).all()


def test_resume_after_interruption_gives_the_same_weights(tmp_path) -> None:
    data, text, cfg = FeatureSamples(12), prototypes(), settings()
    reference = train_aligner(data, text, cfg).model

    state = tmp_path / "train_state.pt"

    def stop_after_first(epoch: int, summary: dict[str, float]) -> None:
        if epoch == 0:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_aligner(data, text, cfg, state_path=state, extra={"run": "r1"}, on_epoch=stop_after_first)
    assert pending_resume(state, cfg, text, "") == {"run": "r1"}
    steps: list[int] = []
    resumed = train_aligner(data, text, cfg, state_path=state, on_step=lambda s, v: steps.append(s))
    assert resumed.start_epoch == 1 and len(resumed.epochs) == 3
    assert steps == list(range(3, 9))  # 3 steps an epoch; epoch 0's steps are not repeated
    assert_same_weights(resumed.model, reference)


def test_changed_settings_or_data_start_fresh(tmp_path) -> None:
    data, text, cfg = FeatureSamples(10), prototypes(), settings(epochs=2)
    state = tmp_path / "train_state.pt"
    train_aligner(data, text, cfg, state_path=state, data_fingerprint="a")
    assert pending_resume(state, cfg, text, "a") is not None
    assert pending_resume(state, settings(epochs=2, lr=0.1), text, "a") is None
    assert pending_resume(state, cfg, text, "b") is None
    assert pending_resume(state, cfg, -text, "a") is None
    assert train_aligner(data, text, settings(epochs=2, lr=0.1), state_path=state, data_fingerprint="a").start_epoch == 0


def test_on_the_fly_features_match_cached_features() -> None:
    text, cfg = prototypes(), settings(epochs=2)
    cached = train_aligner(FeatureSamples(10), text, cfg).model
    seen: list[tuple[int, ...]] = []

    def encoder(pixels: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(pixels.shape))
        return pixels.permute(0, 2, 3, 1)

    fly = train_aligner(FeatureSamples(10, as_pixels=True), text, cfg, encoder=encoder).model
    assert seen[0] == (5, IN_DIM, GRID, GRID)
    assert_same_weights(fly, cached)
    with pytest.raises(ValueError, match="no encoder"):
        train_aligner(FeatureSamples(10, as_pixels=True), text, cfg)


@pytest.mark.parametrize("loss", ["prototype", "supcon"])
@pytest.mark.parametrize("kind", ["mlp", "linear"])
def test_every_loss_and_kind_trains(loss: str, kind: str) -> None:
    result = train_aligner(FeatureSamples(10), prototypes(), settings(loss=loss, kind=kind, epochs=2))
    assert result.model.kind == kind and all(torch.isfinite(torch.tensor(e["loss"])) for e in result.epochs)


def test_bad_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        train_aligner(FeatureSamples(5), prototypes(), settings(loss="clip"))
    with pytest.raises(ValueError, match="empty"):
        train_aligner(FeatureSamples(0), prototypes(), settings())


MINI_INFERENCE = InferenceSpec(sam="mini-sam", templates=("a photo of a {}.",), short_side=56, window=56, stride=28,
                               amg=AmgSettings(points_per_side=4, min_area_frac=0.0, max_area_frac=1.0))


def test_checkpoint_round_trip_rebuilds_an_identical_model(tmp_path) -> None:
    torch.manual_seed(0)
    model = Aligner(IN_DIM, OUT_DIM, kind="transformer", num_heads=4)
    text = prototypes()
    path = save_checkpoint(
        tmp_path / "models" / "aligner.pt", model=model, encoder_spec="mini-dino", image_size=56,
        text_spec="mini-clip", templates=["a photo of a {}."], class_names=["cat", "dog", "sky"],
        prototypes=text, inference=MINI_INFERENCE, params={"train.lr": 0.05, "label.templates": ["a photo of a {}."]}, mlflow_run_id="abc",
    )
    raw = torch.load(path, weights_only=True)  # plain types only
    assert raw["aligner_config"] == {"in_dim": IN_DIM, "out_dim": OUT_DIM, "kind": "transformer", "num_heads": 4}
    loaded = load_aligner(path)
    assert not loaded.model.training
    assert_same_weights(loaded.model, model)
    x = torch.randn(2, 9, IN_DIM)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert torch.equal(loaded.prototypes, text)
    assert loaded.class_names == ["cat", "dog", "sky"]
    assert (loaded.encoder_spec, loaded.image_size, loaded.text_spec) == ("mini-dino", 56, "mini-clip")
    assert loaded.templates == ["a photo of a {}."] and loaded.run_id == "abc"
    assert loaded.params == {"train.lr": 0.05, "label.templates": ["a photo of a {}."]}
    assert loaded.inference == MINI_INFERENCE and raw["format"] == 3


def test_checkpoint_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="fmbseg train"):
        load_aligner(tmp_path / "missing.pt")
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="missing"):
        load_aligner(tmp_path / "other.pt")
    torch.save({"format": 1, "model": {}}, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="format-1 checkpoint .* `fmbseg train`"):
        load_aligner(tmp_path / "old.pt")
    with pytest.raises(ValueError, match="size filter"):
        InferenceSpec.from_dict({**MINI_INFERENCE.to_dict(), "amg": {}})
    with pytest.raises(ValueError, match="unknown \\['grid'\\]"):
        InferenceSpec.from_dict({**MINI_INFERENCE.to_dict(), "grid": 4})
    with pytest.raises(ValueError, match="prototypes must be"):
        save_checkpoint(
            tmp_path / "a.pt", model=Aligner(IN_DIM, OUT_DIM, kind="linear"), encoder_spec="mini-dino",
            image_size=56, text_spec="mini-clip", templates=[], class_names=["a"], prototypes=prototypes(),
            inference=MINI_INFERENCE, params={}, mlflow_run_id=None,
        )


def test_loader_workers_give_the_same_weights() -> None:
    data, text, cfg = FeatureSamples(10), prototypes(), settings(epochs=2)
    assert_same_weights(
        train_aligner(data, text, cfg, num_workers=2).model, train_aligner(data, text, cfg, num_workers=0).model
    )
