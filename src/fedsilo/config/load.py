"""Reading and writing run configurations as TOML, with errors that name file and field."""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import ValidationError

from fedsilo.config.schema import DeploymentSection, FedsiloConfig
from fedsilo.storage import read_regular_file, write_text_atomic

# A run's config is a few kilobytes; a site list of thousands stays far below this.
MAX_CONFIG_BYTES = 1024**2


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and the field."""


def _field_path(location: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in location:
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts) or "(top level)"


def parse_config(data: Mapping[str, Any], *, source: str) -> FedsiloConfig:
    """Validate a config mapping; ``source`` (a file name) is named in every error."""
    try:
        return FedsiloConfig.model_validate(dict(data))
    except ValidationError as error:
        problems = [
            f"  {_field_path(tuple(item['loc']))}: {item['msg']}" for item in error.errors()
        ]
        raise ConfigError(f"{source}: invalid configuration\n" + "\n".join(problems)) from None


def load_config(path: Path) -> FedsiloConfig:
    """Load and validate a TOML config file. Relative data paths are resolved from its folder."""
    path = Path(path)
    try:
        # Bounded and never blocking: an auditor reads the config.toml of a run folder that
        # someone else wrote (a FIFO or a link to /dev/zero in its place).
        raw = tomllib.loads(read_regular_file(path, limit=MAX_CONFIG_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text: {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: TOML nested too deeply") from None
    except (OSError, ValueError) as error:  # not a regular file, over the limit, unreadable
        raise ConfigError(f"cannot read the config file: {error}") from None
    config = parse_config(raw, source=str(path))
    return _resolve_paths(config, base=path.parent.resolve())


def _resolve_paths(config: FedsiloConfig, *, base: Path) -> FedsiloConfig:
    task = config.task
    sites = tuple(site.model_copy(update={"path": base / site.path}) for site in task.sites)
    gold = base / task.gold_path if task.gold_path is not None else None
    federation = config.federation
    federation = federation.model_copy(
        update={
            "keys_dir": base / federation.keys_dir if federation.keys_dir else None,
            "coordinator_key": (
                base / federation.coordinator_key if federation.coordinator_key else None
            ),
        }
    )
    model_base = config.model.base
    candidate = base / model_base
    if ("/" in model_base or model_base.startswith(".")) and not Path(model_base).is_absolute():
        model_base = str(candidate)
    return config.model_copy(
        update={
            "task": task.model_copy(update={"sites": sites, "gold_path": gold}),
            "model": config.model.model_copy(update={"base": model_base}),
            "federation": federation,
            "run": config.run.model_copy(
                update={
                    "site_policies": (
                        base / config.run.site_policies if config.run.site_policies else None
                    )
                }
            ),
            "deployment": _resolve_deployment(config, base=base),
        }
    )


def _resolve_deployment(config: FedsiloConfig, *, base: Path) -> DeploymentSection | None:
    deployment = config.deployment
    if deployment is None:
        return None
    return deployment.model_copy(
        update={
            name: base / getattr(deployment, name) for name in ("certs_dir", "state_dir", "run_dir")
        }
    )


def config_to_toml(config: FedsiloConfig) -> str:
    """The fully resolved config as TOML (every default written out, None omitted)."""
    data = config.model_dump(mode="json", exclude_none=True)
    return tomli_w.dumps(data)


def config_digest(config: FedsiloConfig) -> str:
    """sha256 of the resolved TOML: identifies exactly which settings a run used."""
    return "sha256:" + hashlib.sha256(config_to_toml(config).encode("utf-8")).hexdigest()


def save_config(config: FedsiloConfig, path: Path) -> None:
    """Write the resolved config atomically."""
    write_text_atomic(path, config_to_toml(config))
