"""No patch size is written outside the model specs: every module reads it from the registry, so a
student with another patch (DINOv3's 16) flows through unchanged."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

from tests import REPO_ROOT

ROOT = REPO_ROOT
# (file, the reason its 14s are no patch size)
ALLOWED = {
    "components/models/registry.py": "the specs themselves",
    "components/datasets/convert.py": "dataset class ids",
    "demoworld/synthetic.py": "Cityscapes class ids",
    "demoworld/world.py": "an index into a scene's random digits",
    "components/overlay.py": "the side of a legend swatch in pixels",
}
# a 14 written as a patch side in a docstring or comment: "S/14", "÷ 14", "% 14", "patch size 14"
# (names such as "ViT-L/14-336" and "dinov2_vitl14" are model names, not sizes)
PROSE = re.compile(r"(?<![A-Z]-[A-Z])(/ ?14\b|÷ ?14\b|% ?14\b|patch[\w ]{0,12}\W{0,3}\b14\b)")


def _patch_literals(path: Path) -> list[str]:
    hits = []
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline):
        if (tok.type == tokenize.NUMBER and tok.string == "14") or (
            tok.type in (tokenize.STRING, tokenize.COMMENT) and PROSE.search(tok.string)
        ):
            hits.append(f"{path.relative_to(ROOT)}:{tok.start[0]}: {tok.line.strip()[:90]}")
    return hits


def test_no_patch_size_literal_outside_the_specs():
    files = [p for d in ("components", "demoworld", "flows", "bench") for p in sorted((ROOT / d).rglob("*.py"))]
    assert len(files) > 50
    hits = [h for p in files if str(p.relative_to(ROOT)) not in ALLOWED for h in _patch_literals(p)]
    assert not hits, "patch sizes written outside the specs:\n" + "\n".join(hits)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text('GRID = 518 // 14\n"""[B, S/14, S/14, C] of ViT-L/14-336"""\n# patch size 14\nok = 14.5\n')
    sample = sample.rename(ROOT / "tests" / f".scan_probe_{tmp_path.name}.py")
    try:
        assert [h.split(":")[1] for h in _patch_literals(sample)] == ["1", "2", "3"]
    finally:
        sample.unlink()
