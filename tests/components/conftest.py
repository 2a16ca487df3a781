"""Fixtures of the component tests: a random-weight aligner over the miniature models, as a checkpoint
file and as the Segmenter built from it (once per test module)."""

from __future__ import annotations

import pytest

from components.segmenter import Segmenter
from tests.mini_checkpoint import write_mini_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_mini_checkpoint(tmp_path_factory.mktemp("model") / "aligner.pt")


@pytest.fixture(scope="module")
def segmenter(checkpoint):
    return Segmenter.from_checkpoint(checkpoint, device="cpu")
