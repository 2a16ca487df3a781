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
from mlflow.exceptions import MlflowException
from PIL import Image

from components.config import ConfigError, parse_params
from components.segmenter import Segmenter
from flows import model_registry, serving, tracking
from flows.server import free_port
from tests import REPO_ROOT
from tests.mini_checkpoint import write_mini_checkpoint

REPO = REPO_ROOT
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


def logged_run(checkpoint: Path, serve: dict | None = None) -> tuple[str, str]:
    """A finished train-like run that logged the model (with the ``serve`` budgets given, else
    params.yaml's defaults): (run id, registered version)."""
    params = parse_params({"serve": serve} if serve else {})
    with tracking.start_run(params, run_name="train", tags={tracking.STAGE_TAG: "train"}) as run_id:
        version = model_registry.log_model(params, run_id, checkpoint)
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
    assert serving.parse_classes(["person, people", " sky ", ""]) == ["person, people", "sky"]
    # a class named twice (its first name, any case) is refused, as `label` refuses it
    with pytest.raises(ValueError, match=r"class 'sky' appears more than once \(names 1 and 3\)"):
        serving.parse_classes("sky, tree, Sky")
    with pytest.raises(ValueError, match="class 'person' appears more than once"):
        serving.parse_classes(["person, people", "person"])
    for value, kind in ((5, "int"), (None, "null"), (float("nan"), "null"), (pd.NA, "null"), (["sky", 3], "list"),
                        ({}, "object"), (2.5, "float"), (True, "bool")):
        with pytest.raises(TypeError, match="^classes must be a string of comma-separated class names or a list of "
                                            f"strings, got {kind}$"):
            serving.parse_classes(value)


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
    assert model_registry.promote_champion(MODEL, first_run, tracking_uri=mlflow_uri) == "1"
    assert client.get_model_version_by_alias(MODEL, model_registry.CHAMPION_ALIAS).run_id == first_run

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


def _png(height: int, width: int) -> str:
    """A base64 PNG of one colour (a few kB even at 8000 x 8000)."""
    return serving.encode_image(np.full((height, width, 3), 128, np.uint8))


def _header_only(text: str) -> str:
    """The PNG's first half, its header (its size) and part of its pixel data, the rest cut off: a
    file that can only be refused by its header, as decoding it fails."""
    data = base64.b64decode(text)
    return base64.b64encode(data[: len(data) // 2]).decode()


def test_budgets_are_validated_settings() -> None:
    assert parse_params({}).serve.model_dump() == {"max_pixels": 16_777_216, "max_classes": 1024}
    for bad, message in (({"max_classes": 70_000}, "serve.max_classes"), ({"max_pixels": 0}, "serve.max_pixels"),
                         ({"max_pixel": 5}, "max_pixel")):
        with pytest.raises(ConfigError, match=message):
            parse_params({"serve": bad})


def test_budgets_are_the_logged_models_config_and_refuse_before_decoding(checkpoint, mlflow_uri) -> None:
    logged_run(checkpoint, serve={"max_pixels": 10_000, "max_classes": 3})
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/latest")
    assert model.model_config == {"max_pixels": 10_000, "max_classes": 3}
    small = _png(60, 80)  # 4,800 pixels

    def frame(images: list[object], classes: list[object]) -> pd.DataFrame:
        """Columns of any JSON values, as the scoring server parses a request's (object dtype)."""
        return pd.DataFrame({"image": pd.Series(images, dtype=object), "classes": pd.Series(classes, dtype=object)})

    out = model.predict(frame([small, small], ["sky, tree", ["a", "b, bee", "c"]]))
    assert len(out) == 2 and set(out["present"][1]) <= {"a", "b, bee", "c"}

    def refusal(images: list[object], classes: list[object]) -> str:
        start = time.monotonic()
        with pytest.raises(MlflowException) as err:
            model.predict(frame(images, classes))
        assert time.monotonic() - start < 5
        assert err.value.get_http_status_code() == 400 and "\n" not in err.value.message
        return err.value.message

    assert refusal([small, small, small], ["sky"] * 3) == (
        "row 2: the images up to this one (80 x 60) hold 14,400 pixels, above the model's budget of 10,000 per "
        "request (serve.max_pixels): send smaller images or fewer rows")
    # an 8000 x 8000 file is refused from its header: none of its pixels is decoded (they are cut off)
    huge = _header_only(_png(8000, 8000))
    assert "8000 x 8000" in refusal([huge], ["sky"])
    assert "not a readable PNG" in refusal([_header_only(small)], ["sky"])  # the same cut, within budget
    assert refusal([small], ["a, b, c, d"]) == (
        "row 0: 4 classes, above the model's budget of 3 per row (serve.max_classes)")
    assert refusal([small], ["sky, tree, Sky"]) == (
        "row 0: classes: class 'sky' appears more than once (names 1 and 3)")
    assert refusal([small], [5]) == (
        "row 0: classes must be a string of comma-separated class names or a list of strings, got int")
    assert refusal([None], ["sky"]) == "row 0: image must be a base64-encoded PNG/JPEG string, got null"


def test_segment_batch_checks_before_every_forward_and_stops_at_a_raise(checkpoint) -> None:
    """The served model's deadline hook: ``check`` runs before each encoder forward (16 windows; a
    56 x 2048 image holds 73 windows, so 5 forwards) and what it raises ends the work there."""
    segmenter = Segmenter.from_checkpoint(checkpoint)
    forwards: list[int] = []
    encode = segmenter.encode
    segmenter.encode = lambda pixels: forwards.append(len(pixels)) or encode(pixels)  # type: ignore[method-assign]
    image = picture(56, 2048, seed=6)
    calls: list[int] = []
    expected = segmenter.segment(image, ["sky", "tree"])
    forwards.clear()
    got = segmenter.segment_batch([image], ["sky", "tree"], check=lambda: calls.append(len(forwards)))[0]
    assert np.array_equal(got.label_map, expected.label_map)
    assert calls == [0, 1, 2, 3, 4] and sum(forwards) == 73  # before each forward, before it ran

    def deadline() -> None:
        if len(forwards) == 2:
            raise TimeoutError("deadline")

    forwards.clear()
    with pytest.raises(TimeoutError):
        segmenter.segment_batch([image], ["sky", "tree"], check=deadline)
    assert len(forwards) == 2


def test_promoting_a_run_without_a_registered_model_is_an_error(mlflow_uri) -> None:
    with tracking.start_run(parse_params({}), run_name="untrained", tags={}) as run_id:
        pass
    with pytest.raises(LookupError, match="registered no version"):
        model_registry.promote_champion(MODEL, run_id, tracking_uri=mlflow_uri)


def test_the_demo_names_its_first_model_champion(tmp_path, mlflow_uri) -> None:
    from flows.pipeline import demo_champion

    workspace = tmp_path / "ws"
    (workspace / "models").mkdir(parents=True)
    (workspace / "params.yaml").write_text((REPO / "params.yaml").read_text())
    first_run, _ = logged_run(write_mini_checkpoint(workspace / "models" / "aligner.pt"))
    write_mini_checkpoint(workspace / "models" / "aligner.pt", run_id=first_run)
    assert demo_champion(workspace) == f"models:/{MODEL}@champion"
    assert model_registry.champion_run_id(MODEL, tracking_uri=mlflow_uri) == first_run
    second_run, _ = logged_run(workspace / "models" / "aligner.pt")
    write_mini_checkpoint(workspace / "models" / "aligner.pt", run_id=second_run)
    demo_champion(workspace)  # a champion exists: the nightly, not the demo, moves it
    assert model_registry.champion_run_id(MODEL, tracking_uri=mlflow_uri) == first_run


def _post(url: str, body: dict) -> tuple[int, dict]:
    """(status, the answer's JSON, or {"text": ...} for an answer that is not JSON, as a 504's)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, text = response.status, response.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, {"text": text.decode()}


def _rows(*rows: list[object]) -> dict:
    return {"dataframe_split": {"columns": ["image", "classes"], "data": list(rows)}}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and all its children (mlflow and its uvicorn)."""
    import psutil

    root = psutil.Process(pid)
    total = 0.0
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


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


def test_mlflow_models_serve_answers_refuses_and_stops_at_its_timeout(checkpoint, mlflow_uri, tmp_path) -> None:
    """A real server: answers, refuses bad and oversized requests with a 400 that names the field,
    and a request that passes the server's timeout (2 s here) stops computing after its 504."""
    run_id, _ = logged_run(checkpoint, serve={"max_pixels": 30_000_000, "max_classes": 50})
    model_registry.promote_champion(MODEL, run_id, tracking_uri=mlflow_uri)
    port = free_port()
    bin_dir = Path(sys.executable).parent  # the environment's mlflow, and the uvicorn it runs from PATH
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_uri, OMP_NUM_THREADS="1",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false",
               PATH=os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    cmd = [str(bin_dir / "mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--timeout", "2"]
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

        # refused with a 400 that names the row and the field, before any compute
        small = _png(48, 64)
        refusals = {
            "row 0: classes must be a string of comma-separated class names or a list of strings, got int":
                _rows([small, 5]),
            "row 1: image must be a base64-encoded PNG/JPEG string, got null": _rows([small, "sky"], [None, "sky"]),
            "row 0: classes: class 'sky' appears more than once (names 1 and 3)": _rows([small, "sky, tree, SKY"]),
            "row 0: 51 classes, above the model's budget of 50 per row (serve.max_classes)":
                _rows([small, [f"c{i}" for i in range(51)]]),
            "row 0: the images up to this one (8000 x 8000) hold 64,000,000 pixels, above the model's budget of "
            "30,000,000 per request (serve.max_pixels)": _rows([_png(8000, 8000), "sky"]),
        }
        for message, body in refusals.items():
            start = time.monotonic()
            status, answer = _post(f"{url}/invocations", body)
            assert status == 400 and message in answer["message"], (message, answer)
            assert time.monotonic() - start < 5
        status, answer = _post(f"{url}/invocations", _rows([small, ["sky", "tree, forest"]]))
        assert status == 200 and set(answer["predictions"][0]["present"]) <= {"sky", "tree, forest"}, answer

        # within budget, but ~20 s of windows (200 rows of 56 x 2048: 73 windows each): a 504 after
        # 2 s, then the worker stops at its next encoder forward instead of computing for nothing
        long_request = _rows(*[[_png(56, 2048), "sky, tree"]] * 200)
        start = time.monotonic()
        status, answer = _post(f"{url}/invocations", long_request)
        assert status == 504 and time.monotonic() - start < 10, answer
        stop = time.monotonic() + 10
        while "stopped: the request passed the server's timeout of 2 s" not in log.read_text():
            assert time.monotonic() < stop, log.read_text()[-3000:]
            time.sleep(0.2)
        assert time.monotonic() - start < 8  # the whole request's work takes ~20 s
        before = _cpu_seconds(proc.pid)
        time.sleep(2)
        assert _cpu_seconds(proc.pid) - before < 0.5  # idle: nothing computes on
        status, answer = _post(f"{url}/invocations", _rows([small, "sky"]))
        assert status == 200, answer
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's session: mlflow and the uvicorn it starts
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
