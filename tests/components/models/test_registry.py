"""The model registry and weight resolution: spec metadata, miniature builds, missing / present files."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file
from segment_anything.modeling import Sam
from transformers import (
    AutoConfig,
    AutoModel,
    Dinov2Model,
    Dinov2WithRegistersModel,
    DINOv3ViTModel,
    Sam2Model,
)

from components.models.registry import (
    autocast_context,
    build_clip,
    build_dino,
    build_sam,
    get_spec,
    list_specs,
    resolve_device,
)
from components.models.weights import (
    MissingWeightsError,
    load_state_dict,
    resolve_weight,
    weights_status,
)

REAL = {
    "clip": ["ViT-L-14-336/openai", "ViT-B-16/openai"],
    "sam": ["vit_h", "vit_l", "vit_b", *(f"sam2.1-hiera-{size}" for size in ("tiny", "small", "base-plus", "large"))],
    "dino": ["dinov2_vitl14", "dinov2_vitb14", "dinov2_vits14_reg", "dinov2_vitb14_reg", "dinov2_vitl14_reg",
             "dinov2_vitg14_reg", "dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16", "dinov3_vith16plus"],
}
MINI = {"clip": ["mini-clip"], "sam": ["mini-sam", "mini-sam2.1"], "dino": ["mini-dino", "mini-dino-reg", "mini-dinov3"]}
STUDENT_CLASS = {"mini-dino": Dinov2Model, "mini-dino-reg": Dinov2WithRegistersModel, "mini-dinov3": DINOv3ViTModel}
WORLD = {family: [f"world-{family}"] for family in ("clip", "sam", "dino")}  # stand-ins trained on the demo world
BUILDERS = {"clip": build_clip, "sam": build_sam, "dino": build_dino}


@pytest.fixture
def empty_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty weights dir and an empty, offline Hugging Face cache."""
    monkeypatch.setenv("FMBSEG_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "weights"


def test_spec_names_and_families():
    for family in ("clip", "sam", "dino"):  # the text space's other specs: tests/components/models/test_text_space.py
        named = [n for n in list_specs(family) if n in REAL[family] + MINI[family] + WORLD[family]]
        assert named == REAL[family] + MINI[family] + WORLD[family]
    assert list_specs("teacher") == ["sam3", "mini-sam3"]
    assert sorted(list_specs()) == sorted(n for f in ("clip", "sam", "dino", "teacher") for n in list_specs(f))
    with pytest.raises(ValueError, match="clip, sam, dino, teacher .roles: student, text, mask, teacher"):
        list_specs("vit")
    assert [list_specs(role) for role in ("student", "text", "mask")] == [list_specs(f) for f in ("dino", "clip", "sam")]


def test_unknown_name_lists_known_ones():
    with pytest.raises(KeyError) as info:
        get_spec("ViT-H-14")
    for name in list_specs():
        assert name in str(info.value)
    with pytest.raises(ValueError, match="sam model"):
        build_clip("mini-sam")


@pytest.mark.parametrize("name", [n for names in [*REAL.values(), *MINI.values()] for n in names])
def test_spec_metadata(name):
    spec = get_spec(name)
    assert spec.name == name and spec.family in ("clip", "sam", "dino")
    assert spec.miniature == name.startswith("mini-")
    assert spec.image_size % spec.patch_size == 0 and spec.embed_dim > 0
    assert len(spec.mean) == len(spec.std) == 3 and all(0 < s < 1 for s in spec.std)
    assert all(0 < m < 1 for m in spec.mean)
    if spec.family == "dino":
        dinov3 = "dinov3" in name
        assert spec.patch_size == (16 if dinov3 else 14) and spec.image_size % spec.patch_size == 0
        assert spec.prefix_tokens == (5 if dinov3 or "reg" in name else 1)
        assert spec.gated == (dinov3 and not spec.miniature)
    if spec.miniature:
        assert spec.weights == ()
        return
    assert spec.weights and all(f.names and f.local_dir for f in spec.weights)
    if spec.family == "clip":
        assert spec.mean == tuple(open_clip.OPENAI_DATASET_MEAN)
        assert spec.weights[0].hub_repo == open_clip.get_pretrained_cfg(spec.architecture, "openai")[
            "hf_hub"
        ].strip("/")
    if spec.family == "sam" and spec.hub_repo is not None:  # SAM 2.1: transformers files on the hub
        assert spec.hub_repo == f"facebook/{name}" and spec.licence == "Apache-2.0"
        assert [f.name for f in spec.weights] == ["config.json", "model.safetensors"]
        assert all(f.hub_repo == spec.hub_repo and f.sha256 is None for f in spec.weights)
    elif spec.family == "sam":
        (file,) = spec.weights
        assert file.url == f"https://dl.fbaipublicfiles.com/segment_anything/{file.name}"
        assert re.fullmatch(r"[0-9a-f]{64}", file.sha256) and file.size > 10**8
        assert [255 * m for m in spec.mean] == pytest.approx([123.675, 116.28, 103.53])
    if spec.family == "dino":
        assert [f.name for f in spec.weights] == ["config.json", "model.safetensors"]
        assert all(f.hub_repo == spec.hub_repo for f in spec.weights) and spec.licence
        assert spec.hub_repo.startswith("facebook/dinov3-vit" if "dinov3" in name else "facebook/dinov2-")


def test_paper_specs():
    assert (get_spec("ViT-L-14-336/openai").image_size, get_spec("ViT-L-14-336/openai").embed_dim) == (
        336,
        768,
    )
    assert get_spec("vit_h").weights[0].sha256.startswith("a7bf3b02")
    assert get_spec("dinov2_vitl14").hub_repo == "facebook/dinov2-large"
    assert get_spec("dinov2_vitl14_reg").hub_repo == "facebook/dinov2-with-registers-large"
    assert get_spec("dinov3_vitl16").hub_repo == "facebook/dinov3-vitl16-pretrain-lvd1689m"


@pytest.mark.parametrize("name", [n for n in REAL["dino"] if "vitl" in n or "vits" in n])
def test_real_student_architectures_match_their_specs(name):
    """The random-weight builds (benchmarks) of the real students have the spec's geometry."""
    spec = get_spec(name)
    model = build_dino(name, random_weights=True)
    assert (model.config.patch_size, model.config.hidden_size) == (spec.patch_size, spec.embed_dim)


@pytest.mark.parametrize("name", [n for names in MINI.values() for n in names])
def test_miniatures_build_frozen_seeded_and_match_spec(name):
    spec = get_spec(name)
    rng_before = torch.random.get_rng_state()
    start = time.perf_counter()
    model = BUILDERS[spec.family](name)
    print(f"{name} built in {time.perf_counter() - start:.3f} s")  # measured, not asserted
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # seeding leaves the caller's RNG alone
    if spec.family == "clip":
        model, tokenizer, bundle_spec = model
        assert type(model) is open_clip.CLIP and bundle_spec is spec
        assert (
            model.visual.image_size == (spec.image_size,) * 2
            and model.visual.patch_size == (spec.patch_size,) * 2
        )
        assert model.visual.output_dim == spec.embed_dim
        assert tokenizer(["a cat"]).shape == (1, 77) and model.vocab_size == 49408
    elif spec.family == "sam" and name.startswith("mini-sam2"):
        assert type(model) is Sam2Model
        assert model.config.prompt_encoder_config.image_size == spec.image_size
        assert model.config.vision_config.fpn_hidden_size == spec.embed_dim
    elif spec.family == "sam":
        assert type(model) is Sam
        assert model.image_encoder.img_size == spec.image_size
        assert model.image_encoder.neck[0].out_channels == spec.embed_dim
        assert model.pixel_mean.flatten().tolist() == pytest.approx([255 * m for m in spec.mean])
    else:
        assert type(model) is STUDENT_CLASS[name]
        assert model.config.hidden_size == spec.embed_dim and model.config.image_size == spec.image_size
        assert 1 + getattr(model.config, "num_register_tokens", 0) == spec.prefix_tokens
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    again = BUILDERS[spec.family](name)
    again = again.model if spec.family == "clip" else again
    for (key, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), key


@pytest.mark.parametrize("name", [n for names in REAL.values() for n in names])
def test_real_spec_without_weights_raises_with_fetch_command(empty_weights, name):
    spec = get_spec(name)
    with pytest.raises(MissingWeightsError) as info:
        BUILDERS[spec.family](name)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert spec.weights[0].name in message
    assert str(empty_weights / spec.weights[0].local_dir / spec.weights[0].name) in message
    assert f"fmbseg weights fetch {name}" in message and "fmbseg weights fetch --profile paper" in message
    assert ("HF_TOKEN" in message and f"https://huggingface.co/{spec.hub_repo}" in message) == spec.gated
    if spec.weights[0].hub_repo:
        assert (
            spec.weights[0].hub_repo in message and str(empty_weights.parent / "hf_home" / "hub") in message
        )
    rows = weights_status([get_spec(name)])
    assert [r.file for r in rows] == [f.name for f in spec.weights]
    assert not any(r.present for r in rows)
    assert [r.size for r in rows] == [f.size for f in spec.weights]


def test_miniatures_need_no_files(empty_weights):
    assert weights_status([get_spec(n) for n in ("mini-clip", "mini-sam", "mini-dino")]) == []


def test_present_sam_checkpoint_resolves_and_loads(empty_weights):
    spec = get_spec("vit_b")
    path = empty_weights / "sam" / "sam_vit_b_01ec64.pth"
    path.parent.mkdir(parents=True)
    state = {
        "image_encoder.pos_embed": torch.randn(1, 4, 4, 8),
        "mask_decoder.iou_token.weight": torch.randn(1, 8),
    }
    torch.save(state, path)
    (row,) = weights_status([get_spec("vit_b")])
    assert row.present and row.path == path and row.size == path.stat().st_size and row.spec == "vit_b"
    assert resolve_weight("vit_b", spec.weights[0]) == path
    loaded = load_state_dict(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    # A file that is not the architecture's checkpoint is an error, never a partial/random init.
    with pytest.raises(RuntimeError, match="Missing key"):
        build_sam("vit_b")


def test_weights_dir_argument_overrides_environment(empty_weights, tmp_path):
    other = tmp_path / "other"
    (other / "sam").mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, other / "sam" / "sam_vit_h_4b8939.pth")
    assert not weights_status([get_spec("vit_h")])[0].present
    assert weights_status([get_spec("vit_h")], weights_dir=other)[0].present
    with pytest.raises(MissingWeightsError):
        build_sam("vit_h")


def _fake_hub_snapshot(hub: Path, repo: str, files: dict[str, bytes]) -> Path:
    """A Hugging Face cache entry laid out as huggingface_hub writes it (refs/main -> snapshot)."""
    revision = "0" * 40
    root = hub / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(revision)
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def _tiny_dinov2_files(hidden_size: int) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    config = AutoConfig.for_model(
        "dinov2",
        hidden_size=hidden_size,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=56,
        patch_size=14,
    )
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in AutoModel.from_config(config).state_dict().items()}
    return {"config.json": json.dumps(config.to_dict()).encode()}, state


def test_dinov2_loads_from_hub_cache(empty_weights, tmp_path):
    files, state = _tiny_dinov2_files(hidden_size=768)  # fits the dinov2_vitb14 spec (C = 768, p = 14)
    snapshot = _fake_hub_snapshot(tmp_path / "hf_home" / "hub", "facebook/dinov2-base", files)
    save_file(state, str(snapshot / "model.safetensors"))
    rows = weights_status([get_spec("dinov2_vitb14")])
    assert all(r.present for r in rows) and rows[1].path == snapshot / "model.safetensors"
    model = build_dino("dinov2_vitb14")
    assert type(model) is Dinov2Model and not model.training
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_dinov2_file_that_does_not_fit_the_spec_is_an_error(empty_weights):
    files, state = _tiny_dinov2_files(hidden_size=32)
    local = empty_weights / "dino" / "dinov2-large"
    local.mkdir(parents=True)
    (local / "config.json").write_bytes(files["config.json"])
    save_file(state, str(local / "model.safetensors"))
    with pytest.raises(ValueError, match=r"\(14, 32, 1\)"):
        build_dino("dinov2_vitl14")


def test_dinov2_checkpoint_missing_a_weight_is_an_error(empty_weights):
    files, state = _tiny_dinov2_files(hidden_size=768)
    local = empty_weights / "dino" / "dinov2-base"
    local.mkdir(parents=True)
    (local / "config.json").write_bytes(files["config.json"])
    save_file({k: v for k, v in state.items() if k != "layernorm.weight"}, str(local / "model.safetensors"))
    with pytest.raises(ValueError, match="layernorm.weight"):
        build_dino("dinov2_vitb14")


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="auto, cpu, cuda"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda:0")


def test_autocast_context():
    with autocast_context("cpu", "bf16"):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with autocast_context(torch.device("cpu"), "fp32"):
        pass
    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        autocast_context("cpu", "int8")
