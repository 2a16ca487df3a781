"""configs/modern.yaml and the modern profile's weights: DINOv3 student, SAM 2.1 masks, MetaCLIP 2
text space; gated weights are explained; params.yaml keeps the paper's models."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from components.config import parse_params
from components.models.registry import get_spec
from flows.cli import app
from flows.common import check_models, profile_settings

runner = CliRunner()


@pytest.fixture
def no_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("FMBSEG_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)


def _modern(repo_root):
    return parse_params(profile_settings("modern", repo_root / "params.yaml"))  # params.yaml + configs/modern.yaml


def test_params_yaml_keeps_the_papers_models(repo_root):
    params = parse_params(yaml.safe_load((repo_root / "params.yaml").read_text(encoding="utf-8")))
    assert params.models.profile == "paper" and params.features.image_size == 518
    paper = params.models.profiles["paper"]
    assert (paper.clip, paper.sam, paper.dino) == ("ViT-L-14-336/openai", "vit_h", "dinov2_vitl14")


def test_the_modern_overlay_selects_dinov3_sam21_and_a_dense_text_space(repo_root):
    params = _modern(repo_root)
    chosen = params.models.selected
    assert (chosen.clip, chosen.sam, chosen.dino) == (
        "ViT-H-14-worldwide/metaclip2_worldwide", "sam2.1-hiera-large", "dinov3_vitl16")
    student = get_spec(chosen.dino)
    assert params.features.image_size % student.patch_size == 0 and student.prefix_tokens == 5
    # the evaluation windows sit on DINOv3's 16-px grid too
    assert params.evaluate.window % student.patch_size == 0 and params.evaluate.stride % student.patch_size == 0
    assert get_spec(chosen.sam).family == "sam"
    check_models(params, dense_text=True)


def test_weights_status_modern_lists_the_gated_dinov3_files(repo_root, no_weights):
    args = ["weights", "status", "--profile", "modern", "--params", str(repo_root / "params.yaml")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "profile modern" in result.output and "MISSING" in result.output
    assert "dinov3_vitl16" in result.output and "model.safetensors" in result.output
    assert "facebook/dinov3-vitl16-pretrain-lvd1689m is gated" in result.output and "HF_TOKEN" in result.output
    assert "fmbseg weights fetch --profile modern" in result.output
    assert "sam3" in result.output and "facebook/sam3 is gated" in result.output  # the overlay's concept teacher


def test_fetching_gated_weights_without_a_token_explains_licence_and_token(repo_root, no_weights, monkeypatch):
    import socket

    with socket.socket() as hub:  # a hub that answers (the fetch checks it is online first), on 127.0.0.1
        hub.bind(("127.0.0.1", 0))
        hub.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub.getsockname()[1]}")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        result = runner.invoke(app, ["weights", "fetch", "dinov3_vits16", "--params", str(repo_root / "params.yaml")])
    assert result.exit_code == 1
    assert "no Hugging Face token" in result.output and "HF_TOKEN" in result.output
    assert "https://huggingface.co/facebook/dinov3-vits16-pretrain-lvd1689m" in result.output


def test_a_features_side_off_the_students_grid_is_a_usage_error(repo_root, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((repo_root / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    result = runner.invoke(app, ["features", "--params", str(params), "-S", "models.profiles.paper.dino=dinov3_vitl16"])
    assert result.exit_code == 2
    assert "features.image_size 518 must be a multiple of the patch size 16 of the student 'dinov3_vitl16'" in result.output
