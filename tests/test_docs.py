"""The documentation's cross-references resolve: code citing docs/design.md names a section that
exists, and README / docs/ relative links and images point at files in the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests import REPO_ROOT

ROOT = REPO_ROOT
CODE_DIRS = ("components", "demoworld", "flows", "tests", "bench")
DESIGN = ROOT / "docs" / "design.md"

CITATION = re.compile(r"docs/design\.md §(\w+)")
HEADING = re.compile(r"^## (\w+)\. ", re.MULTILINE)
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)[^)]*\)")


def _code_files() -> list[Path]:
    return sorted(p for d in CODE_DIRS for p in (ROOT / d).rglob("*") if p.suffix in {".py", ".sh"})


def _doc_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_design_citations_name_existing_sections() -> None:
    sections = set(HEADING.findall(DESIGN.read_text(encoding="utf-8")))
    cited = {
        (path.relative_to(ROOT).as_posix(), section)
        for path in _code_files()
        for section in CITATION.findall(path.read_text(encoding="utf-8"))
    }
    assert cited, "no code cites docs/design.md"
    assert {(f, s) for f, s in cited if s not in sections} == set()


def test_no_citation_of_the_design_file_outside_the_repository() -> None:
    stale = re.compile(r"DESIGN(\.md)? §")
    offenders = [p.relative_to(ROOT).as_posix() for p in _code_files() if stale.search(p.read_text(encoding="utf-8"))]
    assert offenders == []


@pytest.mark.parametrize("doc", _doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path) -> None:
    text = re.sub(r"```.*?```", "", doc.read_text(encoding="utf-8"), flags=re.DOTALL)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#", 1)[0]).exists():
            broken.append(target)
    assert broken == []


def test_quickstart_starts_with_make_demo_and_make_test() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    quickstart = readme.split("## Quickstart", 1)[1]
    block = quickstart.split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in block.splitlines()[:2]] == ["make demo", "make test"]
