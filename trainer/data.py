"""Streaming training data from webdataset shards (DESIGN.md shard format).

Each source is one token stream (doc, EOT, doc, EOT, ...); windows of the objective's length
(`seq_len + 1` for the causal LM, T5's raw length for span corruption, `seq_len - 3` for BERT, which also
reads ahead into the next document for NSP's random B) are cut from the sources so
that each source's share of tokens is its mixture weight; the windows form one global order that
every layout of ranks, loader workers and micro-batches splits the same way, and the objective turns
window i of that order into example i. The whole position (per-source cursors and mixing credit) is
a small dict that checkpoints save, so a resumed run continues with the very next token.
"""
from __future__ import annotations

import io
import itertools
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
from shard_format import MANIFEST_NAME, Manifest, ManifestError, ShardRecord, TokenizerRecord, sha256_file
from trainer.config import TrainConfig
from trainer.errors import TrainError
from trainer.masked_lm import MaskedLM
from trainer.span_corruption import SpanCorruption
from trainer.special_tokens import PAD

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
    manifest: Optional[Manifest] = None  # as read

    def epochs(self, tokens: float, heldout_percent: float) -> dict[str, dict[str, float]]:
        """Per source: weight, tokens available, tokens drawn and epochs when training on `tokens` tokens."""
        return shard_format.epochs_per_source(self.manifest, self.weights, tokens, heldout_percent)

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
    return TrainingData(root, tok, mix, by_source, m)


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
    """One source's documents as one token stream, doc, EOT, doc, EOT, ..., epoch after epoch (the
    shard order reshuffled by (seed, epoch)); held-out documents are left out (or, with heldout=True,
    they alone are read, once). `pos` says where the next token comes from: epoch, shard (index in
    that epoch's order), doc (ordinal in the shard) and offset (tokens of that document already taken)."""

    def __init__(self, data: TrainingData, source: str, seed: int, heldout_percent: float, on_corrupt: str,
                 heldout: bool = False):
        self.data, self.source, self.seed = data, source, seed
        self.heldout_percent, self.on_corrupt, self.heldout = heldout_percent, on_corrupt, heldout
        self.records = data.shards[source]
        self.pos = {"epoch": 0, "shard": 0, "doc": 0, "offset": 0}
        self._verified: dict[str, bool] = {}
        self._docs: Optional[Iterator[tuple[int, int, np.ndarray]]] = None
        self._doc: Optional[np.ndarray] = None
        self._ahead: Optional[tuple[int, int, int, np.ndarray]] = None  # the next document, once read ahead

    def _order(self, epoch: int) -> list[ShardRecord]:
        rng = np.random.default_rng([self.seed, zlib.crc32(self.source.encode()), epoch])
        return [self.records[i] for i in rng.permutation(len(self.records))]

    def _usable(self, rec: ShardRecord) -> bool:
        if rec["path"] not in self._verified:
            self._verified[rec["path"]] = check_shard(self.data, rec, self.on_corrupt)
        return self._verified[rec["path"]]

    def _documents(self) -> Iterator[tuple[int, int, np.ndarray]]:
        """(epoch, shard, ordinal, tokens + EOT) from self.pos on; a held-out pass ends after one epoch."""
        epoch, first_shard, first_doc = self.pos["epoch"], self.pos["shard"], self.pos["doc"]
        empty_epochs = 0
        while empty_epochs < 2:
            found = False
            for s, rec in enumerate(self._order(epoch)):
                if s < first_shard or not self._usable(rec):
                    continue
                for ordinal, (key, tokens) in enumerate(read_documents(self.data.root / rec["path"])):
                    if (s > first_shard or ordinal >= first_doc) and is_heldout(key, self.heldout_percent) == self.heldout:
                        found = True
                        yield epoch, s, ordinal, np.append(tokens.astype(np.int64), self.data.eot_id)
            if self.heldout:
                return
            epoch, first_shard, first_doc = epoch + 1, 0, 0
            empty_epochs = 0 if found else empty_epochs + 1
        raise TrainError(f"source {self.source!r} has no usable documents (all shards skipped, or all held out)")

    def _next_document(self) -> Optional[tuple[int, int, int, np.ndarray]]:
        if self._docs is None:
            self._docs = self._documents()
        item, self._ahead = self._ahead, None
        return item if item is not None else next(self._docs, None)

    def take(self, n: int) -> Optional[np.ndarray]:
        """The next n tokens; None when a held-out pass has fewer left."""
        parts = []
        while n:
            if self._doc is None:
                item = self._next_document()
                if item is None:
                    return None
                epoch, shard, ordinal, self._doc = item
                offset = self.pos["offset"] if (epoch, shard, ordinal) == tuple(
                    self.pos[k] for k in ("epoch", "shard", "doc")) else 0
                self.pos = {"epoch": epoch, "shard": shard, "doc": ordinal, "offset": offset}
            piece = self._doc[self.pos["offset"]:self.pos["offset"] + n]
            parts.append(piece)
            n -= len(piece)
            self.pos["offset"] += len(piece)
            if self.pos["offset"] == len(self._doc):
                self._doc = None
                self.pos = {**self.pos, "doc": self.pos["doc"] + 1, "offset": 0}
        return np.concatenate(parts)

    def read_ahead(self, n: int) -> Optional[np.ndarray]:
        """n tokens of the text of the document after the one being read, from as far into it as that one
        has been read (wrapping around), EOT-padded; nothing is taken. None when a held-out pass has no
        further document."""
        if self._ahead is None:
            self._ahead = self._next_document()
            if self._ahead is None:
                return None
        text = self._ahead[3][:-1]
        start = self.pos["offset"] % len(text) if len(text) else 0
        piece = text[start:start + n]
        return np.concatenate([piece, np.full(n - len(piece), self.data.eot_id, dtype=piece.dtype)])

    def load_state(self, pos: dict) -> None:
        self.pos, self._docs, self._doc, self._ahead = dict(pos), None, None, None


def pick_source(credit: dict[str, float], weights: dict[str, float]) -> str:
    """Smooth weighted round robin over the sources in `credit`: each earns its share of their weights,
    and the richest pays a window, so every share is exact to within one window at any point."""
    total = sum(weights[n] for n in credit)
    for n in credit:
        credit[n] += weights[n] / total
    pick = max(credit, key=credit.__getitem__)
    credit[pick] -= 1.0
    return pick


class CausalLM:
    """Next-token prediction: a window of seq_len + 1 tokens is its own example, inputs the first seq_len
    tokens, targets the last seq_len. `SpanCorruption` is the other objective, with the same interface."""

    def __init__(self, seq_len: int):
        self.window, self.tokens_per_sequence = seq_len + 1, seq_len

    def example(self, tokens: np.ndarray, index: int) -> np.ndarray:
        return tokens

    def split(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the model call."""
        return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def predicted(self, targets: torch.Tensor) -> int:
        return targets.numel()


Objective = CausalLM | SpanCorruption | MaskedLM


def next_window(stream: SourceStream, objective: Objective) -> Optional[np.ndarray]:
    """The objective's next window of `stream`: `window` tokens taken, then for NSP `read_ahead` tokens
    of the next document (not taken); None when a held-out pass has run out."""
    window = stream.take(objective.window)
    ahead = getattr(objective, "read_ahead", 0)  # only BERT's objective reads ahead
    if window is None or not ahead:
        return window
    other = stream.read_ahead(ahead)
    return None if other is None else np.concatenate([window, other])


def objective_for(t: TrainConfig, data: TrainingData) -> Objective:
    """train.objective as the loader, the training loop and eval apply it to `data`."""
    if t.objective == "causal_lm":
        return CausalLM(t.seq_len)
    if data.tokenizer["vocab_size"] > PAD:  # its ids would be taken for PAD and the special tokens
        raise TrainError(f"data.path: tokenizer {data.tokenizer.get('name')!r} has {data.tokenizer['vocab_size']} ids; "
                         f"{t.objective.replace('_', ' ')} appends its special ids after GPT-2's {PAD} "
                         "(trainer.special_tokens)")
    if t.objective == "mlm_nsp":
        return MaskedLM(t.seq_len, t.seed)
    s = t.span_corruption
    return SpanCorruption(t.seq_len, s.noise_density, s.mean_noise_span_length, t.seed)


class MixedStream:
    """Windows of the objective's length, each cut from one source's stream (so a window may straddle that
    source's documents, as in GPT-3's training), the source of each window chosen by `pick_source` so
    that its share of windows, hence of training tokens, follows its weight (GPT-3 Table 2.2), with no
    randomness to drift."""

    def __init__(self, data: TrainingData, objective: Objective, seed: int, heldout_percent: float = 0.0,
                 on_corrupt: str = "error"):
        self.objective = objective
        self.names = sorted(data.weights)
        self.weights = data.weights
        self.streams = {n: SourceStream(data, n, seed, heldout_percent, on_corrupt) for n in self.names}
        self.credit = dict.fromkeys(self.names, 0.0)
        self.windows = dict.fromkeys(self.names, 0)  # drawn from each source so far

    def next_window(self) -> np.ndarray:
        pick = pick_source(self.credit, self.weights)
        self.windows[pick] += 1
        return next_window(self.streams[pick], self.objective)

    def drawn(self) -> int:
        """Windows drawn so far, all sources together: the global index of the next example."""
        return sum(self.windows.values())

    def state(self) -> dict:
        return {"credit": dict(self.credit), "windows": dict(self.windows),
                "sources": {n: dict(s.pos) for n, s in self.streams.items()}}

    def load_state(self, state: dict) -> None:
        if sorted(state["sources"]) != self.names:
            raise TrainError(f"the data position in the checkpoint is for sources {sorted(state['sources'])}, "
                             f"this run mixes {self.names}: resume with the same data.weights")
        self.credit, self.windows = dict(state["credit"]), dict(state["windows"])
        for n, pos in state["sources"].items():
            self.streams[n].load_state(pos)


def heldout_examples(data: TrainingData, objective: Objective, heldout_percent: float) -> Iterator[np.ndarray]:
    """The held-out documents (by key hash) of every source, packed the same way, mixed by the same
    weights and made into examples the same way (span corruption: the run's seed and the example's
    index in this pass), one pass: a source that runs out leaves the mix and the others go on to their ends."""
    streams = {n: SourceStream(data, n, seed=0, heldout_percent=heldout_percent, on_corrupt="error", heldout=True)
               for n in sorted(data.weights)}
    credit = dict.fromkeys(streams, 0.0)
    index = 0
    while credit:
        pick = pick_source(credit, data.weights)
        window = next_window(streams[pick], objective)
        if window is None:
            del credit[pick]
            continue
        yield objective.example(window, index)
        index += 1


def heldout_batches(data: TrainingData, objective: Objective, batch_size: int, heldout_percent: float,
                    max_batches: int) -> list[torch.Tensor]:
    examples = heldout_examples(data, objective, heldout_percent)
    out = []
    while len(out) < max_batches and len(rows := [e for _, e in zip(range(batch_size), examples)]) == batch_size:
        out.append(torch.from_numpy(np.stack(rows)))
    return out


class _RankShare(torch.utils.data.IterableDataset):
    """Global micro-batch m (batch_size consecutive windows of the one stream) belongs to rank m % world;
    loader worker w of W takes the rank's micro-batches j with j % W == w, and makes examples of its
    windows only. Each yields (micro-batch, the stream's state at the end of that round of `world`
    micro-batches)."""

    def __init__(self, make_stream, objective: Objective, state: Optional[dict], rank: int, world: int,
                 batch_size: int, workers: int):
        self.make_stream, self.objective, self.state, self.rank, self.world = make_stream, objective, state, rank, world
        self.batch_size, self.workers = batch_size, workers

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info else 0
        stream = self.make_stream()
        if self.state is not None:
            stream.load_state(self.state)
        for j in itertools.count():
            first = stream.drawn() + self.rank * self.batch_size  # global index of this rank's first example
            rounds = [[stream.next_window() for _ in range(self.batch_size)] for _ in range(self.world)]
            if j % self.workers == worker:
                rows = [self.objective.example(w, first + i) for i, w in enumerate(rounds[self.rank])]
                yield torch.from_numpy(np.stack(rows)), stream.state()


class TrainLoader:
    """One rank's micro-batches of the global sequence order: every step's global batch holds the same
    sequences whatever the number of ranks or the micro-batch/accumulation split. Every rank (and loader
    worker) reads the whole stream and keeps its share: reading is cheap next to a training step.
    `state()` is the stream's position after the last round of micro-batches, the same on every rank."""

    def __init__(self, data: TrainingData, objective: Objective, batch_size: int, rank: int, world: int, seed: int,
                 heldout_percent: float, on_corrupt: str, num_workers: int, state: Optional[dict] = None):
        def make_stream() -> MixedStream:
            return MixedStream(data, objective, seed, heldout_percent, on_corrupt)

        self._state = state if state is not None else make_stream().state()
        self.objective = objective
        dataset = _RankShare(make_stream, objective, state, rank, world, batch_size, max(num_workers, 1))
        # Its own generator: DataLoader draws a seed when iterated, which would shift the training RNG on resume.
        self._it = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                                    persistent_workers=num_workers > 0,
                                                    generator=torch.Generator().manual_seed(seed)))

    def next(self) -> torch.Tensor:
        batch, self._state = next(self._it)
        return batch

    def state(self) -> dict:
        return self._state

    def tokens_by_source(self) -> dict[str, int]:
        """Training tokens drawn from each source so far, all ranks together (`tokens_per_sequence` per window)."""
        return {name: n * self.objective.tokens_per_sequence for name, n in self._state["windows"].items()}
