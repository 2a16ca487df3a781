"""params.yaml -> frozen, validated settings: the settings API (import from here).

params.yaml is the single source of settings (one section per stage, as DVC's
example-get-started lays it out). This package turns it into frozen pydantic models: an unknown or
misspelled key is an error that lists the valid keys of its section, and a wrong type names the
key and the type it expects. Components never receive the whole config; flows pick the fields a
component needs and pass them as arguments.

By concern: ``schemas`` (the sections), ``paths`` (where stages read and write), ``protocols``
(the evaluation settings and their layering per benchmark), ``errors`` (messages), ``params``
(all of params.yaml: load, override, validate, flatten); ``base``: what they share.
"""

from __future__ import annotations

from components.config.base import deep_merge
from components.config.errors import ConfigError
from components.config.params import (
    Params,
    apply_overrides,
    flatten,
    load_params,
    parse_params,
)
from components.config.paths import (
    SUB_PATHS,
    PathsConfig,
    derived_paths,
    without_derived_paths,
)
from components.config.protocols import (
    PROTOCOLS_DIR,
    TEMPLATE_SETS,
    EvaluateConfig,
    EvaluateSettings,
    ProtocolFile,
    load_protocol,
    shipped_protocols,
    template_set,
)
from components.config.schemas import (
    AlignerConfig,
    AmgConfig,
    BalanceConfig,
    ConceptsConfig,
    DatasetOverride,
    DownloadConfig,
    FeaturesConfig,
    LabelConfig,
    ModelProfile,
    ModelsConfig,
    NightlyConfig,
    OrchestrationConfig,
    ServeConfig,
    TrackingConfig,
    TrainConfig,
    check_vocabulary,
)

__all__ = [
    "ConfigError",
    "deep_merge",
    "SUB_PATHS",
    "PathsConfig",
    "derived_paths",
    "without_derived_paths",
    "AlignerConfig",
    "AmgConfig",
    "BalanceConfig",
    "ConceptsConfig",
    "DatasetOverride",
    "DownloadConfig",
    "FeaturesConfig",
    "LabelConfig",
    "ModelProfile",
    "ModelsConfig",
    "NightlyConfig",
    "OrchestrationConfig",
    "ServeConfig",
    "TrackingConfig",
    "TrainConfig",
    "check_vocabulary",
    "PROTOCOLS_DIR",
    "TEMPLATE_SETS",
    "EvaluateConfig",
    "EvaluateSettings",
    "ProtocolFile",
    "load_protocol",
    "shipped_protocols",
    "template_set",
    "Params",
    "apply_overrides",
    "flatten",
    "load_params",
    "parse_params",
]
