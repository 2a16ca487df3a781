"""The report: rows next to the paper's Tables 1 and 2, markdown and CSV, and the report flow."""

from __future__ import annotations

import csv
import io
import json

import pytest
import yaml

from components.evaluation.paper_numbers import PAPER_BENCHMARKS, TABLE1, TABLE2
from components.evaluation.report import (
    REPORT_COLUMNS,
    STAGE1_COLUMNS,
    report_rows,
    stage1_rows,
    to_csv,
    to_markdown,
)
from components.labelling.settings import STAGE1_VARIANTS


def test_paper_tables_as_printed():
    assert TABLE1["base"]["pv21"] == 67.73 and TABLE1["refined"]["ade20k"] == 16.60
    assert TABLE2["semi"]["co80"] == 47.77 and TABLE2["stage1_2"]["cityscapes"] == 14.86
    assert STAGE1_VARIANTS == ("stage1_1", "stage1_2", "semi") == tuple(TABLE2)  # Table 2 has a row per variant
    for table in (TABLE1, TABLE2):
        assert all(tuple(row) == PAPER_BENCHMARKS for row in table.values())
    # §4.2: refinement improves every benchmark
    assert all(TABLE1["refined"][b] > TABLE1["base"][b] for b in PAPER_BENCHMARKS)


def test_report_rows_put_ours_next_to_the_paper():
    rows = report_rows(
        {"pv21": {"mIoU_base": 10.0, "mIoU_refined": 11.5}, "pc59": {"mIoU_base": 3.25}, "ade20k": None},
        ["pv21", "pc59", "ade20k", "coco_object"],
    )
    assert rows[0] == {"benchmark": "pv21", "base": 10.0, "refined": 11.5, "paper_base": 67.73, "paper_refined": 71.02,
                       "published": None, "settings": None}
    assert rows[1]["refined"] is None and rows[1]["base"] == 3.25  # evaluated without refinement
    assert rows[2]["base"] is None and rows[2]["paper_base"] == 16.25  # not evaluated
    assert rows[3]["paper_base"] is None  # COCO-Object is not in the paper


def test_markdown_and_csv():
    rows = report_rows({"pv21": {"mIoU_base": 10.0, "mIoU_refined": 11.456}}, ["pv21", "pc59"])
    markdown = to_markdown(rows, REPORT_COLUMNS)
    lines = markdown.strip().splitlines()
    assert lines[0] == "| benchmark | base | refined | paper_base | paper_refined | published | settings |"
    assert lines[2] == "| pv21 | 10.00 | 11.46 | 67.73 | 71.02 | — | — |"
    assert lines[3] == "| pc59 | — | — | 42.72 | 44.34 | — | — |"
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows, REPORT_COLUMNS))))
    assert parsed[0] == {"benchmark": "pv21", "base": "10.0", "refined": "11.456", "paper_base": "67.73",
                         "paper_refined": "71.02", "published": "", "settings": ""}
    assert parsed[1]["base"] == ""


def test_the_protocols_published_numbers_stand_beside_ours():
    from components.evaluation.paper_numbers import PUBLISHED

    assert PUBLISHED["sclip"]["pv21"] == 59.63 and PUBLISHED["sclip"]["cs171"] == 22.77
    assert "co80" not in PUBLISHED["sclip"]  # SCLIP reports COCO-Object, not CO-80
    assert PUBLISHED["sclip"]["pc60"] == 31.74 and PUBLISHED["trident"]["pc60"] == 38.6
    assert "pv21" not in PUBLISHED["clearclip"]  # ClearCLIP's README table: no background benchmarks
    from components.config import shipped_protocols
    from components.datasets.registry import BENCHMARKS

    assert set(PUBLISHED) <= set(shipped_protocols())
    assert all(set(numbers) <= set(BENCHMARKS) for numbers in PUBLISHED.values())
    rows = report_rows({"pv21": {"mIoU_base": 10.0}}, ["pv21", "co80"], protocol="sclip")
    assert rows[0]["published"] == 59.63 and rows[1]["published"] is None
    assert report_rows({}, ["pv21"], protocol="fmbseg")[0]["published"] == 67.73  # the paper's base row
    assert report_rows({}, ["pv21"])[0]["published"] is None


def test_settings_label_names_what_changes_a_number():
    from components.config import EvaluateSettings
    from components.evaluation.report import settings_label

    sclip_like = EvaluateSettings(short_side=336, window=224, stride=112, templates="imagenet80", synonyms="max",
                                  bg_threshold=0.1, logit_scale=65.0).model_dump(mode="json")
    assert settings_label(sclip_like, "sclip") == (
        "sclip: short side 336, window 224/112, 80 templates, synonyms max, bg_threshold p < 0.1 at logit scale 65.0")


def test_stage1_rows():
    rows = stage1_rows({("pv21", "semi"): {"mIoU": 40.0}, ("pv20", "stage1_1"): {"mIoU": 20.0}})
    assert [(r["benchmark"], r["variant"], r["mIoU"], r["paper"]) for r in rows] == [
        ("pv20", "stage1_1", 20.0, 42.92),
        ("pv21", "semi", 40.0, 50.86),
    ]
    assert "| pv21 | semi | 40.00 | 50.86 |" in to_markdown(rows, STAGE1_COLUMNS)
    with pytest.raises(ValueError, match="stage1_1"):
        stage1_rows({("pv21", "stage3"): {"mIoU": 1.0}})


def test_report_flow_writes_the_tables(tmp_path, monkeypatch, prefect_harness):
    from flows.report import report_flow

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"evaluate": {
        "benchmarks": ["pv21", "pc59", "cs171"], "protocol": "fmbseg",
        "overrides": {"pv21": {"bg_threshold": 0.3, "short_side": None}}}}))
    (tmp_path / "metrics" / "stage1").mkdir(parents=True)
    (tmp_path / "metrics" / "pv21.json").write_text(json.dumps({"mIoU_base": 50.0, "mIoU_refined": 52.5}))
    (tmp_path / "metrics" / "cs171.json").write_text(json.dumps({"mIoU_base": 20.0, "mIoU_refined": 21.0}))
    (tmp_path / "metrics" / "stage1" / "pv21_stage1_2.json").write_text(json.dumps({"mIoU": 30.0}))
    markdown = report_flow("params.yaml")
    assert (tmp_path / "reports" / "report.md").read_text() == markdown
    # each row says which protocol and settings made it (a benchmark's overrides included)
    assert ("| pv21 | 50.00 | 52.50 | 67.73 | 71.02 | 67.73 | fmbseg: original size, window 448/224, 1 template, "
            "bg_threshold 0.3 |") in markdown
    assert "| pc59 | — | — | 42.72 | 44.34 | 42.72 | fmbseg: short side 448, window 448/224, 1 template |" in markdown
    assert "| pv21 | stage1_2 | 30.00 | 36.68 |" in markdown
    rows = list(csv.DictReader((tmp_path / "reports" / "report.csv").open()))
    assert [r["benchmark"] for r in rows] == ["pv21", "pc59", "cs171"]
    assert rows[2] == {"benchmark": "cs171", "base": "20.0", "refined": "21.0", "paper_base": "29.88",
                       "paper_refined": "30.65", "published": "29.88",
                       "settings": "fmbseg: short side 448, window 448/224, 1 template"}
