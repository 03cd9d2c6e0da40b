"""The CLI's side of loading configs: `--set a.b=c` overrides and `model:` paths, on top of the
trainer's reader and validator (trainer/configio.py), so every failure is one line naming the
file and the key."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, TypeVar

import yaml
from pydantic import BaseModel

from cluster.config import JobConfig
from trainer.config import ModelConfig
from trainer.configio import read_yaml, validate
from trainer.errors import ConfigError

T = TypeVar("T", bound=BaseModel)
CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


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


def is_train_yaml(data: dict[str, Any]) -> bool:
    """A train YAML (a run: model, data, train...) rather than a model YAML or a data-pipeline YAML."""
    return "model" in data or "train" in data


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


def load_run_config(path: str | Path, overrides: list[str] = ()) -> JobConfig:
    """A train YAML with its `model:` inlined and the overrides applied, validated whole."""
    path = Path(path)
    data = read_yaml(path)
    _resolve_model(data, path)
    apply_overrides(data, list(overrides))
    return validate(JobConfig, data, str(path))


def load_model_or_run(path: str | Path, overrides: list[str] = ()) -> tuple[ModelConfig, Optional[JobConfig]]:
    """(model, None) for a model YAML; (its model, the whole validated run) for a train YAML."""
    path = Path(path)
    if is_train_yaml(read_yaml(path)):
        run = load_run_config(path, overrides)
        return run.model, run
    return load_config(path, ModelConfig, overrides), None


def load_model_config(path: str | Path, overrides: list[str] = ()) -> ModelConfig:
    """A model YAML, or a train YAML's model (the whole train YAML is validated)."""
    return load_model_or_run(path, overrides)[0]


def load_config(path: str | Path, schema: type[T], overrides: list[str] = ()) -> T:
    """Any other schema (the data pipeline's, the cluster's, a model's)."""
    data = apply_overrides(read_yaml(path), list(overrides))
    return validate(schema, data, str(path))
