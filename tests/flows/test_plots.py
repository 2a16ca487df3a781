"""`dvc plots show` works offline: the stages' plots are PNG images (flows/plots.py), which DVC's
HTML page embeds as they are, where a vega plot would load its JavaScript from a CDN."""

from __future__ import annotations

import re
import subprocess

import yaml
from PIL import Image

from flows.pipeline import dvc_command
from flows.plots import bars_png, line_png
from tests import REPO_ROOT

REPO = REPO_ROOT


def test_every_plot_of_the_pipeline_is_an_image() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    paths = yaml.safe_load((REPO / "params.yaml").read_text())["paths"]
    plots = [re.sub(r"\$\{paths\.(\w+)\}", lambda m: paths[m.group(1)], next(iter(p)) if isinstance(p, dict) else p)
             for stage in stages.values() for p in stage.get("do", stage).get("plots") or []]
    assert plots and all(p.endswith(".png") for p in plots), plots


def test_dvc_plots_show_draws_the_charts_without_the_network(tmp_path) -> None:
    metrics = tmp_path / "metrics"
    line_png(metrics / "train_loss.png", [0, 1, 2], [5.4, 4.1, 3.9], xlabel="epoch", ylabel="loss", title="loss")
    bars_png(metrics / "pv21_per_class.png", ["background", "aeroplane", "bicycle"],
             {"base": [40.0, float("nan"), 12.5], "refined": [42.0, 3.0, 14.0]}, xlabel="IoU (%)", title="pv21")
    for name in ("train_loss.png", "pv21_per_class.png"):
        with Image.open(metrics / name) as image:
            assert image.format == "PNG" and image.width >= 600
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"plots": ["metrics/train_loss.png", "metrics/pv21_per_class.png"]}))
    dvc = dvc_command()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([dvc, "plots", "show", "-o", "plots"], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert not re.search(r"""<script[^>]+src=["']?https?:""", page)  # nothing to fetch
    shown = re.findall(r"""<img[^>]+src=["']?([^"' >]+)""", page)
    assert len(shown) == 2 and all((tmp_path / "plots" / src).is_file() for src in shown)
