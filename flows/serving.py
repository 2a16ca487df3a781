"""The trained model as an MLflow pyfunc model (docs/design.md §6b): the segmenter behind a DataFrame API.

Every train run logs :class:`SegmenterModel` (``tracking.log_model``) with the aligner checkpoint
as its one artifact and the project's code and pinned requirements beside it;
``mlflow.pyfunc.load_model("models:/fmbseg-aligner@champion")`` and ``mlflow models serve`` rebuild
the segmenter from that checkpoint alone. The DINOv2, CLIP (and, for refined maps, SAM) weights
resolve through the project's weights registry when the model loads ($FMBSEG_WEIGHTS_DIR, the hub
cache; miniatures are seeded), so the model never carries them.

The frame in: one row per image, columns

- ``image``: the image file, base64-encoded PNG or JPEG bytes;
- ``classes``: the class names, comma-separated (``"sky, tree, person"``). A class that needs
  synonyms (docs/design.md §4: their prototype is the mean over synonyms) is written in the second form:
  classes separated by ``;`` and each one's synonyms by commas (``"person, people; sky"``: two
  classes; ``"person, people;"``: one). A ``;`` anywhere selects the second form.

The frame out, one row per input row: ``label_map``, a base64-encoded grayscale PNG at the image's
size holding each pixel's index into that row's classes (8-bit, 255 = none; 16-bit with 65535 = none
for a row of more than 255 classes), and ``present``, the names of the classes in it (as
:func:`parse_classes` reads them). A row that cannot be
read fails the whole call with an error that names the row (0-based). The one parameter,
``refine`` (default false), asks for the SAM-refined maps instead of the base ones.
"""

from __future__ import annotations

import base64
import binascii
import io
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema
from packaging.requirements import Requirement
from PIL import Image, ImageOps, UnidentifiedImageError

from components.io import MAX_LABEL_CLASSES, UNLABELLED, decode_label_png, encode_label_png

__all__ = [
    "CHECKPOINT_ARTIFACT",
    "NONE_INDEX",
    "MAX_CLASSES",
    "SIGNATURE",
    "SegmenterModel",
    "parse_classes",
    "encode_image",
    "decode_image",
    "encode_label_map",
    "decode_label_map",
    "input_example",
    "pip_requirements",
    "code_paths",
]

CHECKPOINT_ARTIFACT = "checkpoint"  # the key of the aligner checkpoint in the model's artifacts
NONE_INDEX = UNLABELLED  # label map value of a pixel that no class claims (65535 in a 16-bit map)
MAX_CLASSES = MAX_LABEL_CLASSES  # uint8 maps up to 255 classes, uint16 beyond
IMAGE_FORMATS = ("PNG", "JPEG")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "image"), ColSpec(DataType.string, "classes")]),
    outputs=Schema([ColSpec(DataType.string, "label_map"), ColSpec(Array(DataType.string), "present")]),
    params=ParamSchema([ParamSpec("refine", DataType.boolean, False)]),
)


def _bad_row(row: int, message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(f"row {row}: {message}")


def parse_classes(text: str) -> list[str]:
    """The classes of one row: ``"sky, tree"`` -> ``["sky", "tree"]``; with a ``;`` the classes are
    separated by it and keep their commas as synonyms: ``"person, people; sky"`` ->
    ``["person, people", "sky"]``. Blank names are dropped; no class at all is an error."""
    if ";" in text:
        synonyms = [[word.strip() for word in entry.split(",")] for entry in text.split(";")]
        names = [", ".join(word for word in words if word) for words in synonyms]
    else:
        names = [name.strip() for name in text.split(",")]
    names = [name for name in names if name]
    if not names:
        raise ValueError(f"no class names in {text!r}: write them comma-separated, e.g. 'sky, tree'")
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{len(names)} classes; at most {MAX_CLASSES} per row (65535 marks 'none')")
    return names


def encode_image(image: np.ndarray | Image.Image, format: str = "PNG") -> str:
    """An image ([H, W, 3] uint8 RGB or PIL) as the ``image`` column wants it: base64 PNG or JPEG."""
    if format not in IMAGE_FORMATS:
        raise ValueError(f"unsupported image format {format!r}; use one of {IMAGE_FORMATS}")
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    picture.save(buf, format=format)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_image(text: str) -> np.ndarray:
    """The ``image`` column's base64 PNG or JPEG -> [H, W, 3] uint8 RGB, EXIF orientation applied
    (as the label map's size then matches the picture a viewer shows)."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"'image' is not valid base64 ({e})") from None
    try:
        with Image.open(io.BytesIO(data)) as picture:
            if picture.format not in IMAGE_FORMATS:
                raise ValueError(f"'image' is a {picture.format} file; send PNG or JPEG bytes")
            return np.array(ImageOps.exif_transpose(picture).convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as e:
        raise ValueError(f"'image' is not a readable PNG or JPEG file ({e})") from None


def encode_label_map(label_map: np.ndarray) -> str:
    """[H, W] uint8 class indices (255 = none), or uint16 past 255 classes (65535 = none) -> base64
    grayscale PNG, 8- or 16-bit (the ``label_map`` column)."""
    return base64.b64encode(encode_label_png(label_map)).decode("ascii")


def decode_label_map(text: str) -> np.ndarray:
    """The ``label_map`` column -> [H, W] class indices into the row's classes: uint8 with 255 =
    none, or uint16 with 65535 = none for a row of more than 255 classes."""
    return decode_label_png(base64.b64decode(text, validate=True))


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """pyfunc model over ``components.segmenter.Segmenter`` (built from the logged checkpoint)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Build the segmenter from the checkpoint artifact (weights from the weights registry)."""
        from components.segmenter import Segmenter

        self._segmenter = Segmenter.from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Frame ``image``, ``classes`` -> frame ``label_map``, ``present`` (see the module doc);
        ``params={"refine": True}`` returns the SAM-refined maps."""
        refine = bool((params or {}).get("refine", False))
        rows = []
        columns = zip(model_input["image"], model_input["classes"], strict=True)
        for row, (image_text, classes_text) in enumerate(columns):
            try:
                rows.append((decode_image(image_text), parse_classes(classes_text)))
            except (ValueError, TypeError) as e:
                raise _bad_row(row, str(e)) from None
        # rows that ask for the same classes share one batch (and one set of text prototypes)
        groups: dict[tuple[str, ...], list[int]] = {}
        for row, (_, classes) in enumerate(rows):
            groups.setdefault(tuple(classes), []).append(row)
        out: list[dict[str, Any]] = [{} for _ in rows]
        for classes, members in groups.items():
            images = [rows[r][0] for r in members]
            results = self._segmenter.segment_batch(images, list(classes), refine=refine)
            for row, result in zip(members, results, strict=True):
                out[row] = {"label_map": encode_label_map(result.label_map),
                            "present": [classes[k] for k in result.present]}
        return pd.DataFrame(out, columns=["label_map", "present"])


def input_example() -> pd.DataFrame:
    """One row: a 32 x 48 two-colour PNG and two classes (logged with the model, shown in the UI)."""
    picture = np.zeros((32, 48, 3), np.uint8)
    picture[:16] = (90, 160, 250)
    picture[16:] = (30, 140, 40)
    return pd.DataFrame({"image": [encode_image(picture)], "classes": ["sky, tree"]})


def pip_requirements() -> list[str]:
    """The project's runtime dependencies pinned to the installed versions (no pip resolution);
    with :func:`code_paths`, what a fresh environment needs to serve the model."""
    try:
        requires = metadata.requires("fmbseg") or []
    except metadata.PackageNotFoundError:
        raise RuntimeError("the fmbseg package is not installed (pip install -e .): its dependencies are the "
                           "logged model's requirements") from None
    pinned = []
    for line in requires:
        requirement = Requirement(line)
        if requirement.marker is not None and "extra" in str(requirement.marker):
            continue  # optional extras (dev, ray) are not needed to serve
        pinned.append(f"{requirement.name}=={metadata.version(requirement.name)}")
    return pinned


def code_paths(into: str | Path) -> list[str]:
    """Copies of the project's packages (``components``, ``flows``, without caches) under ``into``,
    for ``code_paths``: the model carries the code it was trained with."""
    import components
    import flows

    copies = []
    for package in (components, flows):
        source = Path(package.__file__).parent
        target = Path(into) / source.name
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        copies.append(str(target))
    return copies

