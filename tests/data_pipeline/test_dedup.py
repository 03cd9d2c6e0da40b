import numpy as np

from data_pipeline.config import PipelineConfig
from data_pipeline.dedup.clusters import bucket_ids, components, linked_to_lowest, near_duplicates
from data_pipeline.dedup.minhash import MinHasher, exact_hash
from data_pipeline.document import make_key
from data_pipeline.executors import LocalExecutor
from data_pipeline.stages import DEDUP_DIR, deduplicate, task_dir
from tests.data_pipeline.conftest import prose


def test_near_duplicates_share_buckets_and_unrelated_texts_do_not(shared_data):
    text = (shared_data / "books/mobydick.txt").read_text()[20_000:40_000]
    words = text.split()
    for i in (10, 500, 1500):
        words[i] = "CHANGED"
    hasher = MinHasher()
    a, b = hasher.signature(text), hasher.signature(" ".join(words))
    c = hasher.signature((shared_data / "books/austen_emma.txt").read_text()[20_000:40_000])
    assert (a == b).mean() > 0.8 and (a == c).mean() < 0.05
    assert a.dtype == np.uint32 and a.shape == (112,)
    assert np.array_equal(a, MinHasher().signature(text))  # pure function of text and seed


def test_bucket_ids_equal_exactly_when_a_band_is_equal():
    sigs = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [3, 4, 1, 2], [1, 2, 3, 4]], np.uint32)
    ids = bucket_ids(sigs, bands=2, rows=2)
    assert ids[0, 0] == ids[1, 0] and ids[0, 1] != ids[1, 1]
    assert ids[2, 0] != ids[0, 1]  # same rows, other band: another bucket
    assert np.array_equal(ids[0], ids[3]) and len(set(ids.ravel().tolist())) == 5


def test_linked_to_lowest_and_components():
    lowest, other = linked_to_lowest(np.array([7, 5, 7, 5, 9], np.uint64), np.array([30, 20, 10, 40, 50]))
    assert sorted(zip(lowest.tolist(), other.tolist())) == [(10, 30), (20, 40)]
    assert components(5, np.array([[0, 2], [2, 3], [1, 4]])).tolist() == [0, 1, 0, 0, 1]
    edges = np.array([[10, 30], [30, 70], [20, 40]])
    assert near_duplicates(edges, exact=np.array([40])).tolist() == [30, 70]


def reference(keys, hashes, minhash, bands, rows):
    """Exact dedup first, then union-find over the survivors' band buckets: a Python loop, slow and plain."""
    first_of, exact = {}, set()
    for k, h in zip(keys.tolist(), hashes.tolist()):
        if h in first_of:
            exact.add(k)
        first_of.setdefault(h, k)
    parent = {}

    def find(k):
        while parent.get(k, k) != k:
            k = parent[k]
        return k
    for b in range(bands):
        bucket_first = {}
        for k, sig in zip(keys.tolist(), minhash[:, b * rows:(b + 1) * rows].tolist()):
            if k not in exact:
                root, other = sorted((find(k), find(bucket_first.setdefault(tuple(sig), k))))
                parent[other] = root
    near = {k for k in keys.tolist() if k not in exact and find(k) != k}
    return sorted(exact), sorted(near)


def test_partitioned_dedup_matches_the_reference_for_any_partition_count(tmp_path):
    """Texts with exact and near copies spread over three inputs; 1 and 13 partitions."""
    hasher, rng = MinHasher(), np.random.default_rng(0)
    base = [prose(i) for i in range(8)]
    texts = base + [base[1].upper(), base[2].replace("Sentence", "Phrase", 1), base[3],
                    base[2].replace("Sentence", "Phrase", 2), prose(20)]
    order = rng.permutation(len(texts))
    keys = np.array([make_key(int(i) % 3, int(i)) for i in range(len(texts))], np.int64)
    hashes = np.array([exact_hash(texts[j]) for j in order], np.uint64)
    minhash = np.stack([hasher.signature(texts[j]) for j in order])
    done = []
    for index in range(3):
        mine = (keys >> 40) == index
        folder = task_dir(tmp_path, index)
        folder.mkdir(parents=True)
        np.savez(folder / "sigs.npz", keys=keys[mine], hashes=hashes[mine], minhash=minhash[mine])
        done.append({"index": index, "source": "web" if index < 2 else "books", "docs": int(mine.sum())})
    sorted_pos = np.argsort(keys)
    expected = reference(keys[sorted_pos], hashes[sorted_pos], minhash[sorted_pos], 14, 8)
    assert expected[0] and expected[1]  # the fixture has both kinds
    for entries in (10_000_000, 12):
        config = PipelineConfig.model_validate({"sources": [{"name": "web", "format": "warc", "inputs": ["x"], "weight": 1.0}],
                                                "dedup": {"partition_entries": entries}})
        stats = deduplicate(config, tmp_path, done, LocalExecutor().map)
        with np.load(tmp_path / DEDUP_DIR / "removed.npz") as found:
            assert (found["exact"].tolist(), found["near"].tolist()) == expected
        assert len(list((tmp_path / DEDUP_DIR / "parts").iterdir())) == -(-len(texts) * 15 // entries)  # documents x (14 bands + exact)
        assert sum(s.docs_in for s in stats.values()) == len(texts)
        assert sum(sum(s.removed.values()) for s in stats.values()) == len(expected[0]) + len(expected[1])
