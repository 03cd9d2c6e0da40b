"""`pretrain`: one entry point; each command group lives in `cluster/commands/` and registers
itself here. Heavy libraries are imported inside the handlers so `--help` is fast."""
from __future__ import annotations

import argparse
import sys

from cluster.commands import data, model, plan, report, scale, submit, train
from cluster.errors import USER_ERRORS

# Each module defines `register(subparsers)`; handlers are set with `parser.set_defaults(func=...)`.
COMMANDS = (model, data, train, submit, plan, scale, report)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain", description="Pretrain GPT-3-family and Switch-Transformer models: data pipeline, "
        "DeepSpeed training, cluster submission, planning and dashboards. `pretrain COMMAND --help` for each.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
