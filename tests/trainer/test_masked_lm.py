"""BERT's objective (masked LM + next-sentence prediction) in the data path: the special ids, the row
layout, IsNext pairs from one document and NotNext pairs from two (shards whose tokens name their
document and position), masking rates over 10,000 sequences of the real loader over real shards, the
read-ahead taking nothing, determinism, the config's checks and eval's held-out loss. Layout invariance
and exact resume are the loader tests in test_data.py, run for every objective."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.trainer.conftest import write_shards
from trainer.config import RunConfig, TrainConfig
from trainer.configio import validate
from trainer.data import CausalLM, MixedStream, TrainLoader, heldout_batches, load_manifest, objective_for
from trainer.errors import ConfigError, TrainError
from trainer.eval import heldout_loss
from trainer.masked_lm import MaskedLM, first_text, longest_text
from trainer.special_tokens import BERT_VOCAB_SIZE, CLS, EOT, MASK, NAMES, PAD, SEP

SPAN = 1200  # numbered documents: token = document * SPAN + position


def unpack(row: np.ndarray, seq_len: int) -> SimpleNamespace:
    """The row's parts, A and B as the original ids (labels restore the masked ones), after checking the
    layout: [CLS] A [SEP] B [SEP] PAD..., types 0 then 1 for B and its [SEP] then 0."""
    ids, types, labels, nsp = row[:seq_len], row[seq_len:2 * seq_len], row[2 * seq_len:3 * seq_len], int(row[-1])
    seps = np.flatnonzero(ids == SEP)
    assert ids[0] == CLS and len(seps) == 2 and (ids[seps[1] + 1:] == PAD).all() and nsp in (0, 1)
    expected_types = np.zeros(seq_len, dtype=np.int64)
    expected_types[seps[0] + 1:seps[1] + 1] = 1
    assert np.array_equal(types, expected_types)
    text = np.zeros(seq_len, dtype=bool)
    text[1:seps[0]] = text[seps[0] + 1:seps[1]] = True
    assert (labels[~text] == -1).all()  # only A's and B's positions are ever predicted
    original = np.where(labels >= 0, labels, ids)
    return SimpleNamespace(ids=ids, labels=labels, nsp=nsp, text=text, a=original[1:seps[0]],
                           b=original[seps[0] + 1:seps[1]])


def test_special_ids_follow_the_sentinels():
    assert (CLS, SEP, MASK, BERT_VOCAB_SIZE) == (50358, 50359, 50360, 50361)
    assert NAMES[CLS] == "[CLS]" and NAMES[SEP] == "[SEP]" and NAMES[MASK] == "[MASK]" and NAMES[PAD] == "<pad>"
    assert TrainConfig(objective="mlm_nsp", seq_len=128).tokens_per_sequence == 125


def test_rows_pair_a_with_its_continuation_or_the_next_document():
    """Random windows with documents of every length: A is the start of the taken part's longest document
    text; IsNext's B the rest of it, NotNext's B the read-ahead document's text, cut to fit."""
    objective = MaskedLM(32, seed=3)
    rng = np.random.default_rng(0)
    for index in range(400):
        window = rng.integers(0, 100, size=2 * objective.window)
        window[rng.random(len(window)) < rng.choice([0.0, 0.05, 0.3])] = EOT
        p = unpack(objective.example(window, index), 32)
        text = longest_text(window[:objective.window])
        assert len(p.a) >= 1 and np.array_equal(p.a, text[:len(p.a)])
        if p.nsp == 0:
            assert np.array_equal(np.concatenate([p.a, p.b]), text)
        else:
            assert np.array_equal(p.b, first_text(window[objective.window:])[:objective.window - len(p.a)])
    assert len(p.ids) == 32


@pytest.fixture(scope="module")
def numbered_docs(tmp_path_factory):
    """Two sources of documents from 5 to 1,199 tokens, each token its document * SPAN + its position."""
    out = tmp_path_factory.mktemp("numbered")
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(5, 60, 20), rng.integers(60, 1199, 20)])
    rng.shuffle(lengths)
    docs = [list(range(k * SPAN, k * SPAN + n)) for k, n in enumerate(lengths)]
    sources = {"a": docs[:20], "b": docs[20:]}
    manifest = write_shards(out, sources, {"a": 2, "b": 3}, weights={"a": 0.5, "b": 0.5})
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def one_document(tokens: np.ndarray) -> bool:
    """Consecutive positions of one document."""
    return len(tokens) > 0 and (tokens // SPAN == tokens[0] // SPAN).all() and (np.diff(tokens) == 1).all()


def test_isnext_pairs_come_from_one_document_and_notnext_from_two(numbered_docs):
    """Through the real loader: every IsNext B continues A where A stops in its document; every NotNext
    B is a stretch of another document; exactly half of them are each."""
    data = load_manifest(numbered_docs, BERT_VOCAB_SIZE)
    loader = TrainLoader(data, MaskedLM(64, seed=1), 50, 0, 1, 1, 0.0, "error", 0)
    labels = []
    for _ in range(40):
        for row in loader.next().numpy():
            p = unpack(row, 64)
            assert one_document(p.a) and one_document(p.b)
            if p.nsp == 0:
                assert one_document(np.concatenate([p.a, p.b]))
            else:
                assert p.a[0] // SPAN != p.b[0] // SPAN
            labels.append(p.nsp)
    assert len(labels) == 2000 and sum(labels) == 1000


def test_reading_ahead_takes_nothing(numbered_docs):
    """The taken parts of BERT's windows are the causal LM's windows of the same length, token for token."""
    data = load_manifest(numbered_docs, BERT_VOCAB_SIZE)
    bert, plain = MixedStream(data, MaskedLM(64, seed=1), seed=2), MixedStream(data, CausalLM(60), seed=2)
    for _ in range(500):
        window = bert.next_window()
        assert len(window) == 2 * 61 and np.array_equal(window[:61], plain.next_window())
    assert bert.state() == plain.state()


@pytest.mark.slow
def test_masking_rates_over_ten_thousand_sequences_of_the_loader(shard_dir):
    """The real loader over real shards, BERT's 512 positions: 15% of A's and B's positions predicted; of
    those 80% [MASK], 10% a random id, 10% unchanged (each within 1%); NSP exactly half and half."""
    data = load_manifest(shard_dir, BERT_VOCAB_SIZE)
    objective = MaskedLM(512, seed=7)
    loader = TrainLoader(data, objective, 100, 0, 1, 7, 2.0, "error", 0)
    stream = MixedStream(data, objective, 7, heldout_percent=2.0)
    text = predicted = masked = randomised = kept = not_next = 0
    for _ in range(100):
        for row in loader.next().numpy():
            p = unpack(row, 512)
            assert np.array_equal(p.a, longest_text(stream.next_window()[:objective.window])[:len(p.a)])
            chosen = p.labels >= 0
            text, predicted = text + p.text.sum(), predicted + chosen.sum()
            masked += (p.ids[chosen] == MASK).sum()
            kept += (p.ids[chosen] == p.labels[chosen]).sum()
            randomised += ((p.ids[chosen] != MASK) & (p.ids[chosen] != p.labels[chosen])).sum()
            not_next += p.nsp
    rates = dict(predicted=predicted / text, masked=masked / predicted, randomised=randomised / predicted,
                 kept=kept / predicted)
    for name, want in dict(predicted=0.15, masked=0.8, randomised=0.1, kept=0.1).items():
        assert abs(rates[name] / want - 1) < 0.01, rates
    assert not_next == 5000
    assert sum(loader.tokens_by_source().values()) == 10_000 * 509  # raw tokens taken from the shards


def test_same_seed_same_bytes_and_another_seed_other_examples(shard_dir):
    data = load_manifest(shard_dir, BERT_VOCAB_SIZE)

    def batches(seed):
        loader = TrainLoader(data, MaskedLM(64, seed=seed), 8, 0, 1, 1, 2.0, "error", 0)
        return [loader.next().numpy().tobytes() for _ in range(5)]

    first, again, other = batches(1), batches(1), batches(2)
    assert first == again
    assert all(a != b for a, b in zip(first, other))


BERT_RUN = {"model": {"arch": "encoder", "n_layer": 1, "n_head": 1, "d_model": 8, "n_ctx": 128,
                      "norm_position": "post", "vocab_size": BERT_VOCAB_SIZE},
            "data": {"path": "unused"}, "train": {"objective": "mlm_nsp", "seq_len": 128}}


@pytest.mark.parametrize("section,change,message", [
    ("train", dict(objective="causal_lm"), r"train.objective: causal_lm does not train a model.arch encoder .* an "
                                          r"encoder with mlm_nsp"),
    ("model", dict(vocab_size=50360), r"model.vocab_size: 50360 has no room for BERT's \[CLS\], \[SEP\] and \[MASK\] "
                                      r"\(ids 50358..50360, trainer.special_tokens\): it needs at least 50361"),
    ("train", dict(seq_len=4), r"train.seq_len: 4 has no room for \[CLS\] A \[SEP\] B \[SEP\]"),
    ("model", dict(norm_position="pre"), r"model.norm_position: 'pre' is not supported with model.arch: encoder"),
    ("model", dict(pos_embedding="sinusoidal"), r"model.pos_embedding: 'sinusoidal' is not supported"),
    ("model", dict(activation="relu"), r"model.activation: 'relu' is not supported .* \(BERT: 'gelu-exact' or"),
    ("model", dict(init="t5"), r"model.init: 't5' is not supported with model.arch: encoder"),
    ("model", dict(moe={"num_experts": 2}), r"model.moe: .* is not supported with model.arch: encoder"),
    ("model", dict(arch="decoder", norm_position="pre", activation="gelu-exact"),
     r"model.activation: 'gelu-exact' needs model.arch: encoder"),
    ("model", dict(arch="decoder", norm_position="pre", type_vocab_size=3),
     r"model.type_vocab_size: 3 needs model.arch: encoder"),
])
def test_config_checks_name_the_key(section, change, message):
    run = json.loads(json.dumps(BERT_RUN))
    run[section].update(change)
    with pytest.raises(ConfigError, match="run.yaml: " + message):
        validate(RunConfig, run, "run.yaml")


def test_a_valid_bert_run_and_its_objective(shard_dir):
    cfg = validate(RunConfig, BERT_RUN, "run.yaml")
    data = load_manifest(shard_dir, BERT_VOCAB_SIZE)
    objective = objective_for(cfg.train, data)
    assert isinstance(objective, MaskedLM) and objective.window == objective.read_ahead == 125
    data.tokenizer = {**data.tokenizer, "name": "bigger", "vocab_size": 50300}
    with pytest.raises(TrainError, match="data.path: tokenizer 'bigger' has 50300 ids; mlm nsp appends its special"):
        objective_for(cfg.train, data)


class UniformBERT(torch.nn.Module):
    """BERT's call, model(ids, token_types, attention_mask, next_sentence, targets), predicting every id equally."""

    def forward(self, ids, token_types, attention_mask, next_sentence, targets):
        assert torch.equal(attention_mask, ids != PAD) and next_sentence.shape == (ids.shape[0],)
        logits = torch.zeros(int((targets != -1).sum()), BERT_VOCAB_SIZE)
        return SimpleNamespace(ce_loss=F.cross_entropy(logits, targets[targets != -1]))


def test_heldout_loss_is_the_mlm_loss_of_deterministic_batches(shard_dir):
    data = load_manifest(shard_dir, BERT_VOCAB_SIZE)
    objective = MaskedLM(128, seed=5)
    batches = heldout_batches(data, objective, 2, heldout_percent=10.0, max_batches=3)
    assert len(batches) == 3 and all(b.shape == (2, 3 * 128 + 1) for b in batches)
    assert all(torch.equal(a, b) for a, b in zip(batches, heldout_batches(data, objective, 2, 10.0, 3)))
    result = heldout_loss(UniformBERT(), batches, objective)
    assert result["heldout_tokens"] == sum(int((b[:, 256:384] != -1).sum()) for b in batches)
    assert math.isclose(result["heldout_perplexity"], BERT_VOCAB_SIZE, rel_tol=1e-4)
