"""`pretrain`: one entry point; each command group lives in `cluster/commands/` and
registers itself here. Heavy libraries are imported inside the handlers so `--help` is fast."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module defines `register(subparsers)`; handlers are set with `parser.set_defaults(func=...)`.
COMMAND_MODULES = ["model", "data", "train", "submit", "plan", "scale", "report"]


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the user asked for something wrong': printed as one line."""
    from cluster.configio import ConfigError

    errors: list[type[BaseException]] = [ConfigError, FileNotFoundError, PermissionError]
    for mod, name in (("trainer.errors", "TrainError"), ("data_pipeline.errors", "PipelineError"),
                      ("cluster.errors", "ClusterError")):
        try:
            errors.append(getattr(importlib.import_module(mod), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain", description="Pretrain GPT-3-family and Switch-Transformer models: data pipeline, "
        "DeepSpeed training, cluster submission, planning and dashboards. `pretrain COMMAND --help` for each.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"cluster.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"cluster.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
