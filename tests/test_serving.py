"""The model in MLflow: the pyfunc model logged and registered by a run, loaded by ``models:/`` URI
from a temporary SQLite store, and served by a real ``mlflow models serve`` on 127.0.0.1."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mini_checkpoint import write_mini_checkpoint
from mlflow.exceptions import MlflowException
from PIL import Image

from components.config import parse_params
from components.segmenter import Segmenter
from flows import serving, tracking
from flows.server import free_port

REPO = Path(__file__).resolve().parents[1]
MODEL = "fmbseg-aligner"  # tracking.registered_model's default


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """[H, W, 3] uint8: coloured bands with noise, so that the label map has some structure."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (4, 3))
    bands = np.repeat(np.arange(4), -(-height // 4))[:height]
    image = colours[bands][:, None, :].repeat(width, axis=1) + rng.integers(-20, 20, (height, width, 3))
    return image.clip(0, 255).astype(np.uint8)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """A demo-profile aligner checkpoint (miniature DINOv2 / CLIP / SAM; seeded random aligner)."""
    return write_mini_checkpoint(tmp_path / "aligner.pt", class_names=("sky", "tree"))


def logged_run(checkpoint: Path) -> tuple[str, str]:
    """A finished train-like run that logged the model: (run id, registered version)."""
    params = parse_params({})
    with tracking.start_run(params, run_name="train", tags={tracking.STAGE_TAG: "train"}) as run_id:
        version = tracking.log_model(params, run_id, checkpoint)
    return run_id, version


def test_classes_syntax() -> None:
    assert serving.parse_classes("sky, tree,road") == ["sky", "tree", "road"]
    assert serving.parse_classes("person, people; sky") == ["person, people", "sky"]
    assert serving.parse_classes("person, people;") == ["person, people"]
    assert serving.parse_classes(" sky ,, tree, ") == ["sky", "tree"]
    with pytest.raises(ValueError, match="no class names"):
        serving.parse_classes(" , ;")
    assert len(serving.parse_classes(",".join(f"c{i}" for i in range(300)))) == 300  # 16-bit label maps
    with pytest.raises(ValueError, match="at most 65535"):
        serving.parse_classes(",".join(f"c{i}" for i in range(65536)))


def test_image_and_label_map_codecs() -> None:
    image = picture(20, 30, seed=1)
    assert np.array_equal(serving.decode_image(serving.encode_image(image)), image)
    jpeg = serving.decode_image(serving.encode_image(image, format="JPEG"))
    assert jpeg.shape == (20, 30, 3) and jpeg.dtype == np.uint8
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned 90 degrees
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", exif=exif)
    assert serving.decode_image(base64.b64encode(buf.getvalue()).decode()).shape == (30, 20, 3)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="GIF")
    with pytest.raises(ValueError, match="GIF"):
        serving.decode_image(base64.b64encode(buf.getvalue()).decode())
    with pytest.raises(ValueError, match="not valid base64"):
        serving.decode_image("not base64!")
    with pytest.raises(ValueError, match="not a readable PNG or JPEG"):
        serving.decode_image(base64.b64encode(b"plain text").decode())
    label = np.array([[0, 1, 255], [2, 2, 0]], np.uint8)
    assert np.array_equal(serving.decode_label_map(serving.encode_label_map(label)), label)


def test_every_logged_model_is_a_new_version_loadable_by_models_uri(checkpoint, mlflow_uri, tmp_path) -> None:
    first_run, first = logged_run(checkpoint)
    second_run, second = logged_run(checkpoint)
    assert (first, second) == ("1", "2")
    client = mlflow.MlflowClient(mlflow_uri)
    version = client.get_model_version(MODEL, "2")
    assert version.run_id == second_run and version.source.startswith("models:/")
    assert client.get_run(second_run).info.status == "FINISHED"
    # the champion alias moves among the registered versions
    assert tracking.promote_champion(MODEL, first_run, tracking_uri=mlflow_uri) == "1"
    assert client.get_model_version_by_alias(MODEL, tracking.CHAMPION_ALIAS).run_id == first_run

    files = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(tmp_path / "v1")))
    assert (files / "artifacts" / "aligner.pt").read_bytes() == checkpoint.read_bytes()
    assert (files / "code" / "components" / "segmenter.py").exists() and (files / "code" / "flows").is_dir()
    requirements = (files / "requirements.txt").read_text().split()
    assert f"torch=={metadata.version('torch')}" in requirements and "fmbseg" not in " ".join(requirements)
    assert json.loads((files / "serving_input_example.json").read_text())["dataframe_split"]["columns"] == [
        "image", "classes"]

    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/latest")
    inputs = model.metadata.get_input_schema().input_names()
    assert inputs == ["image", "classes"] and model.metadata.get_output_schema().input_names() == ["label_map",
                                                                                                  "present"]
    images = [picture(40, 56, seed=2), picture(63, 45, seed=3), picture(40, 56, seed=4)]
    frame = pd.DataFrame({
        "image": [serving.encode_image(images[0]), serving.encode_image(images[1], format="JPEG"),
                  serving.encode_image(images[2])],
        "classes": ["sky, tree, road", "person, people; sky", "sky, tree, road"],
    })
    out = model.predict(frame)
    assert list(out.columns) == ["label_map", "present"] and len(out) == 3

    segmenter = Segmenter.from_checkpoint(checkpoint)
    wanted = [(images[0], ["sky", "tree", "road"]),
              (serving.decode_image(frame["image"][1]), ["person, people", "sky"]),
              (images[2], ["sky", "tree", "road"])]
    for row, (image, classes) in enumerate(wanted):
        label_map = serving.decode_label_map(out["label_map"][row])
        assert label_map.shape == image.shape[:2]
        expected = segmenter.segment(image, classes)
        assert np.array_equal(label_map, expected.label_map), f"row {row}"
        found = sorted(int(k) for k in np.unique(label_map) if k != serving.NONE_INDEX)
        assert list(out["present"][row]) == [classes[k] for k in found], f"row {row}"

    refined = model.predict(frame.iloc[:1], params={"refine": True})
    expected = segmenter.segment(images[0], ["sky", "tree", "road"], refine=True)
    assert np.array_equal(serving.decode_label_map(refined["label_map"][0]), expected.label_map)

    bad = pd.DataFrame({"image": [frame["image"][0], "bm90IGFuIGltYWdl"], "classes": ["sky", "sky"]})
    with pytest.raises(MlflowException, match="row 1: 'image' is not a readable PNG or JPEG"):
        model.predict(bad)
    with pytest.raises(MlflowException, match="row 0: no class names"):
        model.predict(pd.DataFrame({"image": [frame["image"][0]], "classes": [" ; "]}))


def test_promoting_a_run_without_a_registered_model_is_an_error(mlflow_uri) -> None:
    with tracking.start_run(parse_params({}), run_name="untrained", tags={}) as run_id:
        pass
    with pytest.raises(LookupError, match="registered no version"):
        tracking.promote_champion(MODEL, run_id, tracking_uri=mlflow_uri)


def test_the_demo_names_its_first_model_champion(tmp_path, mlflow_uri) -> None:
    from flows.pipeline import demo_champion

    workspace = tmp_path / "ws"
    (workspace / "models").mkdir(parents=True)
    (workspace / "params.yaml").write_text((REPO / "params.yaml").read_text())
    first_run, _ = logged_run(write_mini_checkpoint(workspace / "models" / "aligner.pt"))
    write_mini_checkpoint(workspace / "models" / "aligner.pt", run_id=first_run)
    assert demo_champion(workspace) == f"models:/{MODEL}@champion"
    assert tracking.champion_run_id(MODEL, tracking_uri=mlflow_uri) == first_run
    second_run, _ = logged_run(workspace / "models" / "aligner.pt")
    write_mini_checkpoint(workspace / "models" / "aligner.pt", run_id=second_run)
    demo_champion(workspace)  # a champion exists: the nightly, not the demo, moves it
    assert tracking.champion_run_id(MODEL, tracking_uri=mlflow_uri) == first_run


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait_for_ping(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow models serve did not answer /ping within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def test_mlflow_models_serve_answers_invocations(checkpoint, mlflow_uri, tmp_path) -> None:
    run_id, _ = logged_run(checkpoint)
    tracking.promote_champion(MODEL, run_id, tracking_uri=mlflow_uri)
    port = free_port()
    bin_dir = Path(sys.executable).parent  # the environment's mlflow, and the uvicorn it runs from PATH
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri, OMP_NUM_THREADS="1",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
               PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for_ping(url, proc, log, timeout=180)
        image = picture(48, 64, seed=5)
        status, answer = _post(f"{url}/invocations", {"dataframe_split": {
            "columns": ["image", "classes"], "data": [[serving.encode_image(image), "sky, tree, road"]]}})
        assert status == 200, answer
        [prediction] = answer["predictions"]
        label_map = serving.decode_label_map(prediction["label_map"])
        expected = Segmenter.from_checkpoint(checkpoint).segment(image, ["sky", "tree", "road"])
        assert np.array_equal(label_map, expected.label_map)
        assert prediction["present"] == [["sky", "tree", "road"][k] for k in expected.present]

        status, answer = _post(f"{url}/invocations", {"dataframe_split": {
            "columns": ["image", "classes"], "data": [["bm90IGFuIGltYWdl", "sky"]]}})
        assert status == 400 and "row 0: 'image' is not a readable PNG or JPEG" in answer["message"], answer
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's session: mlflow and the uvicorn it starts
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
