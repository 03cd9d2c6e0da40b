import json
import shutil

import numpy as np
import pytest
import torch

from tests.trainer.conftest import write_shards
from trainer.data import (CausalLM, MixedStream, TrainLoader, heldout_batches, is_heldout, load_manifest,
                          read_documents)
from trainer.errors import TrainError
from trainer.masked_lm import MaskedLM
from trainer.span_corruption import SpanCorruption

# Every objective reads the same stream; span corruption's rows (70 raw tokens -> 64 inputs + 14 targets) and
# BERT's (61 raw tokens taken and 61 of the next document read ahead) must be as independent of the layout
# and of a resume as the causal LM's windows.
OBJECTIVES = {"causal_lm": CausalLM(64), "span_corruption": SpanCorruption(64, 0.15, 3.0, seed=1),
              "mlm_nsp": MaskedLM(64, seed=1)}


def manifest(shard_dir, **kw):
    return load_manifest(shard_dir, 50257, **kw)


def loader(shard_dir, rank=0, world=1, workers=0, state=None, batch=2, heldout=2.0, objective=CausalLM(64)):
    return TrainLoader(manifest(shard_dir), objective, batch_size=batch, rank=rank, world=world, seed=1,
                       heldout_percent=heldout, on_corrupt="error", num_workers=workers, state=state)


def test_windows_are_packed_documents_with_eot_between(shard_dir):
    m = manifest(shard_dir, weights={"wiki": 1.0})
    stream = MixedStream(m, CausalLM(64), seed=0)
    windows = [stream.next_window() for _ in range(200)]
    assert all(len(w) == 65 for w in windows)
    # The concatenation is exactly doc, EOT, doc, EOT, ... in the order the stream read them.
    docs = [np.append(t, 50256) for rec in stream.streams["wiki"]._order(0)
            for key, t in read_documents(shard_dir / rec["path"]) if not is_heldout(key, 0.0)]
    flat = np.concatenate(docs)
    assert len(flat) > 200 * 65 and np.array_equal(np.concatenate(windows), flat[:200 * 65])


@pytest.fixture(scope="module")
def uneven_sources(tmp_path_factory):
    """Sources with documents of very different lengths (4,000, 400 and 40 tokens), told apart by token range."""
    out = tmp_path_factory.mktemp("uneven")
    rng = np.random.default_rng(0)
    lengths = {"books": (4000, 20), "web": (40, 2000), "wiki": (400, 200)}
    docs = {name: [list(rng.integers(base, base + 1000, size=n)) for _ in range(count)]
            for base, (name, (n, count)) in zip((1000, 2000, 3000), lengths.items())}
    weights = {"books": 0.16, "web": 0.6, "wiki": 0.24}
    (out / "manifest.json").write_text(json.dumps(write_shards(out, docs, {"books": 2, "web": 3, "wiki": 2}, weights)))
    return out, weights


def test_token_shares_follow_the_weights_through_the_loader(uneven_sources):
    """GPT-3 Table 2.2: a source's weight is its share of training tokens, whatever its document lengths."""
    data_dir, weights = uneven_sources
    it = TrainLoader(load_manifest(data_dir, 50257), CausalLM(32), batch_size=16, rank=0, world=1, seed=5,
                     heldout_percent=0.0, on_corrupt="error", num_workers=0)
    tokens = dict.fromkeys(weights, 0)
    names = {1: "books", 2: "web", 3: "wiki"}
    for _ in range(640):  # 10,240 windows
        for window in it.next().numpy():
            source = {names[int(t) // 1000] for t in window if t != 50256}
            assert len(source) == 1  # a window comes from one source
            tokens[source.pop()] += 32
    total = sum(tokens.values())
    assert total == 10_240 * 32
    for name, weight in weights.items():
        assert abs(tokens[name] / total - weight) < 0.01, (name, tokens[name] / total)
    assert it.tokens_by_source() == tokens


@pytest.mark.parametrize("objective", OBJECTIVES.values(), ids=OBJECTIVES)
@pytest.mark.parametrize("world,micro,accum,workers", [(2, 4, 1, 0), (2, 2, 2, 0), (4, 1, 2, 2), (1, 2, 4, 2)])
def test_global_batches_do_not_depend_on_the_layout(shard_dir, world, micro, accum, workers, objective):
    """One process with micro batch 8 and the same global batch of 8 split over ranks, micro-batches and
    loader workers: every step holds the same sequences."""
    reference = loader(shard_dir, batch=8, objective=objective)
    loaders = [loader(shard_dir, rank=r, world=world, batch=micro, workers=workers, objective=objective)
               for r in range(world)]
    for step in range(6):
        expected = reference.next()
        got = torch.cat([torch.cat([ld.next() for ld in loaders]) for _ in range(accum)])
        assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, expected.tolist()))
        assert all(ld.state() == reference.state() for ld in loaders)  # every rank saves the same position


@pytest.mark.parametrize("objective", OBJECTIVES.values(), ids=OBJECTIVES)
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_next_token(shard_dir, workers, objective):
    straight = loader(shard_dir, workers=workers, objective=objective)
    expected = [straight.next() for _ in range(12)]
    first = loader(shard_dir, workers=workers, objective=objective)
    got = [first.next() for _ in range(5)]
    state = json.loads(json.dumps(first.state()))  # checkpoints store it as JSON
    second = loader(shard_dir, workers=workers, state=state, objective=objective)
    got += [second.next() for _ in range(7)]
    for a, b in zip(expected, got):
        assert np.array_equal(a, b)


def test_heldout_split_is_disjoint_from_training(shard_dir):
    m = manifest(shard_dir)
    held = heldout_batches(m, CausalLM(64), 2, heldout_percent=10.0, max_batches=3)
    assert held and held[0].shape == (2, 65)
    keys = [key for recs in m.shards.values() for r in recs for key, _ in read_documents(shard_dir / r["path"])]
    heldout = [k for k in keys if is_heldout(k, 10.0)]
    assert 0 < len(heldout) < len(keys) * 0.25


def test_heldout_pass_reads_every_source_to_its_end(tmp_path):
    """A source without held-out documents ends early; the pass goes on with the others."""
    docs = {"books": [[i + 1] * 40 for i in range(60)], "wiki": [[7] * 40]}
    (tmp_path / "manifest.json").write_text(json.dumps(write_shards(tmp_path, docs, {"books": 1, "wiki": 1})))
    assert not is_heldout("wiki-000000-000000", 20.0)
    held_docs = sum(is_heldout(f"books-000000-{i:06d}", 20.0) for i in range(60))
    batches = heldout_batches(manifest(tmp_path), CausalLM(16), 1, heldout_percent=20.0, max_batches=1000)
    assert held_docs > 5 and len(batches) == held_docs * 41 // 17


def test_tokenizer_bigger_than_model_vocab_is_refused(shard_dir):
    with pytest.raises(TrainError, match="vocab 50257.*model.vocab_size is 1000"):
        load_manifest(shard_dir, 1000)


def corrupt_copy(shard_dir, tmp_path):
    out = tmp_path / "data"
    shutil.copytree(shard_dir, out)
    shard = out / "wiki" / "shard-000001.tar"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    return out, shard


def test_corrupted_shard_is_a_clear_error_naming_it(shard_dir, tmp_path):
    out, shard = corrupt_copy(shard_dir, tmp_path)
    it = TrainLoader(load_manifest(out, 50257, {"wiki": 1.0}), CausalLM(64), 4, 0, 1, 1, 0.0, "error", 0)
    with pytest.raises(TrainError, match=f"shard {shard}: sha256 does not match"):
        for _ in range(200):
            it.next()


def test_corrupted_shard_is_skipped_when_configured(shard_dir, tmp_path, caplog):
    out, shard = corrupt_copy(shard_dir, tmp_path)
    m = load_manifest(out, 50257, {"wiki": 1.0})
    stream = MixedStream(m, CausalLM(64), seed=0, on_corrupt="skip")
    for _ in range(300):  # more than one epoch of the good shard
        assert stream.next_window() is not None
    assert f"skipping shard {shard}" in caplog.text


def test_heldout_windows_mix_the_sources_by_their_weights(uneven_sources):
    data_dir, weights = uneven_sources
    batches = heldout_batches(load_manifest(data_dir, 50257), CausalLM(32), 10, heldout_percent=20.0, max_batches=2)
    names = {1: "books", 2: "web", 3: "wiki"}
    sources = [{names[int(t) // 1000] for t in w if t != 50256}.pop() for b in batches for w in b.numpy()]
    assert {s: sources.count(s) for s in weights} == {"books": 3, "web": 12, "wiki": 5}  # 16%, 60%, 24% of 20
