"""`DIR/manifest.json`: the index of a data run's shards, written last by the pipeline and read by
the trainer and `pretrain data verify`.

    {"format_version": 1,
     "tokenizer": {"name": "gpt2", "vocab_size": 50257, "eot_id": 50256, "vocab_sha256": "...",
                   "vocab_file": "/abs/path/r50k_base.tiktoken"},
     "sources": {"<name>": {"weight": 0.6}, ...},
     "shards": [{"path": "books/shard-000000.tar", "source": "books", "samples": 17,
                 "tokens": 123456, "bytes": 250000, "sha256": "..."}, ...]}

The types are TypedDicts: a manifest stays the plain JSON data it is on disk (readers index it,
tests compare it), and pydantic checks it against these types when it is loaded."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, TypeAdapter, ValidationError
from typing_extensions import NotRequired, TypedDict

from shard_format.files import atomic_write

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
Count = Annotated[int, Field(ge=0)]


class ManifestError(ValueError):
    """A missing or malformed manifest; the message names the file and the key."""


class TokenizerRecord(TypedDict):
    name: str
    vocab_size: Annotated[int, Field(gt=0)]
    eot_id: Count
    vocab_sha256: str  # what identifies the tokenizer
    vocab_file: NotRequired[str]  # absolute path of the ranks file, so readers can decode offline


class SourceRecord(TypedDict):
    weight: NotRequired[Annotated[float, Field(ge=0)]]  # the source's share of training tokens


class ShardRecord(TypedDict):
    path: str  # relative to the manifest's directory
    source: str
    samples: Count
    tokens: Count
    bytes: Count
    sha256: str


class Manifest(TypedDict):
    format_version: int
    tokenizer: TokenizerRecord
    sources: dict[str, SourceRecord]
    shards: list[ShardRecord]


_MANIFEST = TypeAdapter(Manifest)


def make_manifest(tokenizer: TokenizerRecord, weights: dict[str, float], shards: list[ShardRecord]) -> Manifest:
    return {"format_version": FORMAT_VERSION, "tokenizer": tokenizer,
            "sources": {name: {"weight": w} for name, w in weights.items()}, "shards": shards}


def _describe(error: ValidationError) -> str:
    """One line: `key.path: problem` for the first few problems."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg']}" for e in error.errors()[:3])


def validate_manifest(data: object, origin: str) -> Manifest:
    """`data` checked against the types above; `origin` (the file) starts every error message."""
    if not isinstance(data, dict):
        raise ManifestError(f"{origin}: not a JSON object")
    # The version first: another version's layout would only produce confusing key errors.
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{origin}: format_version {data.get('format_version')!r}, "
                            f"this reader expects {FORMAT_VERSION}")
    try:
        return _MANIFEST.validate_python(data)
    except ValidationError as e:
        raise ManifestError(f"{origin}: {_describe(e)}") from None


def load_manifest(directory: str | Path) -> Manifest:
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest (is {directory} a finished `pretrain data run` output?)")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ManifestError(f"{path}: not valid JSON: {e}") from None
    return validate_manifest(data, str(path))


def write_manifest(directory: str | Path, manifest: Manifest) -> None:
    """Atomically, so a reader never sees a half-written index (the pipeline writes it last)."""
    atomic_write(Path(directory) / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")


def epochs_per_source(manifest: Manifest, weights: dict[str, float], tokens: float,
                      heldout_percent: float = 0.0) -> dict[str, dict[str, float]]:
    """GPT-3 Table 2.2's last column: how many times each source is seen when `tokens` training tokens
    are drawn with these weights (each a share of tokens). Per source: weight (normalised), its tokens
    in the data (less the held-out share), tokens drawn, epochs."""
    total_weight = sum(w for w in weights.values() if w > 0)
    available = {name: 0 for name in weights}
    for shard in manifest["shards"]:
        if shard["source"] in available:
            available[shard["source"]] += shard["tokens"]
    out = {}
    for name, weight in weights.items():
        share = weight / total_weight if weight > 0 else 0.0
        have = available[name] * (1 - heldout_percent / 100)
        drawn = tokens * share
        out[name] = {"weight": share, "tokens": have, "drawn": drawn, "epochs": drawn / have if have else float("inf")}
    return out
