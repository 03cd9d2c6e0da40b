import numpy as np

from data_pipeline.dedup.clusters import band_edges, components, exact_duplicates, find_duplicates
from data_pipeline.dedup.minhash import MinHasher, exact_hash
from tests.data_pipeline.conftest import prose


def local_map(fn, items):
    return [fn(item) for item in items]


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


def test_find_duplicates_keeps_the_lowest_key_per_cluster(shared_data):
    base = (shared_data / "books/mobydick.txt").read_text()[50_000:60_000]
    near = base.replace("whale", "whales", 2)
    texts = {30: base, 10: near, 20: prose(5), 40: base.upper(), 50: prose(6)}  # upper(): exact after normalizing
    keys = np.array(sorted(texts), np.int64)
    hasher = MinHasher()
    signatures = {"keys": keys, "hashes": np.array([exact_hash(texts[k]) for k in keys], np.uint64),
                  "minhash": np.stack([hasher.signature(texts[k]) for k in keys])}
    found = find_duplicates(signatures, 14, 8, exact=True, map_bands=local_map)
    assert found["exact"].tolist() == [40]
    assert found["near"].tolist() == [30]


def test_band_edges_and_components():
    band = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4]], np.uint32)
    edges = band_edges(band)
    assert sorted(map(tuple, edges.tolist())) == [(0, 2), (1, 4)]
    roots = components(5, np.array([[0, 2], [2, 3], [1, 4]]))
    assert roots.tolist() == [0, 1, 0, 0, 1]
    assert exact_duplicates(np.array([1, 2, 3]), np.array([9, 8, 9], np.uint64)).tolist() == [2]
