"""The test suite mirrors the source tree: tests/components/..., tests/flows/..., and tests/e2e/ for
the slow end-to-end runs of whole stages and of `dvc repro`. Every folder is a package, so test
modules may share a base name (tests/flows/test_train.py beside tests/components/aligner/test_train.py)
and helpers import as `tests.<module>`."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
