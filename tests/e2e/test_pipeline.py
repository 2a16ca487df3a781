"""The whole pipeline under real `dvc repro` on the demo profile, in a temporary git repo.

One workspace serves the module, in order: the full run, the no-op rerun, which stages a setting
makes stale, reproducing a past experiment from the cache, and a queued ablation grid whose MLflow
runs land in the project's one store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.pipeline import PROJECT_ROOT, browse_lines, dvc_command, prepare_workspace, run_logged, stage_env

pytestmark = pytest.mark.slow

BENCHMARKS = ["pv21", "pv20", "pc59", "co80", "cs171", "cityscapes", "ade20k"]
STAGE1_VARIANTS = ["stage1_1", "stage1_2", "semi"]
# Floors under the demo world's measured scores (fmbseg demo, 2026-12-04; chance on pv21 1/21 = 4.8):
# Stage 1 on pv21 stage1_1 18.2, stage1_2 21.1, semi 30.9 mIoU; Stage 2 base pv21 15.9 (training
# seeds 1 and 2: 13.7, 16.8), mean of seven 12.7, refined mean 13.0. Stage 2 is still far from issue
# 11's targets, so these floors sit about 40 % under the measurements: they catch a pipeline that
# stops transmitting signal, not a small drift.
STAGE1_FLOORS = {"stage1_1": 10.0, "stage1_2": 12.0, "semi": 20.0}
PV21_BASE_FLOOR = 9.0
MEAN_BASE_FLOOR = 7.5


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dvc(ws: Path, *args: str) -> str:
    return run_logged([dvc_command(), *args], ws, stage_env(), log=None)


def _git(ws: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=ws, check=True, capture_output=True, text=True).stdout


def _ran(output: str) -> set[str]:
    """Stages that `dvc repro` actually ran (not skipped, not restored)."""
    return set(re.findall(r"Running stage '([^']+)'", output))


def _set_params(ws: Path, **dotted: object) -> None:
    raw = yaml.safe_load((ws / "params.yaml").read_text())
    for key, value in dotted.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


def _runs(ws: Path):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    exp = client.get_experiment_by_name("fmbseg")
    return [] if exp is None else client.search_runs([exp.experiment_id], filter_string="tags.`fmbseg.stage` = 'train'")


@pytest.fixture(scope="module")
def ws(tmp_path_factory, prefect_harness, _migrated_mlflow_db, monkeypatch_module):
    """A demo workspace; MLflow left at its default (the workspace's mlflow.db)."""
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    ws = prepare_workspace(tmp_path_factory.mktemp("pipeline") / "ws", PROJECT_ROOT / "configs" / "demo.yaml")
    shutil.copy(_migrated_mlflow_db, ws / "mlflow.db")  # skip the migrations, not the store
    return ws


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def first_run(ws) -> dict:
    out = _dvc(ws, "repro")
    _git(ws, "add", "-A")
    _git(ws, "commit", "-q", "-m", "first run")
    return {
        "output": out,
        "rev": _git(ws, "rev-parse", "HEAD").strip(),
        "model_md5": _md5(ws / "models" / "aligner.pt"),
        "metrics": {b: (ws / "metrics" / f"{b}.json").read_text() for b in BENCHMARKS},
    }


def test_repro_runs_every_stage_and_tracks_one_run(ws, first_run):
    ran = _ran(first_run["output"])
    expected = {"sync", "label", "balance", "features", "train", "report"}
    expected |= {f"download@{d}" for d in ["coco_train", *BENCHMARKS]} | {f"evaluate@{b}" for b in BENCHMARKS}
    expected.add("evaluate-stage1@pv21")  # its three variants in one pass
    assert expected <= ran
    assert (ws / "models" / "aligner.pt").stat().st_size > 0
    assert (ws / "data" / "pseudo" / "train_index.parquet").exists()
    for bench in BENCHMARKS:
        metrics = json.loads(first_run["metrics"][bench])
        assert {"mIoU_base", "mIoU_refined", "mAcc_base", "aAcc_base"} <= set(metrics)
        assert (ws / "metrics" / f"{bench}_per_class.csv").exists()
    report = (ws / "reports" / "report.md").read_text()
    assert "pv21" in report and "67.73" in report  # next to the paper's PV-21 base number
    runs = _runs(ws)
    assert len(runs) == 1
    assert {f"{b}/mIoU_base" for b in BENCHMARKS} <= set(runs[0].data.metrics)


def test_the_demo_world_transmits_signal_through_every_stage(ws, first_run):
    """The demo profile's scores stay far above chance (1/K): a pipeline that stops transmitting
    signal (a flipped frame, a lost normalisation, a wrong label index) fails here. Floors: the
    scores measured on the demo world (docs/demo-world.md) less a margin."""
    import csv

    stage1 = {(r["benchmark"], r["variant"]): float(r["mIoU"])
              for r in csv.DictReader((ws / "reports" / "stage1.csv").open())}
    assert set(stage1) == {("pv21", v) for v in STAGE1_VARIANTS}
    assert all(stage1[("pv21", v)] >= floor for v, floor in STAGE1_FLOORS.items()), stage1
    base = {b: json.loads(first_run["metrics"][b])["mIoU_base"] for b in BENCHMARKS}
    refined = {b: json.loads(first_run["metrics"][b])["mIoU_refined"] for b in BENCHMARKS}
    assert base["pv21"] >= PV21_BASE_FLOOR, base
    assert sum(base.values()) / len(base) >= MEAN_BASE_FLOOR, base
    assert sum(refined.values()) / len(refined) >= sum(base.values()) / len(base) - 1.0, (base, refined)
    report = list(csv.DictReader((ws / "reports" / "report.csv").open()))
    assert {r["benchmark"] for r in report} == set(BENCHMARKS)


def test_second_repro_does_nothing(ws, first_run):
    out = _dvc(ws, "repro")
    assert _ran(out) <= {"sync"}  # sync only looks at nightly.source_dir (seconds)
    assert _md5(ws / "models" / "aligner.pt") == first_run["model_md5"]
    assert len(_runs(ws)) == 1


def _changed_stages(ws: Path) -> set[str]:
    """Stages `dvc status` reports as changed (their deps, params or outs differ from dvc.lock)."""
    status = json.loads(_dvc(ws, "status", "--json") or "{}")
    return set(status) - {"sync"}


def test_a_setting_reruns_exactly_its_downstream(ws, first_run, one_epoch_run):
    evaluates = {f"evaluate@{b}" for b in BENCHMARKS}
    assert _ran(one_epoch_run["output"]) - {"sync"} == {"train", "report"} | evaluates
    assert _md5(ws / "models" / "aligner.pt") != first_run["model_md5"]

    # balance.ratio: balance reruns, and what it wrote makes features (and so all after it) stale
    index = ws / "data" / "pseudo" / "train_index.parquet"
    before = _md5(index)
    _set_params(ws, **{"balance.ratio": 0.33})
    assert _ran(_dvc(ws, "repro", "balance")) - {"sync"} == {"balance"}
    assert _md5(index) != before
    assert _changed_stages(ws) == {"features", "train"}  # both read train_index.parquet
    _git(ws, "checkout", "params.yaml")
    assert _ran(_dvc(ws, "repro", "balance")) - {"sync"} == set()  # restored from the run cache
    assert _md5(index) == before
    assert _changed_stages(ws) == set()


@pytest.fixture(scope="module")
def one_epoch_run(ws, first_run) -> dict:
    """A second experiment: train.epochs changed, reproduced, committed."""
    _set_params(ws, **{"train.epochs": 1})
    out = _dvc(ws, "repro")
    _git(ws, "add", "-A")
    _git(ws, "commit", "-q", "-m", "one epoch")
    return {"output": out, "rev": _git(ws, "rev-parse", "HEAD").strip()}


def test_reproduce_a_past_experiment_from_the_cache(ws, first_run, one_epoch_run):
    runs_before = len(_runs(ws))
    _git(ws, "checkout", "-q", "-f", first_run["rev"])
    _dvc(ws, "checkout")
    out = _dvc(ws, "repro")
    assert _ran(out) <= {"sync"}, "going back must restore from the cache, not recompute"
    assert _md5(ws / "models" / "aligner.pt") == first_run["model_md5"]
    for bench in BENCHMARKS:
        assert (ws / "metrics" / f"{bench}.json").read_text() == first_run["metrics"][bench]
    assert len(_runs(ws)) == runs_before
    _git(ws, "checkout", "-q", "-f", "main")
    _dvc(ws, "checkout")


def test_queued_ablation_grid_lands_in_the_project_store(ws, first_run):
    before = {r.info.run_id for r in _runs(ws)}
    _dvc(ws, "exp", "run", "--queue", "-S", "aligner.kind=linear,mlp")
    _dvc(ws, "exp", "run", "--run-all")
    new = [r for r in _runs(ws) if r.info.run_id not in before]
    assert sorted(r.data.params["aligner.kind"] for r in new) == ["linear", "mlp"]
    for run in new:
        assert "pv21/mIoU_base" in run.data.metrics
    assert len({r.data.tags.get("fmbseg.group") for r in new}) == 1  # one grid, one group in the UI
    assert sorted(r.info.run_name for r in new) == ["aligner.kind=linear", "aligner.kind=mlp"]  # its axes

    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["compare", "--params", str(ws / "params.yaml")],
                                env={"MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}"})
    assert result.exit_code == 0, result.output
    assert "linear" in result.output and "mlp" in result.output


def test_stage_log_records_are_not_relayed_a_second_time(tmp_path, capsys):
    import logging

    class Recorder(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    log = logging.getLogger("fmbseg-test-relay")
    recorder = Recorder()
    log.addHandler(recorder)
    log.setLevel(logging.INFO)
    script = ("print(\"Running stage 'label':\"); "
              "print(\"12:00:01.250 | INFO    | Flow run 'label' - 3 images\")")
    out = run_logged([sys.executable, "-c", script], tmp_path, dict(os.environ), log)
    assert recorder.lines == ["Running stage 'label':"]  # dvc's own line, once, through the logger
    assert "12:00:01.250 | INFO    | Flow run 'label' - 3 images" in capsys.readouterr().out
    assert out.count("3 images") == 1


def test_the_demo_ends_with_the_mlflow_page_of_the_headline_metrics(tmp_path, mlflow_uri):
    """`fmbseg demo`'s closing lines name `make ui` and, once the store holds the experiment, the
    MLflow UI's page of the runs on the headline metrics (tracking.headline_url)."""
    from components.config import load_params
    from flows import tracking

    shutil.copy(PROJECT_ROOT / "params.yaml", tmp_path / "params.yaml")
    assert len(browse_lines(tmp_path)) == 1 and "make ui STORE=" in browse_lines(tmp_path)[0]  # no runs yet
    params = load_params(tmp_path / "params.yaml")
    with tracking.start_run(params, run_name="train", tags={}):
        pass
    lines = browse_lines(tmp_path)
    assert lines[1].endswith(tracking.headline_url(params, "http://127.0.0.1:5000"))
    assert "viewStateShareKey=headline" in lines[1]


def test_the_modern_profile_runs_as_one_dvc_experiment(ws, first_run):
    """configs/modern.yaml through `fmbseg pipeline --profile`: one `dvc exp run -S ...` with the
    SAM 3 teacher, the DINOv3 student, SAM 2.1 and MetaCLIP 2 -- here their miniatures (the same
    transformers / open_clip classes, random weights) at the demo's sizes, on the demo's twins --
    and `fmbseg compare` shows it beside the baseline. The workspace keeps its outputs (--temp)."""
    import mlflow

    from components.config import deep_merge

    base = yaml.safe_load((ws / "params.yaml").read_text())
    overlay = deep_merge(yaml.safe_load((PROJECT_ROOT / "configs" / "modern.yaml").read_text()), {
        "models": {"teacher": "mini-sam3",
                   "profiles": {"modern": {"clip": "mini-metaclip2", "sam": "mini-sam2.1", "dino": "mini-dinov3"}}},
        "features": {"image_size": base["features"]["image_size"]},
        # the twins the demo made; a quarter of its training images keeps this test's labelling short
        "download": {"datasets": base["download"]["datasets"], "synthetic_train_images": 40},
        "evaluate": {"benchmarks": ["pv21"]},
    })
    (ws / "mini-modern.yaml").write_text(yaml.safe_dump(overlay, sort_keys=False))
    before = {r.info.run_id for r in _runs(ws)}
    fmbseg = str(Path(sys.executable).with_name("fmbseg"))
    out = run_logged([fmbseg, "pipeline", "--profile", "mini-modern.yaml", "--name", "modern", "--temp"], ws, stage_env())
    assert {"label", "balance", "features", "train", "evaluate@pv21", "evaluate-stage1@pv21"} <= _ran(out)
    assert yaml.safe_load((ws / "params.yaml").read_text()) == base  # the workspace is the baseline still

    shown = json.loads(_dvc(ws, "exp", "show", "--json"))
    exps = [e for rev in shown for e in (rev.get("experiments") or []) if e.get("name") == "modern"]
    assert len(exps) == 1
    data = exps[0]["revs"][0]["data"]
    params = data["params"]["params.yaml"]["data"]
    assert params["models"]["teacher"] == "mini-sam3" and params["models"]["profile"] == "modern"
    assert params["balance"]["variants"] == {"stage1_sam3": 1.0}
    assert "mIoU_base" in json.dumps(data["metrics"]["metrics/pv21.json"]["data"])

    new = [r for r in _runs(ws) if r.info.run_id not in before]
    assert len(new) == 1 and "pv21/mIoU_base" in new[0].data.metrics
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{ws / 'mlflow.db'}")
    stage1 = client.get_experiment_by_name("fmbseg-stage1")
    teacher_runs = client.search_runs([stage1.experiment_id], filter_string="attributes.run_name = 'stage1-stage1_sam3'")
    assert teacher_runs and "pv21/mIoU" in teacher_runs[0].data.metrics  # the teacher's Table-2 row

    from typer.testing import CliRunner

    from flows.cli import app

    result = CliRunner().invoke(app, ["compare", "--params", str(ws / "params.yaml")],
                                env={"MLFLOW_TRACKING_URI": f"sqlite:///{ws / 'mlflow.db'}"})
    assert result.exit_code == 0, result.output
    assert new[0].info.run_name[:20] in result.output
