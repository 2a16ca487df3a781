"""`fmbseg weights train-demo` reproduces the stand-in files bundled with the project.

Both stand-ins retrain side by side (two processes, one thread each: about 10 minutes), so this
module runs apart from `make test`: `make test-standins` (CI runs both). Training is seeded and
runs on one CPU thread, so on the machine that made the bundled files it gives the same tensors;
elsewhere float rounding may differ in the last bits, so the test asks for the same trained
tensors and the same held-out scores within a small tolerance.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from components.models.registry import get_spec
from components.models.standins.store import read_metadata
from demoworld.standins import TRAINED_FAMILIES

pytestmark = [pytest.mark.slow, pytest.mark.standins]


@pytest.fixture(scope="module")
def retrained(tmp_path_factory, repo_root) -> Path:
    """Both stand-ins retrained by the command, in parallel."""
    out = tmp_path_factory.mktemp("standins")
    fmbseg = str(Path(sys.executable).with_name("fmbseg"))
    env = {**os.environ, "FMBSEG_WEIGHTS_DIR": str(out / "unused")}
    procs = [subprocess.Popen([fmbseg, "weights", "train-demo", "--only", family, "--out", str(out),
                               "--params", str(repo_root / "params.yaml")], env=env, cwd=repo_root,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for family in TRAINED_FAMILIES]
    for proc in procs:
        output, _ = proc.communicate(timeout=1800)
        assert proc.returncode == 0, output
    return out


@pytest.mark.parametrize("family", TRAINED_FAMILIES)
def test_train_demo_reproduces_the_bundled_file(family, retrained):
    name = f"world-{family}"
    ours, bundled = retrained / f"{name}.safetensors", get_spec(name).weights[0].bundled
    with safe_open(str(ours), framework="pt") as a, safe_open(str(bundled), framework="pt") as b:
        assert set(a.keys()) == set(b.keys())
    got, want = read_metadata(ours), read_metadata(bundled)
    assert set(got) == set(want)
    for key, value in want.items():
        if "seconds" in key:  # wall time, not a result
            continue
        if isinstance(value, float):
            assert math.isclose(got[key], value, abs_tol=0.02), (key, got[key], value)
        else:
            assert got[key] == value, key
