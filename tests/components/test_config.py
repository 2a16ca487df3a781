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


def test_evaluate_overrides_give_per_benchmark_settings():
    params = parse_params({"evaluate": {"short_side": 448, "overrides": {
        "pv21": {"bg_threshold": 0.3}, "cityscapes": {"short_side": 560, "amg": {"points_per_side": 16}}}}})
    ev = params.evaluate
    assert ev.for_benchmark("pv21").bg_threshold == 0.3 and ev.for_benchmark("pv21").short_side == 448
    city = ev.for_benchmark("cityscapes")
    assert (city.short_side, city.bg_threshold, city.amg.points_per_side) == (560, None, 16)
    assert city.amg.pred_iou_thresh == ev.amg.pred_iou_thresh  # the rest of amg stays evaluate's
    assert ev.for_benchmark("pv20") == ev.for_benchmark("ade20k")  # no override: evaluate's own settings
    flat = flatten(params)  # MLflow params: only what the user set, not every default of the override
    assert flat["evaluate.overrides.pv21.bg_threshold"] == 0.3
    assert "evaluate.overrides.pv21.short_side" not in flat


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"pv22": {"short_side": 336}}, ["evaluate.overrides", "unknown benchmark 'pv22'", "pv21"]),
        ({"pv21": {"short_sid": 336}}, ["unknown key 'evaluate.overrides.pv21.short_sid'", "did you mean 'short_side'"]),
        ({"pv21": {"benchmarks": ["pv20"]}}, ["unknown key 'evaluate.overrides.pv21.benchmarks'"]),
        ({"pv21": {"short_side": "x"}}, ["evaluate.overrides.pv21.short_side", "int"]),
        ({"pv20": {"bg_threshold": 0.3}}, ["bg_threshold is set for pv20: no background class"]),
    ],
)
def test_evaluate_overrides_are_validated_when_read(overrides, expected):
    with pytest.raises(ConfigError) as err:
        parse_params({"evaluate": {"overrides": overrides}})
    for text in expected:
        assert text in str(err.value)


def test_global_bg_threshold_needs_every_benchmark_to_have_background():
    with pytest.raises(ConfigError, match="pv20: no background class"):
        parse_params({"evaluate": {"benchmarks": ["pv21", "pv20"], "bg_threshold": 0.3}})
    ok = parse_params({"evaluate": {"benchmarks": ["pv21"], "bg_threshold": 0.3}})
    assert ok.evaluate.for_benchmark("pv21").bg_threshold == 0.3


def test_a_vocabulary_too_large_for_16bit_label_maps_is_refused_when_read(tmp_path, monkeypatch):
    # label maps are uint8 up to 255 classes, uint16 (65535 = unlabelled) beyond: at most 65535 classes
    monkeypatch.chdir(tmp_path)
    (tmp_path / "big.txt").write_text("".join(f"class {k}\n" for k in range(65536)))
    (tmp_path / "fits.txt").write_text("".join(f"class {k}\n" for k in range(847)))
    with pytest.raises(ConfigError) as err:
        parse_params({"label": {"vocabulary": "big.txt"}})
    assert "label.vocabulary" in str(err.value) and "big.txt has 65536 classes" in str(err.value)
    assert "at most 65535" in str(err.value)
    assert parse_params({"label": {"vocabulary": "fits.txt"}}).label.vocabulary == "fits.txt"
    assert parse_params({"label": {"vocabulary": "missing.txt"}})  # named by the label stage, as before


def test_shipped_params_name_the_paper_protocol(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert params.evaluate.protocol == "fmbseg"
    pv21 = params.evaluate.for_benchmark("pv21")
    assert (pv21.short_side, pv21.window, pv21.stride, pv21.templates) == (448, 448, 224, ("a photo of a {}.",))


def test_a_protocol_is_one_setting_and_the_user_overrides_win(tmp_path):
    protocol = tmp_path / "mine.yaml"
    protocol.write_text(yaml.safe_dump({
        "description": "a test protocol", "source": "tests",
        "short_side": 336, "window": 224, "stride": 112, "templates": "imagenet80",
        "overrides": {"cityscapes": {"short_side": 560}, "pv21": {"bg_threshold": 0.2}},
    }))
    ev = parse_params({"evaluate": {"protocol": str(protocol), "overrides": {"cityscapes": {"stride": 56}}}}).evaluate
    pv20, city, pv21 = ev.for_benchmark("pv20"), ev.for_benchmark("cityscapes"), ev.for_benchmark("pv21")
    assert (pv20.short_side, pv20.window, pv20.stride) == (336, 224, 112)
    assert len(pv20.templates) == 80 and pv20.templates[0] == "a bad photo of a {}."  # OpenAI's ImageNet set
    assert (city.short_side, city.stride) == (560, 56)  # the protocol's override, then the user's
    assert pv21.bg_threshold == 0.2 and pv20.bg_threshold is None


@pytest.mark.parametrize(
    "evaluate, expected",
    [
        ({"protocol": "nope"}, ["unknown protocol 'nope'", "fmbseg"]),
        ({"templates": "imagenet81"}, ["unknown template set 'imagenet81'", "imagenet80"]),
        ({"protocol": "fmbseg", "short_side": 336}, ["evaluate.short_side is 336", "protocol 'fmbseg' sets 448"]),
    ],
)
def test_protocol_mistakes_are_named(evaluate, expected):
    with pytest.raises(ConfigError) as err:
        parse_params({"evaluate": evaluate})
    for text in expected:
        assert text in str(err.value)


def test_every_shipped_protocol_is_valid(repo_root):
    from components.config import shipped_protocols

    names = shipped_protocols()
    assert "fmbseg" in names
    assert set(names) >= {"fmbseg", "tcl", "sclip", "clearclip", "proxyclip", "trident"}
    everything = ["pv21", "pv20", "pc59", "pc60", "pc459", "co80", "coco_object", "cs171", "cityscapes", "ade20k",
                  "ade847"]
    for name in names:
        ev = parse_params({"evaluate": {"protocol": name, "benchmarks": everything}}).evaluate
        for benchmark in everything:
            ev.for_benchmark(benchmark)
    sclip = parse_params({"evaluate": {"protocol": "sclip"}}).evaluate
    city, pv21, pv20 = (sclip.for_benchmark(n) for n in ("cityscapes", "pv21", "pv20"))
    assert (city.short_side, city.window, city.stride, len(city.templates), city.synonyms) == (560, 224, 112, 80, "max")
    assert (pv21.bg_threshold, pv21.logit_scale, pv20.bg_threshold) == (0.1, 65.0, None)
    pc60 = {name: parse_params({"evaluate": {"protocol": name}}).evaluate.for_benchmark("pc60") for name in names}
    assert [(pc60[n].bg_threshold, pc60[n].logit_scale) for n in ("sclip", "clearclip", "proxyclip", "trident")] == [
        (0.1, 50.0), (0.15, 50.0), (0.15, 40.0), (0.15, 40.0)]
    assert (pc60["trident"].short_side, pc60["sclip"].short_side, pc60["fmbseg"].bg_threshold) == (576, 336, None)


def test_a_logit_scale_needs_a_background_threshold():
    with pytest.raises(ConfigError, match="logit_scale is set for pv21 without a bg_threshold"):
        parse_params({"evaluate": {"benchmarks": ["pv21"], "logit_scale": 50.0}})
    ev = parse_params({"evaluate": {"overrides": {"pv21": {"logit_scale": 65.0, "bg_threshold": 0.1}},
                                    "synonyms": "max", "bg_prompts": False}}).evaluate
    assert (ev.for_benchmark("pv21").logit_scale, ev.for_benchmark("pv20").synonyms) == (65.0, "max")


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
        ("".join(f"class{i}\n" for i in range(65536)).encode(), "at most 65535"),
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
    from flows.scoring import dataset_root

    params = parse_params({"paths": {"datasets": str(tmp_path)}})
    with pytest.raises(ConfigError, match="unknown dataset 'nosuch'") as err:
        dataset_root(params, "nosuch")
    assert "pv21" in str(err.value) and "fmbseg download nosuch" not in str(err.value)


# ------------------------------------------------------------------------ paths, declared once
def test_every_stage_output_is_its_own_key_and_dvc_yaml_composes_none(repo_root):
    """dvc.yaml names each stage output by its own ``paths`` key: only a foreach item (one file or
    folder per dataset) is composed there, and the shipped values are SUB_PATHS' layout."""
    import re

    from components.config import SUB_PATHS, derived_paths

    raw = yaml.safe_load((repo_root / "params.yaml").read_text())
    assert set(SUB_PATHS) <= set(raw["paths"])
    assert {k: raw["paths"][k] for k in SUB_PATHS} == derived_paths(raw["paths"])
    dvc = (repo_root / "dvc.yaml").read_text()
    composed = re.findall(r"\$\{paths\.\w+\}/[^$\s:]+", dvc)
    assert composed == [], composed
    assert set(re.findall(r"\$\{paths\.(\w+)\}", dvc)) >= set(SUB_PATHS) - {"train_state", "eval_state"}


def test_a_params_file_without_the_sub_paths_places_them_under_its_bases():
    """Old params files (no ``paths.stage1`` ...) keep working: each sub-path follows its base."""
    paths = parse_params({"paths": {"pseudo": "elsewhere/pseudo", "models": "ckpt", "reports": "out"}}).paths
    assert (paths.stage1, paths.train_index) == ("elsewhere/pseudo/stage1", "elsewhere/pseudo/train_index.parquet")
    assert (paths.checkpoint, paths.train_state) == ("ckpt/aligner.pt", "ckpt/train_state.pt")
    assert (paths.overlays, paths.report_md, paths.stage1_csv) == ("out/overlays", "out/report.md", "out/stage1.csv")
    assert (paths.train_epochs, paths.stage1_metrics) == ("metrics/train_epochs.csv", "metrics/stage1")
    assert Params().paths.stage1 == "data/pseudo/stage1"


def test_a_sub_path_given_is_used_as_is():
    paths = parse_params({"paths": {"pseudo": "p", "stage1": "/mnt/store", "checkpoint": "best.pt"}}).paths
    assert (paths.stage1, paths.train_index, paths.checkpoint) == ("/mnt/store", "p/train_index.parquet", "best.pt")
    with pytest.raises(ConfigError, match="paths.stage1"):
        parse_params({"paths": {"stage1": 3}})


def test_settings_to_build_on_move_the_sub_paths_with_their_base(repo_root):
    """profile_settings leaves out the sub-paths that only follow their base, so an overlay that
    moves ``paths.pseudo`` (`fmbseg label --images --out`) moves the Stage 1 store with it, while
    a sub-path set elsewhere stays where it is set."""
    from components.config import deep_merge, without_derived_paths
    from flows.common import profile_settings

    raw = profile_settings("demo")
    assert parse_params(raw) == parse_params(deep_merge(yaml.safe_load((repo_root / "params.yaml").read_text()),
                                                        yaml.safe_load((repo_root / "configs/demo.yaml").read_text())))
    moved = parse_params(deep_merge(raw, {"paths": {"pseudo": "out"}})).paths
    assert (moved.stage1, moved.train_index) == ("out/stage1", "out/train_index.parquet")
    kept = without_derived_paths({"paths": {"pseudo": "p", "stage1": "/mnt/store", "train_index": "p/train_index.parquet"}})
    assert kept == {"paths": {"pseudo": "p", "stage1": "/mnt/store"}}


# --------------------------------------------- combinations that cannot work, refused when read
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"evaluate": {"protocol": None, "stride": 500}}, ["evaluate.stride 500 > evaluate.window 448"]),
        ({"evaluate": {"protocol": None, "overrides": {"pv20": {"window": 112}}}},
         ["evaluate.stride 224 > evaluate.window 112 for pv20"]),
        ({"evaluate": {"protocol": None, "stride": 0}}, ["evaluate.stride", "greater than or equal to 1"]),
        ({"label": {"grid": 2, "min_crops": 4}}, ["label.min_crops 4", "label.grid² = 4 crops"]),
        ({"label": {"amg": {"min_area_frac": 0.5, "max_area_frac": 0.1}}}, ["label.amg: min_area_frac 0.5 > max_area_frac"]),
        ({"evaluate": {"amg": {"min_area_frac": 0.5, "max_area_frac": 0.1}}}, ["evaluate.amg: min_area_frac"]),
        ({"train": {"batch_size": 0}}, ["train.batch_size"]),
        ({"features": {"batch_size": 0}}, ["features.batch_size"]),
        ({"evaluate": {"batch_size": 0}}, ["evaluate.batch_size"]),
        ({"label": {"crop_batch": 0}}, ["label.crop_batch"]),
        ({"label": {"amg": {"points_per_batch": 0}}}, ["label.amg.points_per_batch"]),
        ({"train": {"loss": "infonce"}}, ["train.loss", "tsupcon", "prototype", "supcon"]),
    ],
)
def test_combinations_that_cannot_work_fail_when_read(raw, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    for text in expected:
        assert text in str(err.value)
    assert "; got {" not in str(err.value)  # a section's message, not the section's whole input


def test_the_edges_of_those_combinations_are_valid():
    parse_params({"evaluate": {"protocol": None, "window": 224, "stride": 224},
                  "label": {"grid": 2, "min_crops": 3, "amg": {"min_area_frac": 0.2, "max_area_frac": 0.2}}})
    # a benchmark's override may change both sides of the pair
    parse_params({"evaluate": {"protocol": None, "overrides": {"pv20": {"window": 112, "stride": 56}}}})


def test_model_stages_check_the_features_side_against_the_students_patch():
    from flows.common import check_models

    check_models(parse_params({}))  # the paper's: 518 = 37 x 14
    with pytest.raises(ValueError, match="multiple of the patch size 16 of the student 'dinov3_vitl16'"):
        check_models(parse_params({"models": {"profiles": {"paper": {"clip": "ViT-L-14-336/openai", "sam": "vit_h",
                                                                       "dino": "dinov3_vitl16"}}}}))
    with pytest.raises(ValueError, match="unknown model spec 'dinov9'.*dinov3_vitl16"):
        check_models(parse_params({"models": {"profiles": {"paper": {"clip": "ViT-L-14-336/openai", "sam": "vit_h",
                                                                       "dino": "dinov9"}}}}))
    with pytest.raises(ValueError, match="'vit_h' is a sam model"):
        check_models(parse_params({"models": {"profiles": {"paper": {"clip": "ViT-L-14-336/openai", "sam": "vit_h",
                                                                       "dino": "vit_h"}}}}))


def test_train_settings_are_the_components_own_by_field_name():
    """flows/common.py builds TrainSettings by name from aligner + train, and the config's Literal
    types are the component's (declared once, in components/aligner/settings.py)."""
    from dataclasses import fields
    from typing import get_args

    from components.aligner.losses import LOSSES
    from components.aligner.model import ALIGNER_KINDS
    from components.aligner.settings import AlignerKind, LossName, TrainSettings
    from components.config import AlignerConfig, TrainConfig
    from flows.common import train_settings

    assert AlignerConfig.model_fields["kind"].annotation is AlignerKind
    assert TrainConfig.model_fields["loss"].annotation is LossName
    assert tuple(LOSSES) == get_args(LossName) and ALIGNER_KINDS == get_args(AlignerKind)
    params = parse_params({"aligner": {"kind": "mlp", "num_heads": 2}, "train": {"loss": "supcon", "lr": 0.3, "seed": 7}})
    settings = train_settings(params.aligner, params.train, in_dim=64, ignore_index=65535)
    assert isinstance(settings, TrainSettings)
    assert (settings.kind, settings.num_heads, settings.loss, settings.lr, settings.seed) == ("mlp", 2, "supcon", 0.3, 7)
    assert (settings.in_dim, settings.ignore_index, settings.epochs) == (64, 65535, params.train.epochs)
    from_config = {f.name for f in fields(TrainSettings)} - {"in_dim", "ignore_index"}
    assert from_config <= set(AlignerConfig.model_fields) | set(TrainConfig.model_fields)


def test_stage1_settings_are_the_components_own_by_field_name():
    """flows/common.py builds Stage1Settings by name from label (and its AmgSettings from label.amg),
    and the config's dense_mode type is the components' (declared once, in
    components/models/dense_modes.py, as clip_dense's MODES and Stage1Settings' dense_mode)."""
    import subprocess
    import sys
    import typing
    from dataclasses import fields

    from components.config import AmgConfig, LabelConfig
    from components.labelling.settings import AmgSettings, DenseMode, Stage1Settings
    from components.models.clip_dense import MODES
    from flows.common import stage1_settings

    assert LabelConfig.model_fields["dense_mode"].annotation is DenseMode
    assert typing.get_type_hints(Stage1Settings)["dense_mode"] is DenseMode
    assert MODES == typing.get_args(DenseMode)
    params = parse_params({"label": {"grid": 3, "dense_mode": "clearclip", "crop_batch": 5, "amg": {
        "points_per_side": 7, "box_nms_thresh": 0.5, "min_area_frac": 0.02, "max_area_frac": 0.6}}})
    settings = stage1_settings(params.label)
    assert isinstance(settings, Stage1Settings) and isinstance(settings.amg, AmgSettings)
    assert (settings.grid, settings.dense_mode, settings.crop_batch) == (3, "clearclip", 5)
    assert (settings.amg.points_per_side, settings.amg.box_nms_thresh) == (7, 0.5)
    assert (settings.amg.min_area_frac, settings.amg.max_area_frac) == (0.02, 0.6)
    assert settings.sam_size == params.label.sam_size and settings.amg.points_per_batch == params.label.amg.points_per_batch
    assert {f.name for f in fields(Stage1Settings)} <= set(LabelConfig.model_fields)
    assert [f.name for f in fields(AmgSettings)] == list(AmgConfig.model_fields)  # one shape
    # what components/config/ builds on stays importable without torch (the package __init__ files load lazily)
    code = "import sys, components.config, flows.common; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
