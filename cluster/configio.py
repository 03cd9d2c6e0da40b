"""Load YAML configs into the typed schemas, apply `--set a.b=c` overrides, and turn every
validation failure into one line that names the file and the key."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from trainer.config import ModelConfig, RunConfig

T = TypeVar("T", bound=BaseModel)
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(Exception):
    """A config the user wrote is invalid; the message names the file and the key."""


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


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=3e-4` -> (['train', 'lr'], 0.0003). Values are parsed as YAML scalars/lists."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=3e-4")
    try:
        parsed = yaml.safe_load(value) if value else ""
    except yaml.YAMLError:
        parsed = value
    return key.split("."), parsed


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {k!r} is not a section")
            node = child
        node[keys[-1]] = value
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


def _resolve_model(data: dict[str, Any], source: Path) -> None:
    """A run config's `model:` may be a path to a model YAML (relative to the run YAML, the
    current dir, configs/ or configs/model/, `.yaml` optional); it is inlined so the resolved
    config is self-contained."""
    ref = data.get("model")
    if not isinstance(ref, str):
        return
    names = [ref] if ref.endswith((".yaml", ".yml")) else [ref, f"{ref}.yaml"]
    bases = (source.parent, Path("."), CONFIGS_DIR, CONFIGS_DIR / "model")
    for candidate in (base / name for base in bases for name in names):
        if candidate.is_file():
            data["model"] = read_yaml(candidate)
            return
    raise ConfigError(f"{source}: model: model config {ref!r} not found (looked beside the file, in the "
                      f"current directory and in {CONFIGS_DIR})")


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    data = read_yaml(path)
    _resolve_model(data, path)
    apply_overrides(data, list(overrides))
    return validate(RunConfig, data, str(path))


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    """A model YAML, or a run YAML (its model section)."""
    path = Path(path)
    data = read_yaml(path)
    if "model" in data or "train" in data:
        _resolve_model(data, path)
        data = apply_overrides(data, list(overrides))
        model = data.get("model")
        if not isinstance(model, dict):
            raise ConfigError(f"{path}: model: expected a model section or a path to a model YAML")
        return validate(ModelConfig, model, f"{path} (model section)")
    apply_overrides(data, list(overrides))
    return validate(ModelConfig, data, str(path))


def load_config(path: str | Path, schema: type[T], overrides: list[str] = ()) -> T:
    """Any other schema (the data pipeline's, the cluster's)."""
    data = apply_overrides(read_yaml(path), list(overrides))
    return validate(schema, data, str(path))


def dump_yaml(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
