"""`pretrain data verify DIR`: every shard against the manifest (sha256, bytes, sample and
token counts, keys, token ids below the vocab size) and, optionally, the tokenizer file."""
from __future__ import annotations

from pathlib import Path

import shard_format
from data_pipeline.errors import PipelineError
from data_pipeline.shards import iter_samples, sample_key
from shard_format import Manifest, ManifestError, ShardRecord, sha256_file


def load_manifest(out_dir: Path) -> Manifest:
    """The validated manifest; a problem with it is a one-line PipelineError naming file and key."""
    try:
        return shard_format.load_manifest(out_dir)
    except ManifestError as e:
        raise PipelineError(str(e)) from None


def verify_shard(out_dir: Path, entry: ShardRecord, vocab_size: int) -> list[str]:
    path = out_dir / entry["path"]
    if not path.is_file():
        return [f"{entry['path']}: missing"]
    problems = []
    if path.stat().st_size != entry["bytes"]:
        problems.append(f"{entry['path']}: {path.stat().st_size} bytes, manifest says {entry['bytes']}")
    if sha256_file(path) != entry["sha256"]:
        problems.append(f"{entry['path']}: sha256 mismatch")
    shard_no = int(Path(entry["path"]).stem.split("-")[-1])
    samples = tokens = 0
    try:
        for key, ids, meta in iter_samples(path):
            if key != sample_key(entry["source"], shard_no, samples):
                problems.append(f"{entry['path']}: sample {samples} has key {key!r}")
            if ids.ndim != 1 or ids.size != meta.get("tokens") or (ids.size and int(ids.max()) >= vocab_size):
                problems.append(f"{entry['path']}: sample {key} has bad tokens")
            samples, tokens = samples + 1, tokens + ids.size
    except Exception as e:  # any decode failure is a verification failure, named by shard
        return problems + [f"{entry['path']}: unreadable: {e}"]
    if (samples, tokens) != (entry["samples"], entry["tokens"]):
        problems.append(f"{entry['path']}: {samples} samples/{tokens} tokens, manifest says "
                        f"{entry['samples']}/{entry['tokens']}")
    return problems


def verify(out_dir: Path, tokenizer_path: Path | None = None) -> tuple[Manifest, list[str]]:
    """The manifest and a list of problems (empty when everything matches)."""
    manifest = load_manifest(out_dir)
    problems = []
    if tokenizer_path is not None and sha256_file(tokenizer_path) != manifest["tokenizer"]["vocab_sha256"]:
        problems.append(f"tokenizer: {tokenizer_path} does not match the manifest's vocab_sha256")
    for entry in manifest["shards"]:
        if entry["source"] not in manifest["sources"]:
            problems.append(f"{entry['path']}: source {entry['source']!r} not in manifest sources")
        problems.extend(verify_shard(out_dir, entry, manifest["tokenizer"]["vocab_size"]))
    return manifest, problems
