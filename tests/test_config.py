"""params.yaml -> frozen typed settings: the shipped file is valid, mistakes are named."""

from __future__ import annotations

import pydantic
import pytest
import yaml

from components.config import ConfigError, Params, apply_overrides, flatten, load_params, parse_params


def test_shipped_params_are_valid_and_paper_profile(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params.models.profile == "paper"
    assert params.models.selected.clip == "ViT-L-14-336/openai"
    assert params.models.selected.sam == "vit_h"
    assert params.models.selected.dino == "dinov2_vitl14"
    assert params.label.grid == 4 and params.label.sam_size == 518
    assert params.label.amg.pred_iou_thresh == 0.97
    assert params.balance.ratio == 0.75


def test_shipped_params_spell_out_every_default(repo_root):
    """params.yaml lists every setting: what the code defaults to is never hidden from DVC."""
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    defaults = flatten(Params())
    shipped = flatten(raw)
    missing = sorted(k for k in defaults if k not in shipped and not k.startswith("models.profiles."))
    assert missing == []


def test_demo_overlay_is_valid(repo_root):
    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    overlay = yaml.safe_load((repo_root / "configs" / "demo.yaml").read_text())
    from components.config import deep_merge

    params = parse_params(deep_merge(raw, overlay), "demo")
    assert params.models.profile == "demo"


def test_params_are_frozen():
    params = Params()
    with pytest.raises(pydantic.ValidationError):
        params.train.lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"train": {"lrr": 0.1}}, ["unknown key 'train.lrr'", "did you mean 'lr'", "momentum"]),
        ({"trian": {}}, ["unknown key 'trian'", "did you mean 'train'", "balance"]),
        ({"label": {"amg": {"points_per_sid": 8}}}, ["label.amg.points_per_sid", "points_per_side"]),
        ({"datasets": {"ade20k": {"rot": "/x"}}}, ["datasets.ade20k.rot", "root, url"]),
    ],
)
def test_unknown_keys_list_the_valid_ones(raw, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    for text in expected:
        assert text in str(err.value)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"train": {"lr": "fast"}}, ["train.lr", "float", "'fast'"]),
        ({"evaluate": {"short_side": "x"}}, ["evaluate.short_side", "int"]),
        ({"aligner": {"kind": "resnet"}}, ["aligner.kind", "transformer", "mlp", "linear"]),
        ({"models": {"profile": "tiny"}}, ["tiny", "demo", "paper"]),
        ({"features": {"image_size": 500}}, ["multiple of DINOv2's patch size 14"]),
        ({"label": {"presence": "ground_truth"}}, ["label.ground_truth_dir"]),
    ],
)
def test_wrong_types_name_the_key_and_the_type(raw, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    for text in expected:
        assert text in str(err.value)


def test_overrides_and_flatten(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"lr": 0.01}}))
    params = load_params(path, {"train.epochs": 3, "label.amg.points_per_side": 8})
    assert (params.train.lr, params.train.epochs, params.label.amg.points_per_side) == (0.01, 3, 8)
    flat = flatten(params)
    assert flat["train.lr"] == 0.01 and flat["label.amg.points_per_side"] == 8
    assert apply_overrides({"a": {"b": 1}}, {"a.c": 2}) == {"a": {"b": 1, "c": 2}}


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


# ------------------------------------------------- settings and vocabularies rejected when read
@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"label": {"templates": ["a {} next to a {}."]}}, "label.templates"),
        ({"label": {"templates": ["a photo."]}}, "label.templates"),
        ({"label": {"templates": []}}, "label.templates"),
        ({"download": {"datasets": ["pv21", "nosuch"]}}, "download.datasets"),
    ],
)
def test_bad_settings_are_rejected_naming_the_setting(raw, named):
    with pytest.raises(ConfigError, match=named) as err:
        parse_params(raw)
    assert "nosuch" not in str(raw) or "known" in str(err.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no class names"),
        (b"\n\n", "no class names"),
        ("caf\u00e9\nbread\n".encode("latin-1"), "not UTF-8"),
        (b"cat\ndog\ncat, kitty\n", "more than once"),
        ("".join(f"class{i}\n" for i in range(255)).encode(), "at most 254"),
    ],
)
def test_bad_vocabulary_files_are_rejected_naming_the_file(tmp_path, content, message):
    from flows.label import vocabulary_lines

    path = tmp_path / "vocab.txt"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as err:
        vocabulary_lines(str(path))
    assert str(path) in str(err.value)


def test_a_bom_is_not_part_of_the_first_class_name(tmp_path):
    from flows.label import vocabulary_lines

    path = tmp_path / "vocab.txt"
    path.write_bytes("\ufeffcat\ndog\n".encode())
    assert vocabulary_lines(str(path)) == ["cat", "dog"]


def test_an_empty_image_folder_is_rejected_before_any_model_loads(tmp_path):
    from flows.label import image_folders

    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    (tmp_path / "imgs" / ".DS_Store").write_bytes(b"")
    params = parse_params({"paths": {"images": str(tmp_path / "imgs"), "incoming": str(tmp_path / "none")}})
    with pytest.raises(ConfigError, match="paths.images") as err:
        image_folders(params)
    assert "no files" in str(err.value)


def test_evaluate_an_unknown_dataset_names_the_known_ones(tmp_path):
    from flows.evaluate import _dataset_root

    params = parse_params({"paths": {"datasets": str(tmp_path)}})
    with pytest.raises(ConfigError, match="unknown dataset 'nosuch'") as err:
        _dataset_root(params, "nosuch")
    assert "pv21" in str(err.value) and "fmbseg download nosuch" not in str(err.value)
