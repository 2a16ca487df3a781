"""The text space role: any open_clip model with a text tower, built through the registry; Stage 1's
dense detection serves the class-token towers and refuses the attention-pool ones by name."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.timm_model import TimmModel
from open_clip.transformer import VisionTransformer

from components.config import parse_params
from components.models.clip_dense import dense_features, prototypes
from components.models.registry import build_clip, dense_text_specs, get_spec, list_specs
from components.models.weights import MissingWeightsError
from flows.common import check_models

REAL = {
    "ViT-H-14-worldwide/metaclip2_worldwide": ("ViT-H-14-worldwide", "metaclip2_worldwide"),
    "PE-Core-L-14-336/meta": ("PE-Core-L-14-336", "meta"),
    "ViT-L-16-SigLIP2-384/webli": ("ViT-L-16-SigLIP2-384", "webli"),
}


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("FMBSEG_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_text_specs_take_open_clips_own_geometry_and_statistics(name):
    arch, tag = REAL[name]
    spec = get_spec(name)
    assert name in list_specs("clip") and (spec.architecture, spec.pretrained_tag) == (arch, tag)
    pretrained = open_clip.get_pretrained_cfg(arch, tag)
    assert (spec.mean, spec.std) == (tuple(pretrained["mean"]), tuple(pretrained["std"]))
    assert spec.embed_dim == open_clip.get_model_config(arch)["embed_dim"] and spec.licence
    assert spec.weights[0].hub_repo == pretrained["hf_hub"].strip("/")
    assert spec.image_size % spec.patch_size == 0


def test_dense_detection_serves_class_token_towers_only():
    dense = dense_text_specs()
    assert {"ViT-L-14-336/openai", "ViT-H-14-worldwide/metaclip2_worldwide", "mini-metaclip2"} <= set(dense)
    assert not {"ViT-L-16-SigLIP2-384/webli", "PE-Core-L-14-336/meta", "mini-siglip2"} & set(dense)


@pytest.mark.parametrize(("name", "cls", "tower"), [("mini-metaclip2", open_clip.CLIP, VisionTransformer),
                                                    ("mini-siglip2", open_clip.CustomTextCLIP, TimmModel)])
def test_toy_configs_build_the_real_classes_and_make_prototypes(name, cls, tower):
    bundle = build_clip(name)
    spec = get_spec(name)
    assert type(bundle.model) is cls and isinstance(bundle.model.visual, tower) and bundle.spec is spec
    protos = prototypes(bundle.model, bundle.tokenizer, ["cat", "dog", "sky"], ["a photo of a {}.", "a {}."])
    assert protos.shape == (3, spec.embed_dim)
    torch.testing.assert_close(protos.norm(dim=-1), torch.ones(3))
    with torch.no_grad():
        pixels = torch.randn(1, 3, spec.image_size, spec.image_size, generator=torch.Generator().manual_seed(0))
        if cls is open_clip.CLIP:
            dense = dense_features(bundle.model, pixels)
            grid = spec.image_size // spec.patch_size
            assert dense.patches.shape == (1, grid, grid, spec.embed_dim)
            torch.testing.assert_close(dense.cls, bundle.model.encode_image(pixels))
        else:
            assert bundle.model.visual.trunk.global_pool == "map"  # SigLIP 2's attention-pool head
            with pytest.raises(TypeError, match="text spaces .*ViT-H-14-worldwide/metaclip2_worldwide.*attention-pool head"):
                dense_features(bundle.model, pixels)


def test_a_hugging_face_tokenizer_missing_offline_names_the_fetch_command(offline_hub):
    for name in ("ViT-L-16-SigLIP2-384/webli", "ViT-H-14-worldwide/metaclip2_worldwide"):
        with pytest.raises(MissingWeightsError, match=f"(?s)tokenizer of model spec '{name}'.*fmbseg weights fetch {name}"):
            build_clip(name, random_weights=True)


def test_stage1_refuses_an_attention_pool_text_space_before_any_model_loads():
    profile = {"clip": "ViT-L-16-SigLIP2-384/webli", "sam": "vit_h", "dino": "dinov2_vitl14"}
    params = parse_params({"models": {"profiles": {"paper": profile}}})
    check_models(params)  # Stage 2 needs the text tower only
    with pytest.raises(ValueError, match="attention-pool head.*ViT-L-14-336/openai"):
        check_models(params, dense_text=True)
