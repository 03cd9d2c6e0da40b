import json
import shutil

import numpy as np
import pytest

from tests.trainer.conftest import write_shards
from trainer.data import PackedStream, TrainLoader, heldout_batches, is_heldout, load_manifest, read_documents
from trainer.errors import TrainError


def manifest(shard_dir, **kw):
    return load_manifest(shard_dir, 50257, **kw)


def loader(shard_dir, rank=0, world=1, workers=0, state=None, batch=2, heldout=2.0):
    return TrainLoader(manifest(shard_dir), seq_len=64, batch_size=batch, rank=rank, world=world, seed=1,
                       heldout_percent=heldout, on_corrupt="error", num_workers=workers, state=state)


def test_windows_are_packed_documents_with_eot_between(shard_dir):
    m = manifest(shard_dir, weights={"wiki": 1.0})
    stream = PackedStream(m, seq_len=64, slot=0, n_slots=1, seed=0)
    windows = np.concatenate([stream.next_window() for _ in range(200)])
    assert all(len(w) == 65 for w in [stream.next_window()])
    # The concatenation is exactly doc, EOT, doc, EOT, ... in the order the stream read them.
    docs = [np.append(t, 50256) for rec in stream.streams["wiki"]._order(0)
            for key, t in read_documents(shard_dir / rec["path"]) if not is_heldout(key, 0.0)]
    flat = np.concatenate(docs)[:len(windows)]
    assert np.array_equal(windows, flat)
    assert (windows == 50256).sum() >= 2


def test_mixture_follows_weights(shard_dir):
    m = manifest(shard_dir)
    stream = PackedStream(m, seq_len=64, slot=0, n_slots=1, seed=0)
    picks = [stream.names[stream.rng.choice(2, p=stream.probs)] for _ in range(2000)]
    assert abs(picks.count("books") / 2000 - 0.7) < 0.05


def test_ranks_and_workers_read_disjoint_documents(shard_dir):
    """4 slots (2 ranks x 2 workers) over sources with 3 and 2 shards: document-level split."""
    m = manifest(shard_dir, weights={"books": 1.0})
    seen = []
    for slot in range(4):
        s = PackedStream(m, 64, slot, 4, seed=3).streams["books"]
        keys = set()
        for _ in range(40):
            s.next_doc()
            keys.add((s.pos["shard"], s.pos["doc"]))
        seen.append(keys)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not seen[a] & seen[b]
    two = [PackedStream(m, 64, slot, 2, seed=3).streams["books"] for slot in range(2)]
    assert two[0].by_shard and not {r["path"] for r in two[0]._order(0)} & {r["path"] for r in two[1]._order(0)}


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_with_the_next_token(shard_dir, workers):
    straight = loader(shard_dir, workers=workers)
    expected = [straight.next() for _ in range(12)]
    first = loader(shard_dir, workers=workers)
    got = [first.next() for _ in range(5)]
    state = json.loads(json.dumps(first.state()))  # checkpoints store it as JSON
    second = loader(shard_dir, workers=workers, state=state)
    got += [second.next() for _ in range(7)]
    for a, b in zip(expected, got):
        assert np.array_equal(a, b)


def test_heldout_split_is_disjoint_from_training(shard_dir):
    m = manifest(shard_dir)
    held = heldout_batches(m, 64, 2, heldout_percent=10.0, max_batches=3)
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
    batches = heldout_batches(manifest(tmp_path), 16, 1, heldout_percent=20.0, max_batches=1000)
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
    it = TrainLoader(load_manifest(out, 50257, {"wiki": 1.0}), 64, 4, 0, 1, 1, 0.0, "error", 0)
    with pytest.raises(TrainError, match=f"shard {shard}: sha256 does not match"):
        for _ in range(200):
            it.next()


def test_corrupted_shard_is_skipped_when_configured(shard_dir, tmp_path, caplog):
    out, shard = corrupt_copy(shard_dir, tmp_path)
    m = load_manifest(out, 50257, {"wiki": 1.0})
    stream = PackedStream(m, 64, 0, 1, seed=0, on_corrupt="skip")
    for _ in range(300):  # more than one epoch of the good shard
        assert stream.next_window() is not None
    assert f"skipping shard {shard}" in caplog.text
