"""The world-clip stand-in: seeded training, its file round trip, the bundled model's accuracy."""

from __future__ import annotations

import pytest
import torch

from components.models.registry import build_clip, init_model
from components.models.standins.store import read_metadata, save_trained
from demoworld.standins.clip import EVAL_LISTS, evaluate_clip, train_clip


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_is_seeded_and_its_file_round_trips(tmp_path):
    threads = torch.get_num_threads()
    first, metrics = train_clip(seed=0, steps=2, eval_scenes=2)
    second, _ = train_clip(seed=0, steps=2, eval_scenes=2)
    assert torch.get_num_threads() == threads
    a, b = _state(first), _state(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert metrics["steps"] == 2 and set(f"crop_acc/{n}" for n in EVAL_LISTS) <= metrics.keys()

    init = init_model("world-clip").state_dict()
    path = save_trained(first, init, tmp_path / "world" / "world-clip.safetensors", metrics)
    assert read_metadata(path)["steps"] == 2
    # The token embedding has no weight decay: rows no caption uses keep their init and stay out.
    tokens = first.token_embedding.weight
    changed = (tokens != init["token_embedding.weight"]).any(dim=1)
    assert 0 < int(changed.sum()) < 2000

    bundle = build_clip("world-clip", weights_dir=tmp_path)
    loaded = bundle.model.state_dict()
    assert all(torch.equal(loaded[k], a[k]) for k in a)
    assert bundle.tokenizer(["a photo of a car."]).shape == (1, first.context_length)


# Measured by train_clip(seed=0) (the bundled file's metadata): crop / patch / top-5 accuracy on
# 150 held-out scenes per list; the floors leave a margin of ~0.03.
FLOORS = {
    "crop_acc/voc20": 0.90,
    "crop_acc/cityscapes19": 0.88,
    "crop_acc/context59": 0.71,
    "crop_acc/cocostuff171": 0.50,
    "crop_acc/ade150": 0.54,
    "patch_acc/voc20": 0.84,
    "patch_acc/cityscapes19": 0.80,
    "patch_acc/cocostuff171": 0.42,
    **{f"top5_on_class/{name}": 0.87 for name in EVAL_LISTS},
}


@pytest.mark.slow
def test_bundled_model_reaches_its_measured_accuracy():
    bundle = build_clip("world-clip")
    metrics = evaluate_clip(bundle.model, bundle.tokenizer, seed=0)
    recorded = read_metadata(bundle.spec.weights[0].bundled)
    for key, floor in FLOORS.items():
        assert metrics[key] >= floor, (key, metrics[key])
        assert metrics[key] == pytest.approx(recorded[key], abs=0.01), key
