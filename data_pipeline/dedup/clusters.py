"""From signatures to the documents to drop, in three steps that each fit one process whatever
the corpus size:

1. `scatter` (per input): each signature becomes one (bucket id, key) entry per band, and one
   (exact hash, key) entry, sorted by partition (id mod P) with offsets, so that a partition
   task reads only its slice of every input.
2. `linked_to_lowest` (per partition): documents sharing an exact hash or a band bucket are
   linked to the lowest key among them: the exact duplicates, and the edges of the LSH graph.
3. `near_duplicates` (once): connected components (scipy's csgraph) over the edges alone, so its
   memory follows the number of near-duplicate links, not of documents; each component keeps
   its lowest key.

Exact duplicates have equal normalized text, hence equal signatures and equal buckets in every
band as their lower-key twin: components over all documents keep the same survivors as
banding only the documents that survived exact dedup."""
from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from data_pipeline.dedup.minhash import Q, splitmix64


def bucket_ids(minhash: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: equal rows in a band give equal ids; the band is mixed in, so equal rows
    in different bands do not. Two different buckets share an id with odds 2^-64 per pair
    (~3e-6 over 10^7 buckets of one band), negligible next to MinHash's own error."""
    n = minhash.shape[0]
    values = minhash.reshape(n, bands, rows).astype(np.uint64)
    ids = np.broadcast_to(np.arange(1, bands + 1, dtype=np.uint64), (n, bands)).copy()
    for r in range(rows):
        ids = splitmix64(ids * Q + values[:, :, r])
    return ids


def scatter(keys: np.ndarray, hashes: np.ndarray | None, minhash: np.ndarray, bands: int, rows: int,
            parts: int) -> dict[str, np.ndarray]:
    """One input's entries grouped by partition: `{kind}_ids`, `{kind}_keys`, `{kind}_offsets`
    (parts + 1) for kind "exact" (when `hashes` is given) and "near" (when signatures are)."""
    entries = {}
    if hashes is not None:
        entries["exact"] = (hashes.astype(np.uint64), keys)
    if minhash.size:
        entries["near"] = (bucket_ids(minhash, bands, rows).ravel(), np.repeat(keys, bands))
    out = {}
    for kind, (ids, entry_keys) in entries.items():
        part = ids % np.uint64(parts)
        order = np.argsort(part, kind="stable")
        out[f"{kind}_ids"], out[f"{kind}_keys"] = ids[order], entry_keys[order]
        out[f"{kind}_offsets"] = np.searchsorted(part[order], np.arange(parts + 1, dtype=np.uint64))
    return out


def linked_to_lowest(ids: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, other): for every entry whose id a lower key also has, that id's lowest key and its own."""
    order = np.lexsort((keys, ids))
    ids, keys = ids[order], keys[order]
    starts = np.concatenate([[True], ids[1:] != ids[:-1]]) if ids.size else np.zeros(0, bool)
    lowest = keys[np.flatnonzero(starts)][np.cumsum(starts) - 1]
    return lowest[~starts], keys[~starts]


def components(n: int, edges: np.ndarray) -> np.ndarray:
    """Root (lowest position) of each position's connected component (scipy's csgraph, vectorised)."""
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    roots = np.full(labels.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(roots, labels, np.arange(n, dtype=np.int64))
    return roots[labels]


def near_duplicates(edges: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Sorted keys that a lower key reaches through band buckets, less the exact duplicates
    (`exact`, sorted), which are counted under their own reason."""
    nodes, positions = np.unique(edges, return_inverse=True)
    roots = components(nodes.size, positions.reshape(edges.shape))
    reached = nodes[roots != np.arange(nodes.size)]  # nodes are sorted: the lowest position is the lowest key
    return np.setdiff1d(reached, exact, assume_unique=True)
