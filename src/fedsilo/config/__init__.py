"""Typed, validated run configuration (TOML)."""

from fedsilo.config.load import (
    ConfigError,
    config_digest,
    config_to_toml,
    load_config,
    parse_config,
    save_config,
)
from fedsilo.config.schema import (
    DEFAULT_TARGET_MODULES,
    ClustersSection,
    DeploymentSection,
    EvaluationSection,
    FederationSection,
    FedsiloConfig,
    LoraSection,
    ModelSection,
    PrivacySection,
    RunSection,
    SecureAggregationSection,
    StrategySection,
    TaskSection,
    TrainSection,
)

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "ClustersSection",
    "ConfigError",
    "DeploymentSection",
    "EvaluationSection",
    "FederationSection",
    "FedsiloConfig",
    "LoraSection",
    "ModelSection",
    "PrivacySection",
    "RunSection",
    "SecureAggregationSection",
    "StrategySection",
    "TaskSection",
    "TrainSection",
    "config_digest",
    "config_to_toml",
    "load_config",
    "parse_config",
    "save_config",
]
