"""The evaluate and evaluate-stage1 flows end to end: synthetic twins of the benchmarks, the demo
models, a random-weight aligner checkpoint with an MLflow run; metric files, overlays, MLflow
metrics and artifacts, resuming after an interruption, unreadable images, the report."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
import yaml

from components.aligner.checkpoint import save_checkpoint
from components.aligner.model import Aligner
from components.config import flatten, load_params
from demoworld.synthetic import write_synthetic_benchmark

ALL_BENCHMARKS = ("pv21", "pv20", "pc59", "pc60", "pc459", "co80", "coco_object", "cs171", "cityscapes", "ade20k",
                  "ade847")

DEMO_PARAMS = {
    "models": {"profile": "demo", "device": "cpu", "dtype": "fp32"},
    "label": {
        "grid": 2, "sam_size": 64, "label_size": 64, "crop_batch": 4, "top_k_points": 2,
        "amg": {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0, "min_area_frac": 0.0},
    },
    "evaluate": {
        "benchmarks": list(ALL_BENCHMARKS),
        "short_side": 56, "window": 56, "stride": 28, "batch_size": 1, "overlays": 1,
        "amg": {"points_per_side": 4, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0},
    },
    "orchestration": {"max_workers": 1},
}


def make_project(root: Path, benchmarks: tuple[str, ...], num_images: int, overrides: dict | None = None) -> str:
    """A project dir with params.yaml, synthetic benchmarks and a random aligner whose checkpoint names a
    finished MLflow run; returns that run's id. The working directory must be ``root``."""
    from components.config import deep_merge
    from flows import tracking
    from flows.evaluate import inference_spec

    (root / "params.yaml").write_text(yaml.safe_dump(deep_merge(DEMO_PARAMS, overrides or {})))
    for name in benchmarks:
        write_synthetic_benchmark(name, root / "data", num_images=num_images)
    params = load_params(root / "params.yaml")
    with tracking.start_run(params, run_name="train", tags={}) as run_id:
        pass
    torch.manual_seed(0)
    save_checkpoint(
        root / "models" / "aligner.pt",
        model=Aligner(32, 32, kind="transformer", num_heads=4),
        encoder_spec="mini-dino",
        image_size=56,
        text_spec="mini-clip",
        templates=["a photo of a {}."],
        class_names=["thing", "stuff"],
        prototypes=F.normalize(torch.randn(2, 32), dim=-1),
        inference=inference_spec(params),
        params=flatten(params),
        mlflow_run_id=run_id,
    )
    return run_id


def sequential(flow_obj):
    """The flow on one worker thread: batches run in order (what the resume test relies on)."""
    from prefect.task_runners import ThreadPoolTaskRunner

    return flow_obj.with_options(task_runner=ThreadPoolTaskRunner(max_workers=1))


def artifacts(client: mlflow.MlflowClient, run_id: str, path: str) -> list[str]:
    return sorted(Path(a.path).name for a in client.list_artifacts(run_id, path))


@pytest.mark.slow
def test_evaluate_every_benchmark_then_report(tmp_path, monkeypatch, prefect_harness, mlflow_uri):
    from flows.evaluate import evaluate_flow
    from flows.report import report_flow

    monkeypatch.chdir(tmp_path)
    run_id = make_project(tmp_path, ALL_BENCHMARKS, num_images=2)
    client = mlflow.MlflowClient(mlflow_uri)
    for name in ALL_BENCHMARKS:
        metrics = sequential(evaluate_flow)(name)
        saved = json.loads((tmp_path / "metrics" / f"{name}.json").read_text())
        assert saved == metrics
        assert set(saved) == {f"{m}_{v}" for m in ("mIoU", "mAcc", "aAcc") for v in ("base", "refined")} | {
            "images", "skipped"}
        assert saved["images"] == 2 and saved["skipped"] == 0
        assert all(0.0 <= saved[k] <= 100.0 for k in saved if k[0] in "ma")
        rows = list(csv.DictReader((tmp_path / "metrics" / f"{name}_per_class.csv").open()))
        classes = (tmp_path / "data" / "datasets" / name / "classes.txt").read_text().splitlines()
        assert [r["class"] for r in rows] == [c.split(",")[0].strip() for c in classes]
        assert list(rows[0]) == ["class", "IoU_base", "Acc_base", "IoU_refined", "Acc_refined"]
        overlays = sorted(p.name for p in (tmp_path / "reports" / "overlays" / name).iterdir())
        assert len(overlays) == 1
        assert artifacts(client, run_id, f"evaluate/{name}") == sorted(
            [f"{name}.json", f"{name}_per_class.csv", "overlays", "settings.json"])
        assert artifacts(client, run_id, f"evaluate/{name}/overlays") == overlays
        assert not (tmp_path / "reports" / ".eval_state" / f"{name}.pt").exists()
    run = client.get_run(run_id)
    logged = run.data.metrics
    for name in ALL_BENCHMARKS:
        saved = json.loads((tmp_path / "metrics" / f"{name}.json").read_text())
        counts = {"images", "skipped"}
        assert {k: logged[f"{name}/{k}"] for k in set(saved) - counts} == pytest.approx(
            {k: v for k, v in saved.items() if k not in counts})
        assert {k: run.data.tags[f"{name}/{k}"] for k in counts} == {k: str(saved[k]) for k in counts}
        assert f"{name}/images" not in logged
    for variant in ("base", "refined"):  # the mean over the benchmarks, to sort ablations by
        mean = sum(json.loads((tmp_path / "metrics" / f"{n}.json").read_text())[f"mIoU_{variant}"]
                   for n in ALL_BENCHMARKS) / len(ALL_BENCHMARKS)
        assert logged[f"mean/mIoU_{variant}"] == pytest.approx(mean, abs=0.006)

    markdown = report_flow("params.yaml", "models/aligner.pt")
    pv21 = json.loads((tmp_path / "metrics" / "pv21.json").read_text())
    assert f"| pv21 | {pv21['mIoU_base']:.2f} | {pv21['mIoU_refined']:.2f} | 67.73 | 71.02 |" in markdown
    report_csv = list(csv.DictReader((tmp_path / "reports" / "report.csv").open()))
    assert [r["benchmark"] for r in report_csv] == list(ALL_BENCHMARKS)
    assert report_csv[4]["paper_base"] == ""  # COCO-Object: not in the paper
    assert artifacts(client, run_id, "report") == ["report.csv", "report.md", "stage1.csv"]
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:  # each flow run is named after what it did
        names = {r.name for r in prefect.read_flow_runs()}
    assert {f"evaluate-{name}" for name in ALL_BENCHMARKS} | {"report"} <= names


def test_evaluate_resumes_after_an_interruption(tmp_path, monkeypatch, prefect_harness, mlflow_uri):
    from components.segmenter import Segmenter
    from flows.evaluate import evaluate_flow

    monkeypatch.chdir(tmp_path)
    run_id = make_project(tmp_path, ("pv20",), num_images=4, overrides={"evaluate": {"overlays": 2}})
    calls: list[int] = []
    original = Segmenter.predict

    def interrupted(self, image, *args, **kwargs):
        if len(calls) == 2:
            raise RuntimeError("killed")
        calls.append(1)
        return original(self, image, *args, **kwargs)

    monkeypatch.setattr(Segmenter, "predict", interrupted)
    with pytest.raises(RuntimeError, match="killed"):
        sequential(evaluate_flow)("pv20")
    state_file = tmp_path / "reports" / ".eval_state" / "pv20.pt"
    saved = torch.load(state_file, weights_only=True)
    assert len(saved["done"]) == 2
    assert not (tmp_path / "metrics" / "pv20.json").exists()
    # DVC removes a stage's outputs before it reruns it: the pictures of the first run are gone
    for picture in (tmp_path / "reports" / "overlays" / "pv20").iterdir():
        picture.unlink()

    monkeypatch.setattr(Segmenter, "predict",
                        lambda self, image, *a, **kw: calls.append(1) or original(self, image, *a, **kw))
    calls.clear()
    resumed = sequential(evaluate_flow)("pv20")
    # two images scored after the resume, plus the two overlay images drawn again
    assert len(calls) == 4
    assert sorted(p.name for p in (tmp_path / "reports" / "overlays" / "pv20").iterdir()) == sorted(
        f"{i}.png" for i in saved["done"])
    assert not state_file.exists()

    calls.clear()
    fresh = sequential(evaluate_flow)("pv20")
    assert len(calls) == 4  # no state left: everything again
    assert resumed == fresh and resumed["images"] == 4
    assert mlflow.MlflowClient(mlflow_uri).get_run(run_id).data.metrics["pv20/mIoU_base"] == fresh["mIoU_base"]


def test_unreadable_image_is_reported_and_left_out(tmp_path, monkeypatch, prefect_harness, mlflow_uri):
    from components.datasets.readers import CanonicalDataset
    from flows.evaluate import evaluate_flow

    monkeypatch.chdir(tmp_path)
    run_id = make_project(tmp_path, ("pc59",), num_images=3, overrides={"evaluate": {"refine": False}})
    data = CanonicalDataset(tmp_path / "data" / "datasets" / "pc59", "val")
    data.image_path(data.ids[1]).write_bytes(b"\xff\xd8 truncated")
    metrics = sequential(evaluate_flow)("pc59")
    assert metrics["skipped"] == 1 and metrics["images"] == 2
    assert "mIoU_refined" not in metrics
    saved = json.loads((tmp_path / "metrics" / "pc59.json").read_text())
    assert saved["skipped"] == 1
    assert mlflow.MlflowClient(mlflow_uri).get_run(run_id).data.tags["pc59/skipped"] == "1"
    rows = list(csv.DictReader((tmp_path / "metrics" / "pc59_per_class.csv").open()))
    assert list(rows[0]) == ["class", "IoU_base", "Acc_base"]


def test_evaluate_stage1_variants(tmp_path, monkeypatch, prefect_harness, mlflow_uri):
    """One run scores the three variants in one pass: a metrics file, a per-class file and an MLflow
    run each."""
    from flows.evaluate_stage1 import evaluate_stage1_flow

    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, ("pv21",), num_images=2)
    client = mlflow.MlflowClient(mlflow_uri)
    results = sequential(evaluate_stage1_flow)("pv21")
    assert list(results) == ["stage1_1", "stage1_2", "semi"]
    for variant, metrics in results.items():
        path = tmp_path / "metrics" / "stage1" / f"pv21_{variant}.json"
        assert json.loads(path.read_text()) == metrics
        assert set(metrics) == {"mIoU", "mAcc", "aAcc", "images", "skipped"} and metrics["images"] == 2
        rows = list(csv.DictReader((path.parent / f"pv21_{variant}_per_class.csv").open()))
        assert len(rows) == 21 and list(rows[0]) == ["class", "IoU", "Acc"]
        runs = client.search_runs(
            [client.get_experiment_by_name("fmbseg-stage1").experiment_id],
            filter_string=f"tags.mlflow.runName = 'stage1-{variant}'",
        )
        assert len(runs) == 1
        assert runs[0].data.tags["dataset"] == "pv21" and runs[0].data.tags["variant"] == variant
        assert runs[0].data.metrics["pv21/mIoU"] == pytest.approx(metrics["mIoU"])
        assert artifacts(client, runs[0].info.run_id, "stage1/pv21") == sorted(
            [f"pv21_{variant}.json", f"pv21_{variant}_per_class.csv"])
    # one variant alone scores the same numbers
    assert sequential(evaluate_stage1_flow)("pv21", ["stage1_2"]) == {"stage1_2": results["stage1_2"]}
    with pytest.raises(ValueError, match="stage1_1, stage1_2, semi"):
        evaluate_stage1_flow("pv21", ["stage1_3"])


def test_evaluate_names_what_is_missing(tmp_path, monkeypatch, prefect_harness, mlflow_uri):
    from flows.evaluate import evaluate_flow

    monkeypatch.chdir(tmp_path)
    make_project(tmp_path, ("pv20",), num_images=1)
    with pytest.raises(FileNotFoundError, match=r"datasets there: \['pv20'\]\); fetch it with `fmbseg download ade20k`"):
        evaluate_flow("ade20k")
    with pytest.raises(FileNotFoundError, match="fmbseg train"):
        evaluate_flow("pv20", model_path="models/none.pt")


def test_evaluate_overrides_apply_to_their_benchmark_only(tmp_path, monkeypatch, prefect_harness, mlflow_uri):
    from flows.evaluate import evaluate_flow

    monkeypatch.chdir(tmp_path)
    # A probability never exceeds 1: with bg_threshold 1.5 every PV-21 pixel is background. PV-20 has
    # no background class: the shared setting would be refused, the override leaves it alone.
    run_id = make_project(tmp_path, ("pv21", "pv20"), num_images=2, overrides={"evaluate": {
        "benchmarks": ["pv21", "pv20"], "refine": False, "overrides": {
            "pv21": {"bg_threshold": 1.5, "logit_scale": 50.0, "limit": 1}, "pv20": {"synonyms": "max"}}}})
    pv21 = sequential(evaluate_flow)("pv21")
    rows = list(csv.DictReader((tmp_path / "metrics" / "pv21_per_class.csv").open()))
    assert pv21["images"] == 1 and rows[0]["Acc_base"] == "100.00"
    assert all(r["IoU_base"] in ("0.00", "nan") for r in rows[1:])
    assert sequential(evaluate_flow)("pv20")["images"] == 2
    client = mlflow.MlflowClient(mlflow_uri)
    for name, threshold, limit in (("pv21", 1.5, 1), ("pv20", None, None)):
        recorded = json.loads(Path(client.download_artifacts(run_id, f"evaluate/{name}/settings.json", str(tmp_path)))
                              .read_text())
        assert (recorded["bg_threshold"], recorded["limit"], recorded["short_side"]) == (threshold, limit, 56)
        assert recorded["protocol"] is None  # the miniature geometry: no published protocol
        assert recorded["synonyms"] == ("max" if name == "pv20" else "mean")


def _flows_imported(module: str, repo: Path) -> set[str]:
    """The flows/ modules ``module`` imports, at any depth (top-level and local imports)."""
    import ast

    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((repo / "flows" / f"{name}.py").read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "flows":
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flows."):
                todo.append(node.module.split(".")[1])
    return seen


@pytest.mark.parametrize(("stage", "module"), [("evaluate", "evaluate"), ("evaluate-stage1", "evaluate_stage1")])
def test_each_evaluate_stage_depends_on_the_flow_modules_it_runs_and_no_other(stage, module, repo_root):
    """evaluate@ and evaluate-stage1@ list exactly the flows/ modules their command imports, so
    editing evaluate-stage1's module leaves the seven evaluate@ stages up to date, and back."""
    deps = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"][stage]["do"]["deps"]
    listed = {Path(d).stem for d in deps if d.startswith("flows/")}
    assert listed == _flows_imported(module, repo_root)
