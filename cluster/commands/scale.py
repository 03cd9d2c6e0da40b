"""`pretrain scale CONFIG --target cpu|single-gpu [--out FILE]`: a run config of the same family
(attention pattern, MoE frequency, routing, losses) at a size that trains on the target in minutes."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("scale", help="scale a config down to a CPU or a single GPU", description=__doc__)
    p.add_argument("config", help="a model YAML or a train YAML")
    p.add_argument("--target", choices=["cpu", "single-gpu"], required=True)
    p.add_argument("--out", help="write the train YAML here (default: print it)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the input config before scaling (repeatable)")
    p.set_defaults(func=run_scale)


def run_scale(args: argparse.Namespace) -> int:
    from cluster.scale import scale_config, to_yaml

    text = to_yaml(scale_config(args.config, args.target, args.overrides), args.config, args.target)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(f"wrote {out}")
    else:
        print(text, end="")
    return 0
