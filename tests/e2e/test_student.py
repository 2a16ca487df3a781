"""The modern composition end to end on its miniatures -- a DINOv3 student, a MetaCLIP 2 text space,
SAM 2.1 masks: label -> balance -> features -> train -> evaluate-style scoring (base and SAM
2.1-refined) -> predict -> the MLflow model, with the 16-pixel patch grid read from the spec
everywhere."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
from PIL import Image

from components.aligner.checkpoint import load_aligner
from components.config import load_params
from components.features.cache import FeatureCache
from components.models.registry import get_spec
from components.segmenter import Segmenter, VocabularySegmenter
from tests.flows.test_train import IMAGE_SIZE, NUM_IMAGES, VOCABULARY, fmbseg, write_params, write_stage1

pytestmark = pytest.mark.slow

STUDENT = "mini-dinov3"
TEXT = "mini-metaclip2"
MASK = "mini-sam2.1"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """The images of test_train_flow, labelled by Stage 1 with the modern miniatures (MetaCLIP 2
    detects, SAM 2.1 segments), then balanced."""
    import shutil

    monkeypatch.chdir(tmp_path)
    write_stage1(tmp_path)
    shutil.rmtree(tmp_path / "data" / "pseudo" / "stage1")  # the images stay; Stage 1 labels them anew
    write_params(tmp_path, **{"models.profiles.mini.dino": STUDENT, "models.profiles.mini.clip": TEXT,
                              "models.profiles.mini.sam": MASK})
    from flows.balance import balance_flow
    from flows.label import run_label

    summary = run_label("params.yaml")
    assert summary["images_labelled"] == NUM_IMAGES, summary
    balance_flow.fn("params.yaml")
    return tmp_path


def test_a_dinov3_student_trains_evaluates_and_predicts(project, prefect_harness, mlflow_uri):
    spec = get_spec(STUDENT)
    grid = IMAGE_SIZE // spec.patch_size
    assert spec.patch_size == 16 and grid * spec.patch_size == IMAGE_SIZE

    fmbseg("features", "--params", "params.yaml")
    manifest = json.loads((project / "data" / "features" / "manifest.json").read_text())
    assert manifest["dino"] == STUDENT and manifest["grid"] == [grid, grid]
    assert FeatureCache(project / "data" / "features").read("img01").shape == (grid, grid, spec.embed_dim)

    fmbseg("train", "--params", "params.yaml")
    loaded = load_aligner(project / "models" / "aligner.pt")
    assert loaded.encoder_spec == STUDENT and loaded.specs["student"]["patch_size"] == 16
    assert loaded.specs["student"]["prefix_tokens"] == 5 and loaded.model.in_dim == spec.embed_dim
    assert (loaded.specs["text"]["name"], loaded.specs["mask"]["name"]) == (TEXT, MASK)

    segmenter = Segmenter.from_checkpoint(loaded, device="cpu", student=STUDENT)
    image = np.asarray(Image.open(next((project / "data").rglob("img03.jpg"))).convert("RGB"))
    scorer = VocabularySegmenter(segmenter, segmenter.vocabulary(VOCABULARY), refine=True)
    prediction = scorer(image)  # what the evaluation loop scores: base and SAM-refined maps
    assert prediction.base.shape == prediction.refined.shape == image.shape[:2]

    (project / "new").mkdir()
    Image.fromarray(image[:, :100]).save(project / "new" / "a.png")
    fmbseg("predict", "new", "--classes", "sky,tree,road", "--out", "out", "--model", "models/aligner.pt",
           "--params", "params.yaml")
    label_map = np.asarray(Image.open(project / "out" / "a.png"))
    assert label_map.shape == (image.shape[0], 100) and set(np.unique(label_map)) <= {0, 1, 2, 255}

    params = load_params("params.yaml")
    model = mlflow.pyfunc.load_model(f"models:/{params.tracking.registered_model}/1")  # the run's pyfunc model
    assert model.metadata.run_id == loaded.run_id
