"""The trained model as an MLflow pyfunc model (docs/design.md §6b): the segmenter behind a DataFrame API.

Every train run logs :class:`SegmenterModel` (``model_registry.log_model``) with the aligner checkpoint
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
  classes; ``"person, people;"``: one). A ``;`` anywhere selects the second form. A JSON list of
  strings is read as one class per string (``["person, people", "sky"]``). A class named twice
  (its first name, case-insensitive) is refused, as ``label`` refuses it.

Budgets (``serve`` in params.yaml, recorded in the model's pyfunc config when a run logs it): the
images of one request hold at most ``max_pixels`` pixels together, a row names at most
``max_classes`` classes; more is refused with a 400 before any image is decoded. Served by
``mlflow models serve``, a request also stops computing at the server's request timeout
(``--timeout``, $MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT): the server has answered 504 by then, and
the work is checked against that deadline before every encoder forward.

The frame out, one row per input row: ``label_map``, a base64-encoded label PNG (8-bit palette or 16-bit grayscale) at the image's
size holding each pixel's index into that row's classes (8-bit, 255 = none; 16-bit with 65535 = none
for a row of more than 255 classes), and ``present``, the names of the classes in it (as
:func:`parse_classes` reads them). A row that cannot be
read fails the whole call with an error that names the row (0-based). The one parameter,
``refine`` (default false), asks for the SAM-refined maps instead of the base ones.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import logging
import numbers
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.environment_variables import MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import DEADLINE_EXCEEDED
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema
from packaging.requirements import Requirement
from PIL import Image, ImageOps, UnidentifiedImageError

from components.config import Params, ServeConfig, check_vocabulary
from components.io import MAX_LABEL_CLASSES, UNLABELLED, decode_label_png, encode_label_png

__all__ = [
    "CHECKPOINT_ARTIFACT",
    "NONE_INDEX",
    "SIGNATURE",
    "SegmenterModel",
    "model_config",
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
IMAGE_FORMATS = ("PNG", "JPEG")

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, "image"), ColSpec(DataType.string, "classes")]),
    outputs=Schema([ColSpec(DataType.string, "label_map"), ColSpec(Array(DataType.string), "present")]),
    params=ParamSchema([ParamSpec("refine", DataType.boolean, False)]),
)


_logger = logging.getLogger(__name__)


def _bad_row(row: int, message: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(f"row {row}: {message}")


def _json_type(value: object) -> str:
    """The JSON name of a cell's type, as the client wrote it (pandas may hold a null as NaN)."""
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return "bool"
    if isinstance(value, numbers.Integral):
        return "int"
    if isinstance(value, numbers.Real):
        return "float"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "list"
    return "object" if isinstance(value, dict) else type(value).__name__


def parse_classes(value: str | Sequence[str]) -> list[str]:
    """The classes of one row: ``"sky, tree"`` -> ``["sky", "tree"]``; with a ``;`` the classes are
    separated by it and keep their commas as synonyms: ``"person, people; sky"`` ->
    ``["person, people", "sky"]``; a list of strings is one class each. Blank names are dropped; no
    class at all, or one named twice, is an error (ValueError; TypeError for another type)."""
    if isinstance(value, str):
        if ";" in value:
            synonyms = [[word.strip() for word in entry.split(",")] for entry in value.split(";")]
            names = [", ".join(word for word in words if word) for words in synonyms]
        else:
            names = [name.strip() for name in value.split(",")]
    elif isinstance(value, (list, tuple, np.ndarray)) and all(isinstance(name, str) for name in value):
        names = [name.strip() for name in value]
    else:
        raise TypeError("classes must be a string of comma-separated class names or a list of strings, "
                        f"got {_json_type(value)}")
    names = [name for name in names if name]
    if not names:
        raise ValueError(f"no class names in {value!r}: write them comma-separated, e.g. 'sky, tree'")
    if len(names) > MAX_LABEL_CLASSES:
        raise ValueError(f"{len(names)} classes; at most {MAX_LABEL_CLASSES} per row (65535 marks 'none')")
    return check_vocabulary(names, source="classes", unit="name")


def encode_image(image: np.ndarray | Image.Image, format: str = "PNG") -> str:
    """An image ([H, W, 3] uint8 RGB or PIL) as the ``image`` column wants it: base64 PNG or JPEG."""
    if format not in IMAGE_FORMATS:
        raise ValueError(f"unsupported image format {format!r}; use one of {IMAGE_FORMATS}")
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    picture.save(buf, format=format)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _image_bytes(value: object) -> bytes:
    """The ``image`` cell's file bytes (ValueError for bad base64, TypeError for a non-string)."""
    if not isinstance(value, str):
        raise TypeError(f"image must be a base64-encoded PNG/JPEG string, got {_json_type(value)}")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"'image' is not valid base64 ({e})") from None


@contextlib.contextmanager
def _opened(data: bytes) -> Iterator[Image.Image]:
    """PNG or JPEG bytes opened lazily (the header read, no pixel decoded until asked)."""
    try:
        with Image.open(io.BytesIO(data)) as picture:
            if picture.format not in IMAGE_FORMATS:
                raise ValueError(f"'image' is a {picture.format} file; send PNG or JPEG bytes")
            yield picture
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as e:
        raise ValueError(f"'image' is not a readable PNG or JPEG file ({e})") from None


def _pixels(data: bytes) -> np.ndarray:
    """PNG or JPEG bytes -> [H, W, 3] uint8 RGB, EXIF orientation applied (as the label map's size
    then matches the picture a viewer shows)."""
    with _opened(data) as picture:
        return np.array(ImageOps.exif_transpose(picture).convert("RGB"), dtype=np.uint8)


def decode_image(text: str) -> np.ndarray:
    """The ``image`` column's base64 PNG or JPEG -> [H, W, 3] uint8 RGB, EXIF orientation applied."""
    return _pixels(_image_bytes(text))


def encode_label_map(label_map: np.ndarray) -> str:
    """[H, W] uint8 class indices (255 = none), or uint16 past 255 classes (65535 = none) -> base64
    label PNG, an 8-bit palette or 16-bit grayscale one (the ``label_map`` column)."""
    return base64.b64encode(encode_label_png(label_map, palette=True)).decode("ascii")


def decode_label_map(text: str) -> np.ndarray:
    """The ``label_map`` column -> [H, W] class indices into the row's classes: uint8 with 255 =
    none, or uint16 with 65535 = none for a row of more than 255 classes."""
    return decode_label_png(base64.b64decode(text, validate=True))


def model_config(params: Params) -> dict[str, Any]:
    """The logged model's pyfunc config (``context.model_config`` at load): its budgets."""
    return params.serve.model_dump()


def _read_rows(model_input: pd.DataFrame, budget: ServeConfig) -> list[tuple[bytes, list[str]]]:
    """Every row's (image bytes, classes), checked against the budgets from the image headers alone:
    an error names the row, and nothing has been decoded when one is raised."""
    rows = []
    pixels = 0
    columns = zip(model_input["image"], model_input["classes"], strict=True)
    for row, (image_cell, classes_cell) in enumerate(columns):
        try:
            classes = parse_classes(classes_cell)
            if len(classes) > budget.max_classes:
                raise ValueError(f"{len(classes)} classes, above the model's budget of {budget.max_classes} per row "
                                 "(serve.max_classes)")
            data = _image_bytes(image_cell)
            with _opened(data) as picture:
                width, height = picture.size
        except (ValueError, TypeError) as e:
            raise _bad_row(row, str(e)) from None
        pixels += width * height
        if pixels > budget.max_pixels:
            raise _bad_row(row, f"the images up to this one ({width} x {height}) hold {pixels:,} pixels, above the "
                                f"model's budget of {budget.max_pixels:,} per request (serve.max_pixels): send "
                                "smaller images or fewer rows")
        rows.append((data, classes))
    return rows


def _request_deadline() -> Callable[[], None] | None:
    """Under ``mlflow models serve``: a check that raises once the server's request timeout has
    passed (its client got a 504 then, and the worker thread would compute on for nothing).
    None elsewhere (``mlflow.pyfunc.load_model`` in a program: no deadline)."""
    if not MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.is_set():
        return None
    timeout = MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT.get()
    deadline_at = time.monotonic() + timeout

    def check() -> None:
        if time.monotonic() > deadline_at:
            message = (f"stopped: the request passed the server's timeout of {timeout} s (mlflow models serve "
                       "--timeout), and its client was answered 504; send smaller images, fewer rows or fewer "
                       "classes, or raise the timeout")
            _logger.warning(message)
            raise MlflowException(message, error_code=DEADLINE_EXCEEDED)

    return check


class SegmenterModel(mlflow.pyfunc.PythonModel):
    """pyfunc model over ``components.segmenter.Segmenter`` (built from the logged checkpoint)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Build the segmenter from the checkpoint artifact (weights from the weights registry) and
        read the budgets from the model's config (params.yaml's defaults for a model without)."""
        from components.segmenter import Segmenter

        self._budget = ServeConfig.model_validate(context.model_config or {})
        self._segmenter = Segmenter.from_checkpoint(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Frame ``image``, ``classes`` -> frame ``label_map``, ``present`` (see the module doc);
        ``params={"refine": True}`` returns the SAM-refined maps."""
        refine = bool((params or {}).get("refine", False))
        check = _request_deadline()
        rows = []
        for row, (data, classes) in enumerate(_read_rows(model_input, self._budget)):
            try:
                rows.append((_pixels(data), classes))
            except ValueError as e:  # a file whose header reads but whose pixels do not
                raise _bad_row(row, str(e)) from None
        # rows that ask for the same classes share one batch (and one set of text prototypes)
        groups: dict[tuple[str, ...], list[int]] = {}
        for row, (_, classes) in enumerate(rows):
            groups.setdefault(tuple(classes), []).append(row)
        out: list[dict[str, Any]] = [{} for _ in rows]
        for classes, members in groups.items():
            images = [rows[r][0] for r in members]
            if check is not None:
                check()
            results = self._segmenter.segment_batch(images, list(classes), refine=refine, check=check)
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

