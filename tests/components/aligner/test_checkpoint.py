"""Checkpoint format 3 records the student, text and mask specs; a format-2 checkpoint (written
before the model roles) still loads and predicts the same; unknown or changed specs and another
student are refused, saying which."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.aligner.checkpoint import load_aligner, refuse_other_student, spec_record
from components.segmenter import Segmenter
from tests.mini_checkpoint import write_mini_checkpoint


def _rewrite(path: Path, edit) -> Path:
    state = torch.load(path, weights_only=True)
    edit(state)
    torch.save(state, path)
    return path


def as_format_2(path: Path) -> Path:
    """The file the code before the model roles wrote: format 2, no ``specs``."""
    def edit(state):
        del state["specs"]
        state["format"] = 2
    return _rewrite(path, edit)


def test_a_checkpoint_records_the_three_specs(tmp_path):
    path = write_mini_checkpoint(tmp_path / "a.pt", encoder_spec="mini-dino")
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == 3
    assert raw["specs"] == {"student": spec_record("mini-dino"), "text": spec_record("mini-clip"),
                            "mask": spec_record("mini-sam")}
    assert raw["specs"]["student"]["patch_size"] == 14 and raw["specs"]["student"]["prefix_tokens"] == 1
    loaded = load_aligner(path)
    assert loaded.format == 3 and loaded.specs["student"]["name"] == "mini-dino"


def test_a_format_2_checkpoint_loads_and_predicts_the_same(tmp_path):
    new = write_mini_checkpoint(tmp_path / "new.pt")
    old = as_format_2(write_mini_checkpoint(tmp_path / "old.pt"))
    assert torch.load(old, weights_only=True)["format"] == 2
    loaded = load_aligner(old)
    assert loaded.format == 2 and loaded.specs == load_aligner(new).specs
    image = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    results = [Segmenter.from_checkpoint(p, device="cpu").segment(image, ["thing", "stuff"], refine=True)
               for p in (old, new)]
    assert np.array_equal(results[0].label_map, results[1].label_map)
    assert np.array_equal(results[0].scores, results[1].scores)


def test_an_unknown_recorded_spec_is_named(tmp_path):
    path = write_mini_checkpoint(tmp_path / "a.pt")
    _rewrite(path, lambda s: (s["specs"]["student"].update(name="dinov9_vitl16"),
                              s["encoder"].update(dino="dinov9_vitl16")))
    with pytest.raises(ValueError, match=r"student spec 'dinov9_vitl16'.*does not know.*mini-dinov3"):
        load_aligner(path)
    old = as_format_2(write_mini_checkpoint(tmp_path / "b.pt"))
    _rewrite(old, lambda s: s["text"].update(clip="ViT-Z-99/nobody"))
    with pytest.raises(ValueError, match=r"text spec 'ViT-Z-99/nobody'.*known text specs: .*mini-clip"):
        load_aligner(old)


def test_a_spec_whose_model_changed_is_refused(tmp_path):
    path = write_mini_checkpoint(tmp_path / "a.pt")
    _rewrite(path, lambda s: s["specs"]["student"].update(patch_size=16))
    with pytest.raises(ValueError, match=r"student spec 'mini-dino'.*differs.*\['patch_size'\]"):
        load_aligner(path)


def test_another_student_is_refused_naming_both(tmp_path):
    path = write_mini_checkpoint(tmp_path / "a.pt")
    with pytest.raises(ValueError, match="trained on the student 'mini-dino', not 'mini-dinov3'"):
        refuse_other_student(load_aligner(path), "mini-dinov3")
    with pytest.raises(ValueError, match="'mini-dino', not 'dinov3_vitl16'"):
        Segmenter.from_checkpoint(path, device="cpu", student="dinov3_vitl16")
    assert Segmenter.from_checkpoint(path, device="cpu", student="mini-dino").dino_spec.name == "mini-dino"
