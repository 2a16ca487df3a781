"""Progress a person can see (components/progress.py): `fmbseg predict` in a real pseudo-terminal
shows a bar that moves image by image (count, images/s, ETA) while it runs, and prints none when
stderr is not a terminal; the cross-process tally that carries per-image counts out of workers."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components.progress import Tally, counter
from tests import REPO_ROOT
from tests.mini_checkpoint import write_mini_checkpoint

REPO = REPO_ROOT
IMAGES = 12
BATCH = 4


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for k in range(IMAGES):
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(folder / f"img_{k:02d}.png")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text().replace("device: auto", "device: cpu"))
    write_mini_checkpoint(tmp_path / "model.pt")
    return folder


def _predict_command(out: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "predict", "photos", "--out", out, "--model", "model.pt",
            "--classes", "sky,grass", "--batch-size", str(BATCH), "--overlays"]


def _environment(api_url: str) -> dict[str, str]:
    # every update drawn (tqdm reads TQDM_* overrides): the test sees each count, not 10 per second
    return {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_API_URL": api_url, "TQDM_MININTERVAL": "0",
            "COLUMNS": "120"}


def test_predict_in_a_terminal_shows_the_bar_advance_image_by_image(photos: Path, prefect_harness: str) -> None:
    controller, terminal = pty.openpty()
    process = subprocess.Popen(_predict_command("out"), cwd=photos.parent, env=_environment(prefect_harness),
                               stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=terminal)
    os.close(terminal)
    seen_while_running: list[str] = []
    screen = b""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal closed: the command ended
                break
            if not chunk:
                break
            screen += chunk
            if process.poll() is None:
                seen_while_running += re.findall(rf"(\d+)/{IMAGES} \[", chunk.decode(errors="replace"))
        elif process.poll() is not None:
            break
    stdout = process.communicate(timeout=60)[0].decode()
    os.close(controller)
    assert process.returncode == 0, screen.decode(errors="replace")[-3000:]
    text = screen.decode(errors="replace")
    counts = sorted({int(n) for n in seen_while_running})
    assert len(counts) >= 4 and counts[-1] > counts[0], text[-3000:]  # it moved, several times, before the end
    assert any(n % BATCH for n in counts), counts  # image by image, not a batch at a time
    assert "predict" in text and "img/s" in text and "<" in text  # the rate and the ETA ([elapsed<remaining])
    assert '"segmented": 12' in stdout


def test_predict_without_a_terminal_prints_no_bar(photos: Path, prefect_harness: str) -> None:
    result = subprocess.run(_predict_command("out"), cwd=photos.parent, env=_environment(prefect_harness),
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "img/s" not in result.stderr and "\r" not in result.stderr and f"/{IMAGES} [" not in result.stderr


def test_a_tally_sums_the_ticks_of_each_worker_and_is_gone_after(tmp_path: Path) -> None:
    out = tmp_path / "store"
    with Tally.beside(out, "label-progress") as tally:
        assert not tally.folder.is_relative_to(out) and tally.counts() == {}
        first, second = counter(tally.file(0)), counter(tally.file(1))  # as each worker makes its own
        assert first is not None and second is not None
        first(1)
        first(2)
        second(1)
        assert tally.counts() == {0: 3, 1: 1}
    assert not tally.folder.exists()
    assert counter(None) is None  # a worker run outside a flow ticks nothing
    tally.folder.mkdir()
    (tally.folder / "0").write_bytes(b"...")  # a killed run's
    assert Tally.beside(out, "label-progress").fresh().counts() == {}
