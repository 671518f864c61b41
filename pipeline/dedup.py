"""Exact and near-duplicate detection over 64-bit perceptual hashes, and the choice of what to keep.

Near pairs (:func:`near_pairs`): every pair of hashes within ``max_distance`` bits
(Hamming). Hashes longer than 64 bits (the 256-bit phash ``jobs.curate`` uses by default)
are compared exhaustively, in vectorized chunks: about 10^9 hash pairs a minute on one core,
so a few hundred thousand samples per job (shard groups beyond that are future work). A
64-bit hash is searched with multi-index hashing: the 64 bits are cut into
``max_distance + 1`` blocks, and two hashes within ``max_distance`` bits agree exactly on
at least one block (pigeonhole), so only hashes sharing a block value are compared,
block by block, with vectorized popcounts. The work grows with the sizes of those groups:
about N^2 / 2^(64 / (d + 1)) comparisons per block for N uniformly spread hashes (d = 8: 7-bit
blocks, fine to a few million hashes on one node; larger sets want a smaller distance).

Clusters (:func:`clusters`): exact pairs (same content hash) and near pairs joined by
union-find; each cluster keeps one sample (the largest original picture, then the first
in (shard, key) order) and names it as the ``duplicate_of`` of the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HASH_BITS = 64
THUMB_BYTES = 4 * 4 * 3  # a 4x4 RGB thumbnail


def hash_to_int(hex_hash: str) -> int:
    return int(hex_hash, 16)


def popcount_xor(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between uint64 words, elementwise (broadcasting)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distance of hashes given as uint64 words along the last axis (broadcasting over the others)."""
    return popcount_xor(a, b).sum(-1)


def from_hex(hex_hashes: Sequence[str]) -> np.ndarray:
    """Hex hashes (16 hex digits per 64 bits) as a (N, words) uint64 array."""
    words = max(1, len(hex_hashes[0]) // 16) if len(hex_hashes) else 1
    return np.array([[int(h[16 * w : 16 * (w + 1)], 16) for w in range(words)] for h in hex_hashes], dtype=np.uint64).reshape(-1, words)


def _brute_pairs(a: np.ndarray, b: np.ndarray, max_distance: int, same: bool) -> np.ndarray:
    """All pairs within ``max_distance`` by exhaustive comparison, in chunks of rows (hashes of several words)."""
    rows = max(1, (1 << 24) // max(1, len(b) * a.shape[1]))
    found = []
    for start in range(0, len(a), rows):
        dist = hamming(a[start : start + rows, None, :], b[None, :, :])
        i, j = np.nonzero(dist <= max_distance)
        keep = i + start < j if same else np.ones(len(i), bool)
        found.append(np.stack([i[keep] + start, j[keep], dist[i, j][keep]], axis=1))
    return np.concatenate(found).astype(np.int64) if found else np.zeros((0, 3), np.int64)


def _blocks(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of the ``max_distance + 1`` blocks that cover the 64 bits."""
    n = min(max_distance + 1, HASH_BITS)
    bounds = np.linspace(0, HASH_BITS, n + 1).round().astype(int)
    return [(int(lo), (1 << int(hi - lo)) - 1) for lo, hi in zip(bounds[:-1], bounds[1:])]


def near_pairs(hashes: np.ndarray, max_distance: int, other: np.ndarray | None = None, chunk: int = 2048) -> np.ndarray:
    """Pairs (i, j, distance) of hashes within ``max_distance`` bits, as an int64 array of shape (P, 3).

    Without ``other``: pairs within ``hashes``, i < j. With it: pairs (i in ``hashes``, j in
    ``other``). Sorted by (i, j), each pair once.
    """
    a = np.asarray(hashes, dtype=np.uint64)
    b = a if other is None else np.asarray(other, dtype=np.uint64)
    if max_distance < 0 or len(a) == 0 or len(b) == 0:
        return np.zeros((0, 3), np.int64)
    if a.ndim == 2 and a.shape[1] == 1:
        a, b = a[:, 0], b[:, 0]
    if a.ndim == 2:  # hashes of several words: exhaustive, O(N^2) popcounts
        return np.unique(_brute_pairs(a, b, max_distance, other is None), axis=0)
    found = []
    for shift, mask in _blocks(max_distance):
        key_a = (a >> np.uint64(shift)) & np.uint64(mask)
        key_b = key_a if other is None else (b >> np.uint64(shift)) & np.uint64(mask)
        order_a, order_b = np.argsort(key_a, kind="stable"), np.argsort(key_b, kind="stable")
        values, starts_a = np.unique(key_a[order_a], return_index=True)
        ends_a = np.append(starts_a[1:], len(a))
        lo_b = np.searchsorted(key_b[order_b], values, side="left")
        hi_b = np.searchsorted(key_b[order_b], values, side="right")
        for s, e, lb, hb in zip(starts_a, ends_a, lo_b, hi_b):
            if hb - lb == 0 or (other is None and e - s < 2):
                continue
            ia, ib = order_a[s:e], order_b[lb:hb]
            for c in range(0, len(ia), chunk):
                rows = ia[c : c + chunk]
                dist = popcount_xor(a[rows][:, None], b[ib][None, :])
                r, k = np.nonzero(dist <= max_distance)
                i, j = rows[r], ib[k]
                keep = i < j if other is None else np.ones(len(i), bool)
                found.append(np.stack([i[keep], j[keep], dist[r, k][keep]], axis=1))
    if not found:
        return np.zeros((0, 3), np.int64)
    pairs = np.unique(np.concatenate(found).astype(np.int64), axis=0)
    return pairs


class _UnionFind:
    def __init__(self, n: int):
        self.parent = np.arange(n)

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, i: int, j: int) -> None:
        ri, rj = self.find(i), self.find(j)
        if ri != rj:
            self.parent[max(ri, rj)] = min(ri, rj)


def colour_close(colours: np.ndarray, pairs: np.ndarray, tolerance: float, other: np.ndarray | None = None) -> np.ndarray:
    """The rows of ``pairs`` (i, j, ...) whose colour thumbnails differ by at most ``tolerance`` (mean absolute, 0-255).

    A perceptual hash sees a grey picture relative to its own median: a black star on grass
    and one on sand hash alike. Copies keep their colours (re-encoding, resizing and slight
    crops move a 4x4 thumbnail by a few levels), distinct scenes do not.
    """
    if len(pairs) == 0:
        return pairs
    b = colours if other is None else other
    diff = np.abs(colours[pairs[:, 0]].astype(np.int16) - b[pairs[:, 1]].astype(np.int16)).mean(axis=1)
    return pairs[diff <= tolerance]


def colour_thumbnail(img) -> str:
    """A picture's 4x4 RGB thumbnail (box filter), as 96 hex digits."""
    from PIL import Image

    return np.asarray(img.convert("RGB").resize((4, 4), Image.Resampling.BOX), dtype=np.uint8).tobytes().hex()


def thumbnails(hex_thumbs: Sequence[str]) -> np.ndarray:
    """Hex thumbnails (:func:`colour_thumbnail`) as a (N, 48) uint8 array; (0, 48) for none."""
    if not len(hex_thumbs):
        return np.zeros((0, THUMB_BYTES), np.uint8)
    return np.array([np.frombuffer(bytes.fromhex(t), dtype=np.uint8) for t in hex_thumbs], dtype=np.uint8).reshape(len(hex_thumbs), -1)


def clusters(
    content_hashes: Sequence[str],
    phashes: np.ndarray,
    areas: Sequence[int],
    max_distance: int | None,
    colours: np.ndarray | None = None,
    colour_tolerance: float = 255.0,
) -> list[tuple[int, str, int] | None]:
    """For each sample (in the caller's (shard, key) order): None when it is kept, else
    (index of the kept sample it duplicates, "exact_duplicate" | "near_duplicate", distance).

    ``max_distance`` None: exact duplicates only (same content hash). ``colours`` (N, 48)
    thumbnails: near pairs must also be within ``colour_tolerance`` (:func:`colour_close`).
    """
    n = len(content_hashes)
    uf = _UnionFind(n)
    first: dict[str, int] = {}
    for i, h in enumerate(content_hashes):
        if h in first:
            uf.union(first[h], i)
        else:
            first[h] = i
    if max_distance is not None:
        pairs = near_pairs(phashes, max_distance)
        if colours is not None:
            pairs = colour_close(colours, pairs, colour_tolerance)
        for i, j, _ in pairs:
            uf.union(int(i), int(j))
    members: dict[int, list[int]] = {}
    for i in range(n):
        members.setdefault(uf.find(i), []).append(i)
    out: list[tuple[int, str, int] | None] = [None] * n
    hashes = np.asarray(phashes, dtype=np.uint64)
    hashes = hashes.reshape(len(hashes), -1) if len(hashes) else np.zeros((n, 1), np.uint64)
    for group in members.values():
        if len(group) < 2:
            continue
        keep = min(group, key=lambda i: (-int(areas[i]), i))
        for i in group:
            if i != keep:
                exact = content_hashes[i] == content_hashes[keep]
                distance = int(hamming(hashes[i : i + 1], hashes[keep : keep + 1])[0])
                out[i] = (keep, "exact_duplicate" if exact else "near_duplicate", distance)
    return out
