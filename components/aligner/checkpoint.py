"""The self-describing aligner checkpoint ``models/aligner.pt`` (nanoGPT style).

One ``torch.save`` of plain types (dicts, lists, str, numbers, tensors), so it loads with
``torch.load(weights_only=True)`` and the aligner rebuilds from the file alone:

- ``model``: the aligner's state dict; ``aligner_config``: ``Aligner(**aligner_config)`` rebuilds it,
- ``encoder``: ``{"dino": spec name, "image_size": input side}`` (the frozen image encoder),
- ``text``: ``{"clip": spec name, "templates": [...]}`` (what made the prototypes),
- ``class_names`` [K] and ``prototypes`` [K, D] float32 (L2-normalised text features t_k),
- ``inference``: :class:`InferenceSpec` as a dict -- the SAM of the refined prediction, the
  templates of inference-time prototypes and the sliding-window protocol -- so the segmenter
  (components.segmenter) rebuilds from the file alone, whatever params.yaml is next to it,
- ``specs``: ``{"student": ..., "text": ..., "mask": ...}``, the registry spec of each model role as
  :func:`spec_record` writes it (name, family, geometry, normalisation), so a loader knows which
  models the file needs and checks that this version's specs of those names are the same models,
- ``params``: the flattened params that made it; ``mlflow_run_id``: its MLflow run.

Format 2 added ``inference``; format 3 added ``specs``. A format-2 file (written before the model
roles) still loads and predicts the same: its specs are the registry's of the names it records. A
format-1 file is refused with the command that rewrites it.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

import torch

from components.aligner.model import Aligner
from components.io import atomic_write_bytes
from components.labelling.settings import AmgSettings

__all__ = ["CHECKPOINT_FORMAT", "InferenceSpec", "LoadedAligner", "spec_record", "save_checkpoint", "load_aligner",
           "refuse_other_student"]

CHECKPOINT_FORMAT = 3
READABLE_FORMATS = (2, 3)
_KEYS = ("format", "model", "aligner_config", "encoder", "text", "inference", "class_names", "prototypes", "params",
         "mlflow_run_id")
# what a spec record holds: enough to tell two models apart (a spec of the same name with another
# geometry or normalisation is another model)
_RECORD_FIELDS = ("name", "family", "architecture", "hub_repo", "pretrained_tag", "image_size", "patch_size",
                  "embed_dim", "prefix_tokens", "mean", "std")


@dataclass(frozen=True)
class InferenceSpec:
    """How Stage 2 runs at inference (paper §3.4, the TCL protocol of docs/design.md §4).

    sam: SAM registry name of the refined prediction. templates: prompt templates of the text
    prototypes of any vocabulary ("a photo of a {}."). short_side: images are resized to this
    short side first (None: kept as they are); window / stride: the sliding window, in pixels of
    the resized image. amg: SamImage.automatic_masks settings plus the size filter
    ``min_area_frac`` / ``max_area_frac`` (shares of the image area).
    """

    sam: str
    templates: tuple[str, ...]
    short_side: int | None
    window: int
    stride: int
    amg: AmgSettings

    def __post_init__(self) -> None:
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError(f"every template must contain '{{}}', got {list(self.templates)}")
        if self.window < 1 or not 1 <= self.stride <= self.window:
            raise ValueError(f"need window >= 1 and 1 <= stride <= window, got {self.window} / {self.stride}")
        if self.short_side is not None and self.short_side < 1:
            raise ValueError(f"short_side must be >= 1 or None, got {self.short_side}")

    def to_dict(self) -> dict[str, object]:
        """Plain types, for the checkpoint (and JSON)."""
        out = asdict(self)
        out["templates"] = list(self.templates)
        return out

    @classmethod
    def from_settings(cls, settings: Any, sam: str) -> InferenceSpec:
        """From a benchmark's effective evaluate settings (components.config.EvaluateSettings, e.g.
        ``params.evaluate.for_benchmark(name)``) and the SAM spec of the profile."""
        return cls(sam=sam, templates=tuple(settings.templates), short_side=settings.short_side,
                   window=settings.window, stride=settings.stride, amg=AmgSettings.of(settings.amg))

    @classmethod
    def from_dict(cls, raw: Mapping[str, object]) -> InferenceSpec:
        """The inverse of :meth:`to_dict`; an unknown or missing key is an error naming the valid ones."""
        names = [f.name for f in fields(cls)]
        unknown, missing = sorted(set(raw) - set(names)), sorted(set(names) - set(raw))
        if unknown or missing:
            raise ValueError(f"inference spec keys must be {names}; unknown {unknown}, missing {missing}")
        amg = raw["amg"]
        missing = [k for k in ("min_area_frac", "max_area_frac") if k not in amg]  # type: ignore[operator]
        if missing:
            raise ValueError(f"inference spec: amg needs the size filter, missing {missing}")
        return cls(**{**raw, "templates": tuple(raw["templates"]), "amg": AmgSettings(**amg)})  # type: ignore[arg-type]


class LoadedAligner(NamedTuple):
    """An aligner rebuilt from its checkpoint, in ``eval()`` mode, with what it needs at inference."""

    model: Aligner
    prototypes: torch.Tensor  # [K, D] float32, L2-normalised
    class_names: list[str]
    encoder_spec: str  # DINOv2 registry name
    image_size: int  # encoder input side in pixels
    text_spec: str  # CLIP registry name
    templates: list[str]  # of the training prototypes
    inference: InferenceSpec  # SAM, inference templates, window protocol
    run_id: str | None  # MLflow run of the training
    params: dict[str, Any]  # flattened params that made it
    specs: dict[str, dict[str, Any]]  # role ("student", "text", "mask") -> spec_record
    format: int  # the file's checkpoint format


def spec_record(name: str) -> dict[str, Any]:
    """The registry spec ``name`` as plain types (:data:`_RECORD_FIELDS`); an unknown name raises
    KeyError listing the known ones."""
    from components.models.registry import get_spec

    spec = get_spec(name)
    record = {f: getattr(spec, f) for f in _RECORD_FIELDS}
    return {**record, "mean": list(spec.mean), "std": list(spec.std)}


# the model roles a checkpoint records and runs with (the concept teacher only labels: Stage 1)
RECORDED_ROLES: tuple[str, ...] = ("student", "text", "mask")


def _checked_specs(path: Path, recorded: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The checkpoint's spec records, each checked against this version's registry: a spec this
    version does not know, or knows as another model, is an error saying which."""
    from components.models.registry import ROLES, list_specs

    out = {}
    for role in RECORDED_ROLES:
        family = ROLES[role]
        record = dict(recorded[role])
        name = record.get("name")
        if name not in list_specs(family):
            raise ValueError(f"{path} was trained with {role} spec {name!r}, which this version of fmbseg does not know "
                             f"(known {role} specs: {', '.join(list_specs(family))}); install the version that wrote it")
        now = spec_record(name)
        changed = sorted(k for k in _RECORD_FIELDS if k in record and record[k] != now[k])
        if changed:
            raise ValueError(f"{path}: the {role} spec {name!r} it records differs from this version's in {changed} "
                             f"(recorded {[record[k] for k in changed]}, now {[now[k] for k in changed]})")
        out[role] = now
    return out


def refuse_other_student(loaded: LoadedAligner, student: str, *, source: str = "the checkpoint") -> None:
    """An aligner only reads the features of the student it was trained on: a ValueError naming
    both when ``student`` is another."""
    if student != loaded.encoder_spec:
        raise ValueError(f"{source} was trained on the student {loaded.encoder_spec!r}, not {student!r}: its aligner "
                         f"reads only {loaded.encoder_spec!r} features (select that student, or train one for "
                         f"{student!r})")


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: Aligner,
    encoder_spec: str,
    image_size: int,
    text_spec: str,
    templates: Sequence[str],
    class_names: Sequence[str],
    prototypes: torch.Tensor,
    inference: InferenceSpec,
    params: Mapping[str, Any],
    mlflow_run_id: str | None,
) -> Path:
    """Write the checkpoint atomically; return its path.

    templates: those of the training prototypes; inference: what the segmenter runs with.

    prototypes: [K, D] float text prototypes, K = len(class_names), D = the aligner's out_dim.
    params: flat {dotted key: str | int | float | bool | None | list}.
    """
    if prototypes.ndim != 2 or prototypes.shape != (len(class_names), model.out_dim):
        raise ValueError(
            f"prototypes must be [K={len(class_names)}, D={model.out_dim}]; got {tuple(prototypes.shape)}"
        )
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "aligner_config": dict(model.aligner_config()),
        "encoder": {"dino": encoder_spec, "image_size": int(image_size)},
        "text": {"clip": text_spec, "templates": list(templates)},
        "inference": inference.to_dict(),
        "specs": {"student": spec_record(encoder_spec), "text": spec_record(text_spec),
                  "mask": spec_record(inference.sam)},
        "class_names": list(class_names),
        "prototypes": prototypes.detach().float().cpu().clone(),
        "params": dict(params),
        "mlflow_run_id": mlflow_run_id,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def load_aligner(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> LoadedAligner:
    """Rebuild the aligner of a checkpoint written by :func:`save_checkpoint` (weights_only load).

    Raises FileNotFoundError for a missing path, and ValueError "<path> is not an fmbseg
    checkpoint: <why>" (one line) for anything else: a folder, a text file, a pickle that
    ``weights_only`` refuses, another program's checkpoint, a damaged one.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no aligner checkpoint at {path}: run `fmbseg train` (or `dvc repro train`)")
    try:  # arbitrary bytes make the unpickler raise nearly anything (IndexError, struct.error, ...)
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises weights_only=False: never, for a file of unknown origin
        raise ValueError(f"{path} is not an fmbseg checkpoint: not a file of tensors and plain types (the safe "
                         "loader refused it; fmbseg never runs code from a checkpoint)") from None
    except Exception as err:
        raise ValueError(f"{path} is not an fmbseg checkpoint: {_first_line(err)}") from None
    try:
        return _rebuild(path, state, map_location)
    except (KeyError, TypeError, AttributeError, RuntimeError, ValueError) as err:
        if str(err).startswith(f"{path} "):  # already said by _rebuild
            raise
        raise ValueError(f"{path} is not an fmbseg checkpoint: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (torch's messages run to dozens of lines)."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _rebuild(path: Path, state: Any, map_location: str | torch.device) -> LoadedAligner:
    """The aligner of a loaded checkpoint ``state`` (the steps of :func:`load_aligner`)."""
    if isinstance(state, dict) and state.get("format") == 1:
        raise ValueError(
            f"{path} is a format-1 checkpoint (no SAM spec and window protocol, which predict needs): "
            "rewrite it with `fmbseg train` (or `dvc repro train`)"
        )
    missing = [k for k in _KEYS if k not in state] if isinstance(state, dict) else list(_KEYS)
    if missing:
        raise ValueError(f"{path} is not an fmbseg checkpoint: missing {missing}")
    if state["format"] not in READABLE_FORMATS:
        raise ValueError(f"{path} has checkpoint format {state['format']}; this code reads {list(READABLE_FORMATS)}")
    names = {"student": state["encoder"]["dino"], "text": state["text"]["clip"], "mask": state["inference"]["sam"]}
    if state["format"] >= 3:
        if not isinstance(state.get("specs"), dict) or set(state["specs"]) != set(names):
            raise ValueError(f"{path} is a format-{state['format']} checkpoint without its specs of {list(names)}")
        if {r: state["specs"].get(r, {}).get("name") for r in names} != names:
            raise ValueError(f"{path}: its specs {state['specs']} disagree with its encoder/text/inference names {names}")
        specs = _checked_specs(path, state["specs"])
    else:  # format 2, before the model roles: the registry's specs of the names it records
        specs = _checked_specs(path, {role: {"name": name} for role, name in names.items()})
    config = state["aligner_config"]
    model = Aligner(config["in_dim"], config["out_dim"], kind=config["kind"], num_heads=config["num_heads"])
    model.load_state_dict(state["model"])
    model.to(map_location).eval()
    return LoadedAligner(
        model=model,
        prototypes=state["prototypes"],
        class_names=list(state["class_names"]),
        encoder_spec=state["encoder"]["dino"],
        image_size=int(state["encoder"]["image_size"]),
        text_spec=state["text"]["clip"],
        templates=list(state["text"]["templates"]),
        inference=InferenceSpec.from_dict(state["inference"]),
        run_id=state["mlflow_run_id"],
        params=dict(state["params"]),
        specs=specs,
        format=int(state["format"]),
    )
