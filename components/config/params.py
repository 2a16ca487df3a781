"""All of params.yaml: read, overridden, validated (:func:`load_params`) and flattened."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
)

from components.config.base import Section, deep_merge
from components.config.errors import ConfigError, format_errors
from components.config.paths import PathsConfig
from components.config.protocols import EvaluateConfig
from components.config.schemas import (
    AlignerConfig,
    BalanceConfig,
    DatasetOverride,
    DownloadConfig,
    FeaturesConfig,
    LabelConfig,
    ModelsConfig,
    NightlyConfig,
    OrchestrationConfig,
    ServeConfig,
    TrackingConfig,
    TrainConfig,
)


# ------------------------------------------------------------------------------------------- all
class Params(Section):
    """All of params.yaml."""

    paths: PathsConfig = PathsConfig()
    models: ModelsConfig = ModelsConfig()
    datasets: dict[str, DatasetOverride] = Field(default_factory=dict)
    download: DownloadConfig = DownloadConfig()
    label: LabelConfig = LabelConfig()
    balance: BalanceConfig = BalanceConfig()
    features: FeaturesConfig = FeaturesConfig()
    aligner: AlignerConfig = AlignerConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    tracking: TrackingConfig = TrackingConfig()
    serve: ServeConfig = ServeConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()
    nightly: NightlyConfig = NightlyConfig()




def parse_params(raw: dict[str, Any] | None, source: str = "params.yaml") -> Params:
    """Validate a params dict (as read from YAML) into :class:`Params`, or raise ConfigError."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source, Params)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict[str, Any] | None = None) -> Params:
    """Read and validate params.yaml; ``overrides`` are dotted keys (``{"train.lr": 0.1}``)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} does not exist: run fmbseg from the project root or pass --params")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if overrides:
        raw = apply_overrides(raw or {}, overrides)
    return parse_params(raw, str(path))



def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply dotted-key overrides (``{"label.amg.points_per_side": 8}``) to a raw params dict."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        node = nested
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return deep_merge(raw, nested)


def flatten(params: Params | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested settings to dotted keys (MLflow params): ``{"train.lr": 0.05, ...}``."""
    data = params.model_dump(mode="json") if isinstance(params, BaseModel) else params
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
