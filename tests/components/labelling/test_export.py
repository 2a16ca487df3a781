"""`fmbseg export` and `fmbseg label --images`: a Stage 1 store as PNG label maps + COCO JSON that
pycocotools loads and decodes back exactly, and Stage 1 on any folder with any class names."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools.coco import COCO
from typer.testing import CliRunner

from components.io import decode_label_png, encode_label_png
from components.labelling.export import export_variant, resize_nearest, write_classes
from components.labelling.store import (
    SHARD_SCHEMA,
    ImageEntry,
    PseudoLabels,
    ShardRecord,
    merge_outputs,
    write_shard,
)
from demoworld.synthetic import write_synthetic_unlabelled
from flows.cli import app
from tests import REPO_ROOT
from tests.oneoff_runs import run_fmbseg

VOCABULARY = ["sky", "grass, lawn", "car"]
# image id -> (original height, width): a square, a wide, a tall one, one in a sub-folder
SIZES = {"a": (40, 40), "b": (30, 52), "sub/c": (57, 21)}


def _write_store(root: Path, maps: dict[str, tuple[np.ndarray, np.ndarray]],
                 vocabulary: list[str] = VOCABULARY) -> PseudoLabels:
    """A real Stage 1 store (one shard, merged) holding the given [L, L] uint8 (or uint16) maps per image."""
    entries = [ImageEntry(i, f"imgs/{i}.{'png' if i == 'a' else 'jpg'}", f"sha-{i}") for i in maps]
    rows = [{
        "image_id": e.image_id, "image_path": e.path, "sha256": e.sha256,
        "height": SIZES[e.image_id][0], "width": SIZES[e.image_id][1],
        "stage1_1": encode_label_png(maps[e.image_id][0]), "stage1_2": encode_label_png(maps[e.image_id][1]),
        "sam_size": 16, "amg_masks": [],
    } for e in entries]
    assert set(rows[0]) == set(SHARD_SCHEMA.names)
    record = ShardRecord("s0", "h", "m", entries, rows={e.image_id: k for k, e in enumerate(entries)})
    write_shard(root, record, rows, [])
    merge_outputs(root, entries=entries, done=[record], skipped=[], vocabulary=vocabulary)
    return PseudoLabels(root)


def _decoded(coco: COCO, image: dict, none: int = 255) -> np.ndarray:
    """The label map an image's annotations describe (category id - 1 per pixel, `none` elsewhere:
    255 in an 8-bit map, 65535 in a 16-bit one)."""
    label = np.full((image["height"], image["width"]), none, np.uint8 if none == 255 else np.uint16)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
        mask = coco.annToMask(ann).astype(bool)
        assert not (label[mask] != none).any(), "annotations of one image overlap"
        label[mask] = ann["category_id"] - 1
        ys, xs = np.nonzero(mask)
        assert ann["area"] == mask.sum() and ann["iscrowd"] == 0
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    return label


def test_coco_export_loads_and_decodes_back_to_the_label_maps(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    maps = {}
    for image_id in SIZES:  # classes in scattered regions (one annotation holds several), 255 holes
        pair = [rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(16, 16)) for _ in range(2)]
        maps[image_id] = (pair[0], pair[1])
    maps["a"][1][:] = 255  # an image without any label in one variant: no annotation, still listed
    labels = _write_store(tmp_path / "store", maps)
    out = tmp_path / "out"
    assert write_classes(labels, out).read_text().splitlines() == VOCABULARY

    for v, variant in enumerate(("stage1_1", "stage1_2")):
        summary = export_variant(labels, out, variant)
        coco = COCO(summary.coco_json)
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["sky", "grass", "car"]
        images = coco.loadImgs(coco.getImgIds())
        assert [im["file_name"] for im in images] == ["a.png", "b.jpg", "sub/c.jpg"]
        for image in images:
            image_id = image["file_name"].rsplit(".", 1)[0]
            png = np.asarray(Image.open(out / variant / f"{image_id}.png"))
            assert png.dtype == np.uint8 and png.shape == SIZES[image_id] == (image["height"], image["width"])
            reference = F.interpolate(torch.from_numpy(maps[image_id][v])[None, None].float(),
                                      size=SIZES[image_id], mode="nearest-exact")[0, 0].to(torch.uint8).numpy()
            assert np.array_equal(png, reference)
            assert np.array_equal(_decoded(coco, image), png)
        assert summary.annotations == len(coco.getAnnIds())

    # a rerun after an image left the store leaves no label map of it behind
    del maps["b"]
    labels = _write_store(tmp_path / "store", maps)
    export_variant(labels, out, "stage1_1")
    assert sorted(p.relative_to(out / "stage1_1").as_posix() for p in (out / "stage1_1").rglob("*.png")) == [
        "a.png", "sub/c.png"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_a_store_of_more_than_255_classes_exports_16_bit_maps_and_its_coco_ids(tmp_path: Path) -> None:
    vocabulary = [f"class {k}" for k in range(300)]
    rng = np.random.default_rng(1)
    maps = {i: tuple(rng.choice(np.array([0, 255, 299, 65535], np.uint16), size=(16, 16)) for _ in range(2))
            for i in SIZES}
    labels = _write_store(tmp_path / "store", maps, vocabulary)
    assert labels.read("a", "stage1_1").dtype == np.uint16
    summary = export_variant(labels, tmp_path / "out", "stage1_1")
    coco = COCO(summary.coco_json)
    for image in coco.loadImgs(coco.getImgIds()):
        image_id = image["file_name"].rsplit(".", 1)[0]
        png = np.asarray(Image.open(tmp_path / "out" / "stage1_1" / f"{image_id}.png")).astype(np.uint16)
        assert np.array_equal(png, resize_nearest(maps[image_id][0], *SIZES[image_id]))
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert sorted(a["category_id"] for a in anns) == [1, 256, 300]  # class 255 is a class; 65535 is none


def test_resize_nearest_is_pixel_centre_sampling() -> None:
    label = np.arange(35, dtype=np.uint8).reshape(5, 7)
    for size in [(5, 7), (11, 3), (2, 20)]:
        reference = F.interpolate(torch.from_numpy(label)[None, None].float(), size=size, mode="nearest-exact")
        assert np.array_equal(resize_nearest(label, *size), reference[0, 0].to(torch.uint8).numpy())


def _env() -> dict[str, str]:
    repo = str(REPO_ROOT)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}


def test_export_runs_without_a_prefect_server_and_as_a_named_flow_with_one(tmp_path: Path, prefect_harness: str) -> None:
    """`fmbseg export` without PREFECT_API_URL starts no Prefect server (flows.runmode: the flow's
    own function); with it, the same export is a flow run named after what it exports."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    rng = np.random.default_rng(0)
    _write_store(tmp_path / "store", {i: (rng.choice(np.array([0, 1, 2, 255], np.uint8), size=(16, 16)),
                                          rng.choice(np.array([0, 1, 255], np.uint8), size=(16, 16))) for i in SIZES})
    plain, started = run_fmbseg(["export", "--store", "store", "--out", "plain"], tmp_path)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert not started, plain.stderr[-3000:]
    assert json.loads(plain.stdout)["variants"]["stage1_2"]["images"] == len(SIZES)

    flowed, started = run_fmbseg(["export", "--store", "store", "--out", "flowed"], tmp_path, api_url=prefect_harness)
    assert flowed.returncode == 0 and not started, flowed.stderr[-3000:]
    for name in ("classes.txt", "stage1_1.json", "stage1_2.json", "stage1_1/sub/c.png"):
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "flowed" / name).read_bytes()
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["export-both"])))
    ours = [r for r in runs if r.parameters.get("out") == "flowed"]
    assert len(ours) == 1 and ours[0].state is not None and ours[0].state.is_completed()


@pytest.mark.parametrize("fillers", [0, pytest.param(297, marks=pytest.mark.slow)], ids=["8bit", "16bit"])
def test_label_own_folder_command_end_to_end(tmp_path: Path, fillers: int) -> None:
    """`fmbseg label --images --classes --out --profile demo --overlays --overlay-size full` in a
    folder without params.yaml, and without a Prefect server (none starts: flows.runmode): the
    demo's miniature models label real JPEG and PNG files, with full-resolution overlays; then
    `fmbseg export` re-exports one variant.
    With 297 more classes before the three (a 300-class --vocabulary) every map is a 16-bit PNG."""
    images = tmp_path / "photos"
    write_synthetic_unlabelled(images, num_images=2, seed=0, size=(48, 64))
    (images / "sub").mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (36, 28, 3), dtype=np.uint8)).save(images / "sub" / "p.png")
    classes = [f"thing {k}" for k in range(fillers)] + ["sky", "grass", "car"]
    if fillers:
        (tmp_path / "vocabulary.txt").write_text("\n".join(classes) + "\n")
    chosen = ["--vocabulary", "vocabulary.txt"] if fillers else ["--classes", "sky,grass,car"]
    done, started = run_fmbseg(["label", "--images", "photos", *chosen, "--out", "labels", "--profile", "demo",
                                "--overlays", "--overlay-size", "full"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not started, done.stderr[-3000:]
    result = json.loads(done.stdout[done.stdout.index("{\n"):])
    out = tmp_path / "labels"
    assert (out / "classes.txt").read_text().splitlines() == classes
    assert (out / "stage1" / "index.parquet").exists() and (out / "label_params.yaml").exists()
    sizes = {"img_00000": (48, 64), "img_00001": (48, 64), "sub/p": (36, 28)}
    for variant in ("stage1_1", "stage1_2"):
        assert result["variants"][variant]["images"] == 3
        assert result["variants"]["stage1_1"]["annotations"] >= 3  # every image has a detected class
        coco = COCO(out / f"{variant}.json")
        for image in coco.loadImgs(coco.getImgIds()):
            image_id = image["file_name"].rsplit(".", 1)[0]
            png = decode_label_png((out / variant / f"{image_id}.png").read_bytes())
            assert png.dtype == (np.uint16 if fillers else np.uint8)
            assert png.shape == sizes[image_id] and np.array_equal(_decoded(coco, image, 65535 if fillers else 255), png)
    assert result["overlays"]["images"] == 3
    for image_id, (height, width) in sizes.items():  # full resolution: image | stage1_1 | stage1_2, 6 px apart
        with Image.open(out / "overlays" / f"{image_id}.jpg") as overlay:
            assert overlay.format == "JPEG" and overlay.width == 3 * width + 2 * 6 and overlay.height > height
    assert not (tmp_path / "params.yaml").exists()
    if fillers:
        return  # the re-export below is the same code for 16-bit maps (an in-process Prefect run per test)

    again = CliRunner().invoke(app, ["export", "--store", str(out / "stage1"), "--out", str(tmp_path / "again"),
                                     "--variant", "stage1_2"])
    assert again.exit_code == 0, again.output
    assert (tmp_path / "again" / "stage1_2.json").read_bytes() == (out / "stage1_2.json").read_bytes()
    assert not (tmp_path / "again" / "stage1_1").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["label", "--images", "nowhere", "--classes", "a", "--out", "o"], "--images nowhere is not a folder"),
    (["label", "--images", "imgs", "--out", "o"], "exactly one of --classes and --vocabulary"),
    (["label", "--images", "imgs", "--classes", "a,,b", "--out", "o"], "empty class name"),
    (["label", "--images", "imgs", "--classes", "a"], "--images needs --out"),
    (["label", "--images", "imgs", "--classes", "a", "--out", "imgs/o"], "must not contain each other"),
    (["label", "--images", "imgs", "--classes", "a", "--out", "o", "--variant", "s3"], "unknown variant 's3'"),
    (["label", "--images", "imgs", "--classes", "a", "--out", "o", "--profile", "big"], "unknown profile 'big'"),
    (["label", "--images", "imgs", "--classes", "a", "--out", "o"], "params.yaml does not exist"),
    (["label", "--classes", "a"], "--classes go with --images"),
    (["export", "--store", "nowhere", "--out", "o"], "run `fmbseg label` first"),
])
def test_user_errors_exit_2_with_one_line(args: list[str], message: str, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "x.png")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
