"""The SAM 3 concept teacher in Stage 1 (variant stage1_sam3): the registry's teacher specs, the
settings, and the variant end to end on synthetic images with the miniature ``mini-sam3``
(label -> store -> balance -> export), resume, a vocabulary longer than the chunk size, the
semi-supervised form, and images on which nothing passes presence (unlabelled and counted)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

import flows.label as label_module
from components.config import ConfigError, load_params, parse_params
from components.io import encode_label_png
from components.labelling.balance import balance_index
from components.labelling.concepts import ConceptSettings, ConceptTeacher
from components.labelling.store import SHARD_SCHEMA, TEACHER_SHARD_SCHEMA, PseudoLabels, read_records
from components.models.registry import build_teacher, get_spec, list_specs
from components.models.sam3 import Sam3Teacher
from components.models.weights import MissingWeightsError
from demoworld.synthetic import write_synthetic_unlabelled
from flows.balance import balance_flow
from flows.label import check_teacher, run_label, settings_hashes, vocabulary_lines

VOC21 = 21
PARAMS: dict[str, Any] = {
    "paths": {"images": "imgs", "incoming": "incoming", "pseudo": "pseudo", "reports": "reports"},
    "models": {"profile": "mini", "device": "cpu", "dtype": "fp32", "teacher": "mini-sam3"},
    "label": {
        "vocabulary": "voc21",  # 21 classes, more prompts (synonyms): many chunks of 4
        "grid": 2,
        "sam_size": 64,
        "label_size": 48,
        "amg": {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                "min_area_frac": 0.0, "max_area_frac": 1.0},
        "shard_size": 2,
        "crop_batch": 4,
        "num_workers": 1,
        # the random miniature's presence scores hover near 0.5: 0 lets every class through
        "concepts": {"presence": 0.0, "instance": 0.5, "mask": 0.5, "pixel": 0.0, "chunk_size": 4},
    },
    "balance": {"ratio": 0.5, "seed": 0, "variants": {"stage1_sam3": 1.0}},
    "orchestration": {"task_runner": "threads", "max_workers": 1},
}


def _project(root: Path, params: dict[str, Any], images: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    write_synthetic_unlabelled(root / "imgs", num_images=images, seed=0, size=(48, 64))
    return root


def _with(**label_concepts: Any) -> dict[str, Any]:
    params = json.loads(json.dumps(PARAMS))
    params["label"]["concepts"].update(label_concepts)
    return params


# ------------------------------------------------------------------------------------ registry
def test_registry_builds_the_miniature_teacher_and_names_the_licence_for_absent_gated_weights(tmp_path: Path) -> None:
    assert list_specs("teacher") == ["sam3", "mini-sam3"]
    spec = get_spec("sam3")
    assert (spec.hub_repo, spec.licence, [f.name for f in spec.weights]) == (
        "facebook/sam3", "SAM License", ["config.json", "model.safetensors"])
    assert all(f.sha256 is None for f in spec.weights)
    teacher = build_teacher("mini-sam3")
    assert isinstance(teacher, Sam3Teacher) and teacher.image_size == 112
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.model.parameters())
    again = build_teacher("mini-sam3")  # seeded: the same weights every time
    assert all(torch.equal(a, b) for a, b in zip(teacher.model.state_dict().values(),
                                                 again.model.state_dict().values(), strict=True))
    with pytest.raises(MissingWeightsError) as err:
        build_teacher("sam3", weights_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    for part in ("https://huggingface.co/facebook/sam3", "HF_TOKEN", "fmbseg weights fetch sam3", "SAM License"):
        assert part in message
    with pytest.raises(ValueError, match="not teacher"):
        build_teacher("mini-sam")


def test_settings_teacher_and_concepts_and_the_hash() -> None:
    params = parse_params(json.loads(json.dumps(PARAMS)), "test")
    assert params.models.teacher == "mini-sam3" and params.label.concepts.chunk_size == 4
    assert ConceptSettings(**params.label.concepts.model_dump()).prompt == "vocabulary"
    assert params.balance.shares() == {"stage1_1": 1.0, "stage1_2": 0.5, "stage1_sam3": 1.0}
    with pytest.raises(ConfigError, match="unknown variant"):
        parse_params({"balance": {"variants": {"stage9": 1.0}}}, "test")
    with pytest.raises(ConfigError, match="prompt"):
        parse_params({"label": {"concepts": {"prompt": "some"}}}, "test")
    with pytest.raises(ConfigError, match="not a teacher spec"):
        check_teacher(parse_params({"models": {"teacher": "mini-sam"}}, "test"))
    with pytest.raises(MissingWeightsError, match="HF_TOKEN"):
        check_teacher(parse_params({"models": {"teacher": "sam3", "weights_dir": "/nonexistent"}}, "test"))

    vocabulary = vocabulary_lines("voc21")
    no_teacher = {k: v for k, v in PARAMS["models"].items() if k != "teacher"}
    paper = dict(PARAMS, models=no_teacher, label={k: v for k, v in PARAMS["label"].items() if k != "concepts"})
    plain = settings_hashes(parse_params(paper, "t"), vocabulary)
    with_defaults = dict(paper, label={**paper["label"], "concepts": PARAMS["label"]["concepts"]})
    assert settings_hashes(parse_params(with_defaults, "t"), vocabulary) == plain  # no teacher: concepts don't count
    taught = settings_hashes(parse_params(PARAMS, "t"), vocabulary)
    assert taught[0] != plain[0] and taught[1] == plain[1]  # the labels depend on it, SAM's masks do not
    other = settings_hashes(parse_params(_with(chunk_size=5), "t"), vocabulary)
    assert other[0] != taught[0]


def test_balance_shares_per_variant() -> None:
    records = {"image_id": [f"i{k}" for k in range(8)], "image_path": ["p"] * 8, "shard": ["s"] * 8, "row": range(8)}
    import pandas as pd

    records = pd.DataFrame(records)
    paper = balance_index(records, 0.75, 0)
    same = balance_index(records, 0.75, 0, {"stage1_1": 1.0, "stage1_2": 0.75})
    assert paper.equals(same)
    index = balance_index(records, 0.75, 0, {"stage1_sam3": 0.5, "stage1_1": 0.0})
    counts = index["variant"].value_counts().to_dict()
    assert counts == {"stage1_2": 6, "stage1_sam3": 4}
    assert index[index["variant"] == "stage1_2"].reset_index(drop=True).equals(
        paper[paper["variant"] == "stage1_2"].reset_index(drop=True))


# ---------------------------------------------------------------------------------- end to end
def test_teacher_variant_end_to_end_label_store_balance_export_and_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None
) -> None:
    from components.labelling.concepts import label_with_teacher
    from components.labelling.export import check_variants
    from flows.export import export_flow

    project = _project(tmp_path / "p", PARAMS)
    monkeypatch.chdir(project)
    chunks: list[int] = []
    real_iter = Sam3Teacher.iter_chunks

    def counting(self: Sam3Teacher, vision: Any, vocabulary: Any, prompts: torch.Tensor, chunk_size: int) -> Any:
        for index, out in real_iter(self, vision, vocabulary, prompts, chunk_size):
            chunks.append(int(index.numel()))
            yield index, out

    monkeypatch.setattr(Sam3Teacher, "iter_chunks", counting)
    summary = run_label("params.yaml")
    out = project / "pseudo" / "stage1"
    assert summary["images_labelled"] == 3 and summary["images_unlabelled_stage1_sam3"] == 0
    assert summary["seconds_per_image"]["teacher"] > 0
    vocabulary = vocabulary_lines("voc21")
    prompts = ConceptTeacher.for_vocabulary(build_teacher("mini-sam3"), ConceptSettings(), vocabulary).prompts
    assert len(prompts) > VOC21 > 4
    assert max(chunks) == 4 and sum(chunks) == 3 * len(prompts)  # every prompt, 4 at a time, per image

    labels = PseudoLabels(out)
    assert labels.has_variant("stage1_sam3")
    for shard in sorted((out / "shards").glob("*[0-9a-f].parquet")):
        assert pq.read_schema(shard).equals(TEACHER_SHARD_SCHEMA, check_metadata=False)
    # the stored map is label_with_teacher's on the decoded image, all prompts, CLIP presence unused
    teacher = ConceptTeacher.for_vocabulary(build_teacher("mini-sam3"), ConceptSettings(**PARAMS["label"]["concepts"]),
                                            vocabulary)
    image_id = labels.image_ids[0]
    from components.datasets.readers import read_image_rgb

    image = read_image_rgb(project / labels.index.set_index("image_id").loc[image_id, "image_path"])
    expected = label_with_teacher(teacher.teacher, image, teacher.prompts, teacher.prompt_classes, VOC21, (48, 48),
                                  teacher.settings)
    stored = labels.read(image_id, "stage1_sam3")
    np.testing.assert_array_equal(stored, expected.label)
    assert stored.shape == (48, 48) and stored.dtype == np.uint8 and (stored != 255).any()
    np.testing.assert_allclose(labels.teacher_presence(image_id), expected.presence, rtol=1e-6)

    # balance: every image's stage1_sam3 map joins, next to the paper's two
    balance = balance_flow("params.yaml")
    assert (balance["stage1_1"], balance["stage1_2"], balance["stage1_sam3"]) == (3, 2, 3)
    index = pq.read_table(project / "pseudo" / "train_index.parquet").to_pandas()
    for row in index[index["variant"] == "stage1_sam3"].itertuples():
        np.testing.assert_array_equal(PseudoLabels(out).read(row.image_id, row.variant),
                                      labels.read(row.image_id, "stage1_sam3"))

    # export
    assert check_variants(["both"]) == ["stage1_1", "stage1_2"]
    exported = export_flow(out.as_posix(), (project / "export").as_posix(), "stage1_sam3")
    assert exported["variants"]["stage1_sam3"]["images"] == 3
    with Image.open(project / "export" / "stage1_sam3" / f"{image_id}.png") as png:
        assert png.size == (64, 48)

    # resume: nothing to do, no teacher pass
    chunks.clear()
    again = run_label("params.yaml")
    assert again["shards_this_run"] == 0 and chunks == []

    # a concept setting changes the labels: everything is relabelled, SAM's automatic masks reused
    params = _with(presence=1.0)  # nothing reaches a presence of 1: every image unlabelled, and counted
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    summary = run_label("params.yaml")
    assert summary["images_labelled_this_run"] == 3 == summary["masks_reused_this_run"]
    assert summary["images_unlabelled_stage1_sam3"] == 3
    labels = PseudoLabels(out)
    for image_id in labels.image_ids:
        assert (labels.read(image_id, "stage1_sam3") == 255).all()
    assert all(sorted(r.unlabelled) == sorted(r.rows) for r in read_records(out))


def test_without_a_teacher_the_store_is_the_papers_and_the_variant_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None
) -> None:
    from flows.export import export_flow

    params = json.loads(json.dumps(PARAMS))
    params["models"].pop("teacher")
    params["balance"]["variants"] = {}
    project = _project(tmp_path / "p", params, images=2)
    monkeypatch.chdir(project)
    summary = run_label("params.yaml")
    assert "images_unlabelled_stage1_sam3" not in summary and "teacher" not in summary["seconds_per_image"]
    out = project / "pseudo" / "stage1"
    for shard in sorted((out / "shards").glob("*[0-9a-f].parquet")):
        assert pq.read_schema(shard).equals(SHARD_SCHEMA, check_metadata=False)
    assert all("unlabelled" not in json.loads(p.read_text()) for p in (out / "shards").glob("*.json"))
    labels = PseudoLabels(out)
    assert not labels.has_variant("stage1_sam3")
    with pytest.raises(ValueError, match="models.teacher"):
        labels.read(labels.image_ids[0], "stage1_sam3")
    with pytest.raises(ValueError, match="no stage1_sam3 maps"):
        export_flow(out.as_posix(), (project / "export").as_posix(), "stage1_sam3")
    params["balance"]["variants"] = {"stage1_sam3": 1.0}
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match="holds no such maps"):
        balance_flow("params.yaml")


def test_semi_supervised_teacher_labels_only_ground_truth_classes_and_detected_prompting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, prefect_harness: None
) -> None:
    gt = tmp_path / "gt"
    (gt / "labels" / "val").mkdir(parents=True)
    (gt / "classes.txt").write_text("car\nperson\n")
    for k in range(2):
        label = np.full((48, 64), 255, dtype=np.uint8)
        label[20:, : 16 * (k + 1)] = k % 2
        (gt / "labels" / "val" / f"img_{k:05d}.png").write_bytes(encode_label_png(label))
    params = _with(prompt="detected")
    params["label"].update({"presence": "ground_truth", "ground_truth_dir": str(gt)})
    project = _project(tmp_path / "p", params, images=2)
    monkeypatch.chdir(project)
    decoded: list[list[int]] = []
    real_iter = Sam3Teacher.iter_chunks

    def recording(self: Sam3Teacher, vision: Any, vocabulary: Any, prompts: torch.Tensor, chunk_size: int) -> Any:
        decoded.append(prompts.tolist())
        yield from real_iter(self, vision, vocabulary, prompts, chunk_size)

    monkeypatch.setattr(Sam3Teacher, "iter_chunks", recording)
    run_label("params.yaml")
    labels = PseudoLabels(project / "pseudo" / "stage1")
    voc = labels.vocabulary
    car, person = voc.index("car"), voc.index("person")
    teacher = ConceptTeacher.for_vocabulary(build_teacher("mini-sam3"), ConceptSettings(), voc)
    for image_id, cls in (("img_00000", car), ("img_00001", person)):
        values = set(np.unique(labels.read(image_id, "stage1_sam3")).tolist())
        assert values <= {cls, 255} and cls in values
    # "detected": only the present class's prompts are decoded
    assert [sorted({int(teacher.prompt_classes[i]) for i in p}) for p in decoded] == [[car], [person]]


def test_label_images_variant_stage1_sam3_needs_a_teacher(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    images = tmp_path / "imgs"
    write_synthetic_unlabelled(images, num_images=1, seed=0, size=(32, 32))
    params = json.loads(json.dumps(PARAMS))
    params["models"].pop("teacher")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["label", "--images", str(images), "--out", str(out), "--classes", "sky,car",
                                      "--variant", "stage1_sam3", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2 and "models.teacher" in result.output
    assert not out.exists()  # refused before any write


@pytest.mark.slow
def test_label_images_variant_stage1_sam3_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     prefect_harness: None) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    images = tmp_path / "imgs"
    write_synthetic_unlabelled(images, num_images=2, seed=0, size=(40, 56))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["label", "--images", str(images), "--out", str(out), "--classes", "sky,grass,car",
                                      "--variant", "stage1_sam3", "--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "stage1_sam3").iterdir()) == ["img_00000.png", "img_00001.png"]
    assert (out / "stage1_sam3.json").is_file() and not (out / "stage1_1").exists()


def test_label_shard_counts_unlabelled_only_with_a_teacher() -> None:
    # ConceptTeacher.for_vocabulary: one prompt per synonym, owned by its line
    teacher = ConceptTeacher.for_vocabulary(build_teacher("mini-sam3"), ConceptSettings(), ["sky", "person, man", "car"])
    assert teacher.prompts == ["sky", "person", "man", "car"]
    assert teacher.prompt_classes.tolist() == [0, 1, 1, 2]
    assert label_module.check_teacher(parse_params({}, "t")) is None


# ------------------------------------------------------------------------------ evaluate-stage1
def test_evaluate_stage1_scores_the_teacher_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 prefect_harness: None, mlflow_uri: str) -> None:
    """With a teacher, evaluate-stage1 adds its two Table-2-style rows (a metrics file each); the
    report reads them next to the paper's variants."""
    from components.evaluation.report import stage1_rows
    from flows.evaluate_stage1 import evaluate_stage1_flow
    from flows.report import read_stage1_metrics
    from tests.flows.test_evaluate import make_project, sequential

    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, ("pv21",), num_images=2, overrides={
        "models": {"teacher": "mini-sam3"}, "label": {"concepts": {"presence": 0.0, "pixel": 0.0, "chunk_size": 8}}})
    variants = ["stage1_1", "stage1_sam3", "stage1_sam3_semi"]
    results = sequential(evaluate_stage1_flow)("pv21", variants)
    assert list(results) == variants
    for variant in variants:
        metrics = json.loads((tmp_path / "metrics" / "stage1" / f"pv21_{variant}.json").read_text())
        assert metrics == results[variant] and metrics["images"] == 2 and metrics["mIoU"] >= 0
    assert results["stage1_sam3"]["aAcc"] > 0  # every pixel labelled (presence 0, pixel 0): some are right
    params = load_params(tmp_path / "params.yaml")
    rows = {r["variant"]: r for r in stage1_rows(read_stage1_metrics(params))}
    assert rows["stage1_sam3"]["paper"] is None and rows["stage1_1"]["paper"] is not None
    with pytest.raises(ValueError, match="need models.teacher"):
        from components.labelling.settings import stage1_variants

        stage1_variants(["stage1_sam3"])


def test_cli_label_with_absent_gated_teacher_weights_is_one_line_exit_2(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    params = json.loads(json.dumps(PARAMS))
    params["models"].update(teacher="sam3", weights_dir=str(tmp_path / "weights"))
    project = _project(tmp_path / "p", params, images=1)
    monkeypatch.chdir(project)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    result = CliRunner().invoke(app, ["label"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "https://huggingface.co/facebook/sam3" in lines[0] and "HF_TOKEN" in lines[0]
    assert not (project / "pseudo").exists()  # nothing written, no model built
