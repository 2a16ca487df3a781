"""`fmbseg predict` and components/predictions.py on real files: a folder with a sub-folder, a corrupt
JPEG, a CMYK JPEG, a grayscale PNG and an EXIF-rotated photo, segmented with a vocabulary the
miniature model never trained on; resuming after an interruption; model URIs; user errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from components.predictions import (
    CLASSES_FILE,
    PREDICTIONS_FILE,
    decode_label_map,
    encode_label_map,
    list_sources,
    predict_images,
)
from components.skipped import SKIPPED_FILE, read_skipped
from tests.mini_checkpoint import write_mini_checkpoint
from tests.oneoff_runs import run_fmbseg

NEW_VOCABULARY = ["sky, clouds", "grass", "car"]  # the checkpoint trained on "thing", "stuff"


def photo(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((width, height), Image.BILINEAR))


def write_inputs(root: Path) -> dict[str, tuple[int, int]]:
    """The test folder; returns relative output stem -> (height, width) as displayed."""
    (root / "sub" / "deeper").mkdir(parents=True)
    Image.fromarray(photo(40, 60, 0)).save(root / "plain.jpg", quality=95)
    Image.fromarray(photo(35, 50, 1)[..., 0]).save(root / "sub" / "gray.png")  # mode L
    Image.fromarray(photo(30, 45, 2)).convert("CMYK").save(root / "sub" / "cmyk.jpg")
    stored = Image.fromarray(photo(48, 32, 3))  # stored 32 wide x 48 high; EXIF 6 = show turned: 48 x 32
    exif = stored.getexif()
    exif[0x0112] = 6
    stored.save(root / "sub" / "deeper" / "rotated.jpg", exif=exif)
    good = (root / "plain.jpg").read_bytes()
    (root / "sub" / "corrupt.jpg").write_bytes(good[: len(good) // 3])  # truncated mid-scan
    (root / "notes.txt").write_text("not an image")
    return {"plain": (40, 60), "sub/gray": (35, 50), "sub/cmyk": (30, 45), "sub/deeper/rotated": (32, 48)}


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_outputs_at_original_sizes_with_records_and_skips(segmenter, tmp_path):
    expected = write_inputs(tmp_path / "in")
    sources, not_listed, folders = list_sources([tmp_path / "in"])
    assert folders == [tmp_path / "in"]
    assert [s.stem for s in sources] == ["plain", "sub/cmyk", "sub/corrupt", "sub/deeper/rotated", "sub/gray"]
    out = tmp_path / "out"
    summary = predict_images(segmenter, sources, NEW_VOCABULARY, out, key="k", overlays=True, batch_size=2,
                             skipped=not_listed)
    assert summary._asdict() == {"images": 5, "segmented": 4, "resumed": 0, "skipped": 2}

    assert (out / CLASSES_FILE).read_text() == "sky, clouds\ngrass\ncar\n"
    skipped = read_skipped(out / SKIPPED_FILE)
    assert [r["path"] for r in skipped] == [(tmp_path / "in" / name).as_posix() for name in ("notes.txt",
                                                                                             "sub/corrupt.jpg")]
    assert "not an image file" in skipped[0]["reason"] and "corrupt or truncated" in skipped[1]["reason"]

    records = [json.loads(line) for line in (out / PREDICTIONS_FILE).read_text().splitlines()]
    assert [r["output"] for r in records] == ["plain.png", "sub/cmyk.png", "sub/deeper/rotated.png", "sub/gray.png"]
    for record in records:
        stem = record["output"].removesuffix(".png")
        label = decode_label_map((out / record["output"]).read_bytes())
        assert label.shape == expected[stem] and label.dtype == np.uint8
        assert (record["height"], record["width"]) == expected[stem]
        assert record["sha256"] == __import__("hashlib").sha256(Path(record["source"]).read_bytes()).hexdigest()
        present = sorted(int(c) for c in np.unique(label))
        assert [c["index"] for c in record["classes"]] == present
        assert sum(c["share"] for c in record["classes"]) == pytest.approx(1.0, abs=1e-5)
        for entry in record["classes"]:
            rle = {"size": entry["rle"]["size"], "counts": entry["rle"]["counts"].encode()}
            np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), label == entry["index"])
            assert entry["name"] == NEW_VOCABULARY[entry["index"]].split(",")[0]
        with Image.open(out / f"{stem}_overlay.jpg") as overlay:
            assert overlay.format == "JPEG"


def test_resume_after_an_interruption_is_byte_identical(segmenter, tmp_path, monkeypatch):
    write_inputs(tmp_path / "in")
    sources = list_sources([tmp_path / "in"]).sources
    whole = tmp_path / "whole"
    predict_images(segmenter, sources, NEW_VOCABULARY, whole, key="k", batch_size=2)

    interrupted = tmp_path / "interrupted"
    segment_batch = segmenter.segment_batch
    batches: list[int] = []

    def stop_at_the_second_batch(images: list, *args: object, **kwargs: object) -> list:
        batches.append(len(images))
        if len(batches) == 2:  # Ctrl-C while the model runs: the first batch's outputs are being written
            raise KeyboardInterrupt
        return segment_batch(images, *args, **kwargs)

    monkeypatch.setattr(segmenter, "segment_batch", stop_at_the_second_batch)
    with pytest.raises(KeyboardInterrupt):
        predict_images(segmenter, sources, NEW_VOCABULARY, interrupted, key="k", batch_size=2)
    monkeypatch.undo()
    assert len((interrupted / PREDICTIONS_FILE).read_text().splitlines()) == 2
    with open(interrupted / PREDICTIONS_FILE, "ab") as f:  # and a torn line, as a kill mid-write leaves
        f.write(b'{"source": "half')
    resumed = predict_images(segmenter, sources, NEW_VOCABULARY, interrupted, key="k", batch_size=2)
    assert resumed.resumed == 2 and resumed.segmented == 2
    assert files(interrupted) == files(whole)

    import components.predictions as predictions

    decoded: list[Path] = []
    read = predictions.read_image_rgb
    monkeypatch.setattr(predictions, "read_image_rgb", lambda path: decoded.append(path) or read(path))
    again = predict_images(segmenter, sources, NEW_VOCABULARY, interrupted, key="k", batch_size=2)
    assert again.segmented == 0 and again.resumed == 4 and files(interrupted) == files(whole)
    assert [p.name for p in decoded] == ["corrupt.jpg"]  # done images are hashed, not decoded again

    Image.fromarray(photo(40, 60, 9)).save(tmp_path / "in" / "plain.jpg")  # new content: only it is redone
    changed = predict_images(segmenter, sources, NEW_VOCABULARY, interrupted, key="k", batch_size=2)
    assert changed.segmented == 1 and changed.resumed == 3
    other = predict_images(segmenter, sources, NEW_VOCABULARY, interrupted, key="other settings", batch_size=2)
    assert other.segmented == 4 and other.resumed == 0


def test_listing_files_globs_and_clashes(tmp_path):
    write_inputs(tmp_path / "in")
    by_glob = list_sources([str(tmp_path / "in" / "**" / "*.jpg")]).sources
    assert [s.stem for s in by_glob] == ["plain", "sub/cmyk", "sub/corrupt", "sub/deeper/rotated"]
    single = list_sources([tmp_path / "in" / "sub" / "gray.png", tmp_path / "in" / "sub"]).sources
    assert [s.stem for s in single] == ["gray", "cmyk", "corrupt", "deeper/rotated"]  # gray.png listed once
    Image.fromarray(photo(10, 10, 0)).save(tmp_path / "in" / "plain.png")
    with pytest.raises(ValueError, match="same outputs"):
        list_sources([tmp_path / "in"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        list_sources([tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match="no file matches"):
        list_sources([str(tmp_path / "*.webp")])


def test_label_maps_of_more_than_255_classes_are_16_bit_pngs():
    label = np.array([[0, 300], [65535, 7]], dtype=np.uint16)
    data = encode_label_map(label)
    with Image.open(__import__("io").BytesIO(data)) as im:
        assert im.mode in ("I;16", "I")
    decoded = decode_label_map(data)
    assert decoded.dtype == np.uint16 and np.array_equal(decoded, label)
    small = np.array([[0, 255]], dtype=np.uint8)
    assert np.array_equal(decode_label_map(encode_label_map(small)), small)


# ------------------------------------------------------------------------------ flow and command
def test_command_from_a_paper_profile_root(tmp_path, monkeypatch, repo_root, prefect_harness, mlflow_uri):
    """A demo model runs from a project whose params.yaml is the paper profile; user errors exit 2."""
    from flows.cli import app

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((repo_root / "params.yaml").read_text().replace("device: auto",
                                                                                          "device: cpu"))
    write_inputs(tmp_path / "in")
    model = write_mini_checkpoint(tmp_path / "demo" / "models" / "aligner.pt")
    runner = CliRunner()
    result = runner.invoke(app, ["predict", "in", "--model", str(model), "--classes", "sky,grass,car", "--out", "out",
                                 "--refine", "--batch-size", "3"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert summary["segmented"] == 4 and summary["skipped"] == 2  # corrupt.jpg and notes.txt
    assert (tmp_path / "out" / "sub" / "deeper" / "rotated.png").exists()

    for args, message in [
        (["nowhere", "--model", str(model), "--classes", "a", "--out", "o"], "no such file or folder: nowhere"),
        (["in", "--model", str(model), "--out", "o"], "exactly one of --classes and --vocabulary"),
        (["in", "--model", str(model), "--vocabulary", "nope", "--out", "o"], "neither a shipped class list"),
        (["in", "--model", "s3://bucket/aligner.pt", "--classes", "a", "--out", "o"], "unsupported model URI"),
        (["in", "--model", "runs:/0123abc", "--classes", "a", "--out", "o"], "no such run"),
        (["in", "--model", "models:/fmbseg-aligner@champion", "--classes", "a", "--out", "o"], "no such registered"),
        (["in", "--classes", "a", "--out", "o"], "no aligner checkpoint at models/aligner.pt: run `fmbseg train`"),
        (["in", "--model", str(model), "--classes", "a", "--out", "o", "--overlays", "--overlay-size", "big"],
         "--overlay-size must be 'full' or a height in pixels"),
        (["in", "--model", str(model), "--classes", "a", "--out", "o", "--overlay-size", "full"],
         "--overlay-size goes with --overlays"),
    ]:
        result = runner.invoke(app, ["predict", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_command_without_a_prefect_server_writes_full_resolution_overlays(tmp_path, repo_root, checkpoint):
    """`fmbseg predict` as a real process without PREFECT_API_URL starts no Prefect server
    (flows.runmode); `--overlay-size full` draws each panel at the image's own size."""
    (tmp_path / "params.yaml").write_text((repo_root / "params.yaml").read_text().replace("device: auto",
                                                                                          "device: cpu"))
    sizes = write_inputs(tmp_path / "in")
    done, started = run_fmbseg(["predict", "in", "--model", str(checkpoint), "--classes", "sky,grass,car",
                                "--out", "out", "--overlays", "--overlay-size", "full"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not started, done.stderr[-3000:]
    assert json.loads(done.stdout[done.stdout.index("{"):])["segmented"] == len(sizes)
    for stem, (height, width) in sizes.items():  # image | prediction, 6 px apart, a title and legend around
        with Image.open(tmp_path / "out" / f"{stem}_overlay.jpg") as overlay:
            assert overlay.width == 2 * width + 6 and overlay.height > height


def test_model_uris_resolve_to_the_logged_checkpoint(tmp_path, monkeypatch, mlflow_uri):
    from components.config import parse_params
    from flows import model_registry, tracking

    monkeypatch.chdir(tmp_path)
    params = parse_params({})
    assert model_registry.resolve_model_uri(None, params) == Path("models") / "aligner.pt"  # no champion yet
    with tracking.start_run(params, run_name="train", tags={}) as run_id:
        model = write_mini_checkpoint(tmp_path / "aligner.pt", run_id=run_id)
        tracking.log_checkpoint(params, run_id, model)
        model_registry.log_model(params, run_id, model)  # registers version 1, as `fmbseg train` does
    by_run = model_registry.resolve_model_uri(f"runs:/{run_id}", params, dst_dir=tmp_path / "a")
    assert by_run.read_bytes() == model.read_bytes()
    model_registry.promote_champion(params.tracking.registered_model, run_id, tracking_uri=mlflow_uri)
    for uri in (f"models:/{params.tracking.registered_model}@champion", f"models:/{params.tracking.registered_model}/1",
                None):
        assert model_registry.resolve_model_uri(uri, params).read_bytes() == model.read_bytes()
    with pytest.raises(ValueError, match="no such registered model version"):
        model_registry.resolve_model_uri(f"models:/{params.tracking.registered_model}@nightly", params)
    with pytest.raises(ValueError, match="models:/<name>@<alias>"):
        model_registry.resolve_model_uri("models:/", params)
