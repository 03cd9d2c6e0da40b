"""The one way a config file becomes a typed schema: read the YAML, validate it, and turn every
failure into one line naming the file and the key. The CLI adds `--set` overrides and `model:`
paths on top (cluster/configio.py); the trainer reads the config its launcher saved."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from trainer.config import RunConfig
from trainer.errors import ConfigError

T = TypeVar("T", bound=BaseModel)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        # Cross-field validators already start their message with the dotted key they blame.
        names_key = re.match(r"^[\w.]+: ", msg) is not None
        lines.append(f"{source}: {msg}" if names_key or not e["loc"] else f"{source}: {key}: {msg}")
    return "\n".join(lines)


def validate(schema: type[T], data: dict[str, Any], source: str) -> T:
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(source, e)) from None


def dump_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def read_run_config(path: Path) -> RunConfig:
    """A config a launcher saved: RUN/config.yaml, or a checkpoint's copy of it."""
    if not path.is_file():
        raise ConfigError(f"{path}: not found (start runs with `pretrain train CONFIG`)")
    return validate(RunConfig, read_yaml(path), str(path))
