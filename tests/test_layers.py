"""Imports run down the layers, never up: flows/ and the demo world (demoworld/) sit on the library
(components/), and inside the library each part imports only what it is built on.

Read from the source (every import statement, local ones included), and once from a fresh
interpreter: importing every components module loads no module of flows or of the demo world.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import REPO_ROOT

ROOT = REPO_ROOT

# (importing package, imported package): each pair a module of the first may not import from the second
FORBIDDEN: list[tuple[str, str, str]] = [
    ("components", "flows", "the library runs without the orchestration"),
    ("components", "demoworld", "the demo world is a wing above the library"),
    ("components", "bench", "benchmarks sit above the library"),
    ("components.evaluation", "components.segmenter", "the segmenter is built on evaluation"),
    ("components.evaluation", "components.predictions", "predictions are built on the segmenter"),
    ("components.models", "components.labelling", "labelling is built on the models"),
    ("components.models", "components.evaluation", "evaluation is built on the models"),
    ("components.models", "components.aligner", "the aligner is built on the models"),
    ("components.models", "components.segmenter", "the segmenter is built on the models"),
    ("components.datasets", "components.models", "datasets know no models"),
    ("components.datasets", "components.labelling", "datasets know no labelling"),
    ("components.labelling", "components.segmenter", "Stage 1 does not use Stage 2's product"),
    ("components.labelling", "components.evaluation", "Stage 1 does not use the evaluation"),
    ("components.aligner", "components.segmenter", "the segmenter is built on the aligner"),
    ("components.models.weights", "components.models.registry", "the registry imports the weights"),
    ("demoworld", "flows", "the demo world is a library wing, not an application"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of everything a module imports, local imports included; ``from a import b``
    yields ``a.b`` (b may be a module or a name in a)."""
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(root_dirs: tuple[str, ...]) -> list[str]:
    out = []
    for top in root_dirs:
        for path in sorted((ROOT / top).rglob("*.py")):
            module = _module_name(path)
            for line, name in _imports(path):
                for importer, imported, why in FORBIDDEN:
                    if _within(module, importer) and _within(name, imported) and not _within(module, imported):
                        out.append(f"{path.relative_to(ROOT)}:{line}: imports {name} ({why})")
    return out


def test_no_import_runs_up_the_layers() -> None:
    hits = _violations(("components", "demoworld"))
    assert not hits, "imports up the layers:\n" + "\n".join(hits)


def test_the_rules_catch_an_upward_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the checker itself: a models module importing labelling, and a relative import out of components
    (tmp_path / "components" / "models").mkdir(parents=True)
    (tmp_path / "components" / "models" / "bad.py").write_text(
        "from components.labelling.detect import prompt_patches\n"
        "def f():\n    from ...flows import cli\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    hits = _violations(("components",))
    assert len(hits) == 2
    assert "components.labelling.detect.prompt_patches" in hits[0] and "flows.cli" in hits[1]


def test_importing_every_components_module_loads_no_wing() -> None:
    modules = sorted(_module_name(p) for p in (ROOT / "components").rglob("*.py"))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "up = sorted(m for m in sys.modules if m.split('.')[0] in ('flows', 'demoworld', 'bench'))\n"
        "print(' '.join(up))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"components imported: {done.stdout.strip()}"
