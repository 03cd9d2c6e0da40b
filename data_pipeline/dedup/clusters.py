"""From signatures to the documents to drop: exact-hash groups, LSH band buckets, and
connected components; each group keeps its lowest document key."""
from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def exact_duplicates(keys: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Positions (into `keys`) of documents whose hash an earlier (lower-key) document has."""
    order = np.lexsort((keys, hashes))
    repeated = np.zeros(keys.size, bool)
    repeated[order[1:]] = hashes[order[1:]] == hashes[order[:-1]]
    return np.flatnonzero(repeated)


def band_edges(band: np.ndarray) -> np.ndarray:
    """(m, 2) position pairs linking each document to the first one in its band bucket.
    Positions are in key order, so the first in a bucket is its lowest key."""
    if band.shape[0] < 2:
        return np.zeros((0, 2), np.int64)
    _, bucket = np.unique(band, axis=0, return_inverse=True)
    bucket = bucket.ravel()
    order = np.lexsort((np.arange(bucket.size), bucket))
    sorted_bucket = bucket[order]
    starts = np.concatenate([[True], sorted_bucket[1:] != sorted_bucket[:-1]])
    first = order[np.flatnonzero(starts)][np.cumsum(starts) - 1]
    linked = ~starts
    return np.stack([first[linked], order[linked]], axis=1).astype(np.int64)


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Root (lowest position) of each position's connected component (scipy's csgraph, vectorised)."""
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    roots = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(roots, labels, np.arange(n, dtype=np.int64))
    return roots[labels]


def find_duplicates(signatures: dict[str, np.ndarray], bands: int, rows: int, exact: bool,
                    map_bands) -> dict[str, np.ndarray]:
    """Keys to drop, by reason: "exact" (same normalized text as a lower key) and "near"
    (MinHash LSH cluster with a lower key). `map_bands(fn, [band arrays])` runs the per-band
    bucketing, e.g. as Ray tasks; `signatures` is sorted by key."""
    keys = signatures["keys"]
    dropped = np.zeros(keys.size, bool)
    exact_pos = exact_duplicates(keys, signatures["hashes"]) if exact else np.zeros(0, np.int64)
    dropped[exact_pos] = True
    minhash = signatures["minhash"]
    near_pos = np.zeros(0, np.int64)
    if minhash.size:
        alive = np.flatnonzero(~dropped)
        band_arrays = [np.ascontiguousarray(minhash[alive, b * rows:(b + 1) * rows]) for b in range(bands)]
        edges = np.concatenate([np.zeros((0, 2), np.int64), *map_bands(band_edges, band_arrays)])
        roots = components(alive.size, edges)
        near_pos = alive[roots != np.arange(alive.size)]
    return {"exact": keys[exact_pos], "near": keys[near_pos]}
