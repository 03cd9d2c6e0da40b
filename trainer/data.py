"""Streaming training data from webdataset shards (DESIGN.md shard format).

One stream per source, mixed document by document with a seeded RNG by the manifest's (or the
config's) weights, packed into `seq_len + 1` token windows with end-of-text between documents.
Every (data-parallel rank, loader worker) pair is a *slot* that reads a disjoint part of each
source, and the whole position (per-source cursor, mixing RNG, offset into the current document)
is a small dict that checkpoints save, so a resumed run continues with the very next token.
"""
from __future__ import annotations

import io
import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from webdataset.tariterators import group_by_keys, tar_file_iterator

import shard_format
from shard_format import MANIFEST_NAME, ManifestError, ShardRecord, TokenizerRecord, sha256_file
from trainer.errors import TrainError

log = logging.getLogger(__name__)
KEY_RE = re.compile(r"^[A-Za-z0-9_.]+-\d{6}-\d{6}$")


@dataclass
class TrainingData:
    """A data run's manifest as training reads it: the mixture weights in use and the shards of each
    weighted source."""
    root: Path
    tokenizer: TokenizerRecord
    weights: dict[str, float]
    shards: dict[str, list[ShardRecord]] = field(default_factory=dict)  # source -> shard records, manifest order

    @property
    def eot_id(self) -> int:
        return int(self.tokenizer["eot_id"])


def load_manifest(data_dir: str | Path, model_vocab: int, weights: Optional[dict[str, float]] = None) -> TrainingData:
    """Read DIR/manifest.json (checked by shard_format) and refuse data the model cannot consume
    (tokenizer bigger than its vocab, weights for sources it does not have)."""
    root = Path(data_dir)
    path = root / MANIFEST_NAME
    try:
        m = shard_format.load_manifest(root)
    except ManifestError as e:
        raise TrainError(f"data.path: {e}") from None
    tok, sources, records = m["tokenizer"], m["sources"], m["shards"]
    if tok["vocab_size"] > model_vocab or tok["eot_id"] >= model_vocab:
        raise TrainError(f"{path}: tokenizer {tok.get('name')!r} has vocab {tok['vocab_size']} (eot {tok['eot_id']}) "
                         f"but model.vocab_size is {model_vocab}: the shards do not match the model")
    mix = weights or {name: float(s.get("weight", 1.0)) for name, s in sources.items()}
    unknown = sorted(set(mix) - set(sources))
    if unknown:
        raise TrainError(f"data.weights: sources {unknown} are not in {path} (it has {sorted(sources)})")
    mix = {k: v for k, v in mix.items() if v > 0}
    if not mix:
        raise TrainError(f"data.weights: no source with a positive weight in {path}")
    by_source: dict[str, list[ShardRecord]] = {name: [] for name in mix}
    for rec in records:
        if rec["source"] in by_source:
            by_source[rec["source"]].append(rec)
    empty = [name for name, recs in by_source.items() if not recs]
    if empty:
        raise TrainError(f"{path}: sources {empty} have weight but no shards")
    return TrainingData(root, tok, mix, by_source)


def is_heldout(key: str, percent: float) -> bool:
    """Stable across processes and Python versions (unlike hash()), so train and eval never overlap."""
    return zlib.crc32(key.encode()) % 10_000 < percent * 100


def check_shard(manifest: TrainingData, rec: dict, on_corrupt: str) -> bool:
    """webdataset stops quietly at a damaged tar member, so a corrupt shard would just look short:
    compare the whole file to the manifest's sha256 before reading it. False means 'skip it'."""
    path = manifest.root / rec["path"]
    if not path.is_file():
        problem = "file is missing"
    elif sha256_file(path) != rec["sha256"]:
        problem = "sha256 does not match the manifest (corrupt or truncated)"
    else:
        return True
    if on_corrupt == "skip":
        log.warning("skipping shard %s: %s", path, problem)
        return False
    raise TrainError(f"shard {path}: {problem}; rerun `pretrain data verify {manifest.root}` "
                     f"or set data.on_corrupt=skip to train without it")


def read_documents(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(key, tokens) per sample, in shard order. Loading never executes data: no pickle."""
    with open(path, "rb") as f:
        members = (dict(m, __url__=str(path)) for m in tar_file_iterator(f))
        for sample in group_by_keys(members):
            key = sample["__key__"]
            if not KEY_RE.match(key) or "tokens.npy" not in sample:
                raise TrainError(f"shard {path}: unexpected member {key!r} (not a tokenized document)")
            tokens = np.load(io.BytesIO(sample["tokens.npy"]), allow_pickle=False)
            if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32):
                raise TrainError(f"shard {path}: {key} tokens are {tokens.dtype}{list(tokens.shape)}, not 1-D uint")
            yield key, tokens


class SourceStream:
    """Documents of one source for one slot, forever (epoch after epoch, shard order reshuffled by
    (seed, epoch)). With at least as many shards as slots each slot owns whole shards; otherwise every
    slot reads every shard and keeps every n-th document, which is still disjoint."""

    def __init__(self, manifest: TrainingData, source: str, slot: int, n_slots: int, seed: int,
                 heldout_percent: float, on_corrupt: str, heldout: bool = False):
        self.manifest, self.source, self.slot, self.n_slots = manifest, source, slot, n_slots
        self.seed, self.heldout_percent, self.on_corrupt, self.heldout = seed, heldout_percent, on_corrupt, heldout
        self.records = manifest.shards[source]
        self.by_shard = len(self.records) >= n_slots
        self.pos = {"epoch": 0, "shard": 0, "doc": 0}  # next document: shard index in this epoch's order, ordinal
        self._verified: dict[str, bool] = {}
        self._docs: Optional[Iterator[tuple[int, np.ndarray]]] = None

    def _order(self, epoch: int) -> list[dict]:
        rng = np.random.default_rng([self.seed, zlib.crc32(self.source.encode()), epoch])
        order = [self.records[i] for i in rng.permutation(len(self.records))]
        return order[self.slot::self.n_slots] if self.by_shard else order

    def _usable(self, rec: dict) -> bool:
        if rec["path"] not in self._verified:
            self._verified[rec["path"]] = check_shard(self.manifest, rec, self.on_corrupt)
        return self._verified[rec["path"]]

    def _wanted(self, key: str, ordinal: int) -> bool:
        if is_heldout(key, self.heldout_percent) != self.heldout:
            return False
        return self.by_shard or ordinal % self.n_slots == self.slot

    def _iterate(self) -> Iterator[tuple[int, np.ndarray]]:
        """Yields (ordinal of the next document, tokens), starting exactly at self.pos."""
        empty_epochs = 0
        while empty_epochs < 2:
            order, found = self._order(self.pos["epoch"]), False
            for s in range(self.pos["shard"], len(order)):
                if not self._usable(order[s]):
                    continue
                start = self.pos["doc"] if s == self.pos["shard"] else 0
                for ordinal, (key, tokens) in enumerate(read_documents(self.manifest.root / order[s]["path"])):
                    if ordinal >= start and self._wanted(key, ordinal):
                        found = True
                        yield (s, ordinal + 1), tokens
            self.pos = {"epoch": self.pos["epoch"] + 1, "shard": 0, "doc": 0}
            empty_epochs = 0 if found else empty_epochs + 1
            if self.heldout:
                return
        raise TrainError(f"source {self.source!r}: slot {self.slot}/{self.n_slots} found no usable documents "
                         f"(all shards skipped, or too few documents to split over {self.n_slots} slots)")

    def next_doc(self) -> Optional[np.ndarray]:
        if self._docs is None:
            self._docs = self._iterate()
        item = next(self._docs, None)
        if item is None:
            return None
        (shard, nxt), tokens = item
        self.pos = {"epoch": self.pos["epoch"], "shard": shard, "doc": nxt}
        return tokens

    def load_state(self, pos: dict) -> None:
        self.pos, self._docs = dict(pos), None


class PackedStream:
    """Mixes the sources of one slot and cuts `seq_len + 1`-token windows out of the concatenation
    doc, EOT, doc, EOT, ... A window may straddle documents, as in GPT-3's training."""

    def __init__(self, manifest: TrainingData, seq_len: int, slot: int, n_slots: int, seed: int,
                 heldout_percent: float = 0.0, on_corrupt: str = "error", heldout: bool = False):
        self.manifest, self.window = manifest, seq_len + 1
        self.names = sorted(manifest.weights)
        w = np.array([manifest.weights[n] for n in self.names], dtype=np.float64)
        self.probs = w / w.sum()
        self.streams = {n: SourceStream(manifest, n, slot, n_slots, seed, heldout_percent, on_corrupt, heldout)
                        for n in self.names}
        self.rng = np.random.default_rng([seed, slot, n_slots])
        self.slot = slot
        self.doc: Optional[np.ndarray] = None
        self.offset = 0
        self._doc_start: Optional[dict] = None  # position before the current document was drawn

    def _snapshot(self) -> dict:
        return {"rng": self.rng.bit_generator.state, "sources": {n: dict(s.pos) for n, s in self.streams.items()}}

    def _next_doc(self) -> bool:
        self._doc_start = self._snapshot()
        while self.names:
            name = self.names[self.rng.choice(len(self.names), p=self.probs)] if len(self.names) > 1 else self.names[0]
            tokens = self.streams[name].next_doc()
            if tokens is not None:
                self.doc = np.append(tokens.astype(np.int64), self.manifest.eot_id)
                self.offset = 0
                return True
            # Only a held-out pass ends (training streams cycle): mix the sources that still have documents.
            keep = [i for i, n in enumerate(self.names) if n != name and self.probs[i] > 0]
            self.names, self.probs = [self.names[i] for i in keep], self.probs[keep] / self.probs[keep].sum()
        return False

    def next_window(self) -> Optional[np.ndarray]:
        parts, need = [], self.window
        while need:
            if self.doc is None or self.offset == len(self.doc):
                if not self._next_doc():
                    return None
            take = self.doc[self.offset:self.offset + need]
            parts.append(take)
            self.offset += len(take)
            need -= len(take)
        return np.concatenate(parts)

    def state(self) -> dict:
        """Enough to continue with the next token: where the current document started, and how far into it."""
        start = self._doc_start if self.doc is not None else self._snapshot()
        return {"slot": self.slot, "doc_start": start, "offset": self.offset if self.doc is not None else 0,
                "has_doc": self.doc is not None}

    def load_state(self, state: dict) -> None:
        start = state["doc_start"]
        for name, pos in start["sources"].items():
            self.streams[name].load_state(pos)
        self.rng.bit_generator.state = start["rng"]
        self.doc = None
        if state["has_doc"]:
            if not self._next_doc():
                raise TrainError("data position in the checkpoint points past the end of the data")
            self.offset = state["offset"]


def micro_batches(stream: PackedStream, batch_size: int) -> Iterator[tuple[torch.Tensor, dict]]:
    """(tokens[batch, seq_len + 1], position after this batch), forever."""
    while True:
        rows = [stream.next_window() for _ in range(batch_size)]
        if any(r is None for r in rows):
            return
        yield torch.from_numpy(np.stack(rows)), stream.state()


class _WorkerDataset(torch.utils.data.IterableDataset):
    """Loader worker w of W continues slot states[w]; the trainer rotates the states on resume so
    DataLoader's fixed round-robin (worker 0 first) hands out batches in the original order."""

    def __init__(self, make_stream, states: list[Optional[dict]], slots: list[int], batch_size: int):
        self.make_stream, self.states, self.slots, self.batch_size = make_stream, states, slots, batch_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w = info.id if info else 0
        stream = self.make_stream(self.slots[w])
        if self.states[w] is not None:
            stream.load_state(self.states[w])
        yield from micro_batches(stream, self.batch_size)


class TrainLoader:
    """Micro-batches for one data-parallel rank; `state()` is the position of every worker's slot."""

    def __init__(self, manifest: TrainingData, seq_len: int, batch_size: int, rank: int, world: int, seed: int,
                 heldout_percent: float, on_corrupt: str, num_workers: int, state: Optional[dict] = None):
        self.num_workers = max(num_workers, 1)
        n_slots = world * self.num_workers
        slots = [rank * self.num_workers + w for w in range(self.num_workers)]
        states: dict[int, Optional[dict]] = dict.fromkeys(slots)
        turn = 0
        if state is not None:
            if sorted(int(s) for s in state["slots"]) != slots:
                raise TrainError(f"checkpoint data state is for slots {sorted(state['slots'])}, this rank has {slots}: "
                                 "resume with the same number of processes and data.num_workers")
            states.update({int(k): v for k, v in state["slots"].items()})
            turn = state["turn"]
        # Rotate so that the worker whose turn it is next starts first.
        order = [slots[(turn + i) % self.num_workers] for i in range(self.num_workers)]
        self.order, self.turn, self.states = order, turn, states

        def make_stream(slot: int) -> PackedStream:
            return PackedStream(manifest, seq_len, slot, n_slots, seed, heldout_percent, on_corrupt)

        dataset = _WorkerDataset(make_stream, [states[s] for s in order], order, batch_size)
        # Its own generator: DataLoader draws a seed when iterated, which would shift the training RNG on resume.
        self._it = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                                    persistent_workers=num_workers > 0,
                                                    generator=torch.Generator().manual_seed(seed)))

    def next(self) -> torch.Tensor:
        try:
            batch, position = next(self._it)
        except StopIteration:
            raise TrainError("the training data ran out (every source is empty)") from None
        self.states[position["slot"]] = position
        self.turn = (self.turn + 1) % self.num_workers
        return batch

    def state(self) -> dict:
        return {"slots": {str(k): v for k, v in self.states.items()}, "turn": self.turn}


def heldout_batches(manifest: TrainingData, seq_len: int, batch_size: int, heldout_percent: float,
                    max_batches: int) -> list[torch.Tensor]:
    """The held-out documents (by key hash), packed the same way, one pass, for eval."""
    stream = PackedStream(manifest, seq_len, 0, 1, seed=0, heldout_percent=heldout_percent, heldout=True)
    out = []
    for batch, _ in micro_batches(stream, batch_size):
        out.append(batch)
        if len(out) >= max_batches:
            break
    return out
