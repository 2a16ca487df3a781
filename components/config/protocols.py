"""``evaluate``: the evaluation settings, the published protocols that fix them
(configs/protocols/), and their layering per benchmark (:meth:`EvaluateConfig.for_benchmark`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

from components.config.base import Section, deep_merge
from components.config.schemas import AmgConfig

# ------------------------------------------------------------------------------------- evaluate
PROTOCOLS_DIR = Path(__file__).resolve().parents[2] / "configs" / "protocols"
TEMPLATE_SETS: tuple[str, ...] = ("imagenet80",)


def template_set(name: str) -> tuple[str, ...]:
    """A named set of prompt templates: ``imagenet80`` = OpenAI's 80 ImageNet templates (CLIP's
    zero-shot notebook; the set SCLIP, ClearCLIP, ProxyCLIP and Trident prompt with), as open_clip
    ships them, written with ``{}`` for the class name."""
    if name not in TEMPLATE_SETS:
        raise ValueError(f"unknown template set {name!r}; template sets: {', '.join(TEMPLATE_SETS)} (or a list)")
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)


def shipped_protocols() -> list[str]:
    """Names of the evaluation protocols shipped in configs/protocols/ (``evaluate.protocol``)."""
    return sorted(p.stem for p in PROTOCOLS_DIR.glob("*.yaml"))


class EvaluateSettings(Section):
    """The settings of one benchmark's evaluation: ``evaluate`` itself, or evaluate merged with
    the protocol's and then ``evaluate.overrides.<benchmark>`` (:meth:`EvaluateConfig.for_benchmark`).
    ``templates``: a list, or the name of a template set (:func:`template_set`)."""

    split: str = "val"
    short_side: int | None = Field(448, ge=1)
    window: int = Field(448, ge=1)  # pixels; windows are zero-padded to the student's patch grid
    stride: int = Field(224, ge=1)
    templates: tuple[str, ...] = ("a photo of a {}.",)
    bg_threshold: float | None = None
    logit_scale: float | None = Field(None, gt=0.0)  # set: bg_threshold compares softmax(scale * cosine) probabilities
    synonyms: Literal["mean", "max"] = "mean"  # a class line's synonyms: one mean prototype | one prompt each, max
    bg_prompts: bool = True  # add the benchmark's extra background prompts (PV-21: the COCO-Stuff stuff classes)
    refine: bool = True
    amg: AmgConfig = AmgConfig(pred_iou_thresh=0.88, min_area_frac=0.0, max_area_frac=1.0)
    batch_size: int = Field(8, ge=1)
    limit: int | None = Field(None, ge=1)
    overlays: int = Field(4, ge=0)

    @field_validator("templates", mode="before")
    @classmethod
    def _named_template_set(cls, value: Any) -> Any:
        return template_set(value) if isinstance(value, str) else value


def _known_benchmarks(value: dict[str, EvaluateSettings]) -> dict[str, EvaluateSettings]:
    """Per-benchmark overrides name labelled benchmarks of the registry only."""
    from components.datasets.registry import BENCHMARKS

    labelled = [name for name, spec in BENCHMARKS.items() if spec.labelled]
    unknown = sorted(set(value) - set(labelled))
    if unknown:
        raise ValueError(f"unknown benchmark {unknown[0]!r}; benchmarks: {', '.join(labelled)}")
    return value


class ProtocolFile(EvaluateSettings):
    """A configs/protocols/<name>.yaml file: the evaluate settings one published protocol fixes
    (only the keys it writes), per-benchmark ``overrides``, and where the values come from."""

    description: str
    source: str
    overrides: dict[str, EvaluateSettings] = Field(default_factory=dict)

    @field_validator("overrides")
    @classmethod
    def _overrides_known(cls, value: dict[str, EvaluateSettings]) -> dict[str, EvaluateSettings]:
        return _known_benchmarks(value)


def _settings_set(settings: EvaluateSettings) -> dict[str, Any]:
    """The keys given for `settings` (not the defaults filled in), as plain JSON types."""
    return settings.model_dump(mode="json", exclude_unset=True, include=set(EvaluateSettings.model_fields))


def load_protocol(spec: str) -> ProtocolFile:
    """``evaluate.protocol``: a shipped protocol's name (configs/protocols/<name>.yaml) or a path."""
    path = PROTOCOLS_DIR / f"{spec}.yaml" if spec in shipped_protocols() else Path(spec)
    if not path.is_file():
        raise ValueError(f"unknown protocol {spec!r}; shipped protocols: {', '.join(shipped_protocols())} (or a path)")
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    try:
        return ProtocolFile.model_validate(raw)
    except ValidationError as err:
        raise ValueError(f"protocol file {path} is not valid: {err}") from None


class EvaluateConfig(EvaluateSettings):
    """``evaluate``: the benchmarks, their shared settings, and ``overrides``: benchmark -> the
    settings it changes (``{cityscapes: {short_side: 560}, pv21: {bg_threshold: 0.3}}``; only the
    keys given there change, ``amg`` key by key)."""

    benchmarks: tuple[str, ...] = ("pv21", "pv20", "pc59", "co80", "cs171", "cityscapes", "ade20k")
    stage1_benchmarks: tuple[str, ...] = ("pv21",)  # Stage 1 pseudo labels scored on these (Table 2; evaluate-stage1)
    protocol: str | None = None
    overrides: dict[str, EvaluateSettings] = Field(default_factory=dict)

    @field_validator("stage1_benchmarks")
    @classmethod
    def _stage1_labelled(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        _known_benchmarks(dict.fromkeys(names))
        return names

    @field_validator("overrides")
    @classmethod
    def _overrides_known(cls, value: dict[str, EvaluateSettings]) -> dict[str, EvaluateSettings]:
        return _known_benchmarks(value)

    @field_serializer("overrides")
    def _only_what_is_set(self, value: dict[str, EvaluateSettings]) -> dict[str, Any]:
        # what the user wrote, not every default of the override (flatten -> MLflow params)
        return {name: s.model_dump(mode="json", exclude_unset=True) for name, s in value.items()}

    @model_validator(mode="after")
    def _protocol_is_not_contradicted(self) -> EvaluateConfig:
        # A protocol wins over evaluate's shared keys (params.yaml spells out every default), so a
        # key changed from its default that the protocol sets otherwise would be silently lost.
        if self.protocol is None:
            return self
        fixed = _settings_set(load_protocol(self.protocol))
        ours = self.model_dump(mode="json", include=set(fixed))
        defaults = EvaluateSettings().model_dump(mode="json", include=set(fixed))
        for key, value in fixed.items():
            if ours[key] != defaults[key] and ours[key] != value:
                raise ValueError(f"evaluate.{key} is {ours[key]!r} but protocol {self.protocol!r} sets {value!r}: "
                                 "change it per benchmark in evaluate.overrides, or set evaluate.protocol: null")
        return self

    @model_validator(mode="after")
    def _windows_cover_every_pixel(self) -> EvaluateConfig:
        # each benchmark's effective settings: a layer (override, protocol) may set one of the two
        names = [None, *self.benchmarks, *self.overrides]
        if self.protocol is not None:
            names += list(load_protocol(self.protocol).overrides)
        for name in dict.fromkeys(names):
            settings = self.for_benchmark(name)
            if settings.stride > settings.window:
                where = "" if name is None else f" for {name} (its protocol and overrides applied)"
                raise ValueError(f"evaluate.stride {settings.stride} > evaluate.window {settings.window}{where} leaves "
                                 "pixels that no sliding window covers; set stride <= window")
        return self

    @model_validator(mode="after")
    def _bg_threshold_needs_background(self) -> EvaluateConfig:
        from components.datasets.registry import BENCHMARKS

        protocol = load_protocol(self.protocol).overrides if self.protocol is not None else {}
        names = [n for n in dict.fromkeys([*self.benchmarks, *protocol, *self.overrides]) if n in BENCHMARKS]
        without = [n for n in names if self.for_benchmark(n).bg_threshold is not None
                   and BENCHMARKS[n].background != "class0"]
        if without:
            raise ValueError(f"bg_threshold is set for {', '.join(without)}: no background class to assign "
                             "there; set it per benchmark (evaluate.overrides: {pv21: {bg_threshold: ...}})")
        unused = [n for n in names if self.for_benchmark(n).logit_scale is not None
                  and self.for_benchmark(n).bg_threshold is None]
        if unused:
            raise ValueError(f"logit_scale is set for {', '.join(unused)} without a bg_threshold: it only scales "
                             "the probabilities that threshold compares")
        return self

    def for_benchmark(self, name: str | None) -> EvaluateSettings:
        """The effective settings of benchmark `name`, each layer over the last: evaluate's shared
        keys, the protocol's (``evaluate.protocol``), the protocol's for `name`, then
        ``evaluate.overrides.<name>``. None: no benchmark's (what a checkpoint records)."""
        merged = self.model_dump(mode="json", include=set(EvaluateSettings.model_fields))
        layers = []
        if self.protocol is not None:
            protocol = load_protocol(self.protocol)
            layers.append(protocol)
            layers.append(protocol.overrides.get(name) if name is not None else None)
        layers.append(self.overrides.get(name) if name is not None else None)
        for layer in layers:
            if layer is not None:
                merged = deep_merge(merged, _settings_set(layer))
        return EvaluateSettings.model_validate(merged)
