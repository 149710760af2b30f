"""Duplicate detection: exact duplicates by a case- and whitespace-blind hash, near duplicates by MinHash
signatures (computed in numpy, equal to datasketch's "affine32" MinHash of our shingle hashes) banded with
datasketch's MinHashLSH layout, with candidate pairs verified and grouped.

Grouping reads signatures through `Signatures`, so the same code groups signatures held in one array
(`SignatureArray`, for texts in memory) and signatures kept on disk a chunk at a time (the pipeline's tables).
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Protocol

import numpy as np

from tunesmith.data.normalize import _check_choice
from tunesmith.errors import ConfigError

# ------------------------------------------------------------------------------------------------
# Exact duplicates


def exact_digest(text: str) -> bytes:
    """A stable hash of the text with case and whitespace differences removed (blake2b, 128 bits)."""
    canonical = " ".join(text.casefold().split())
    return hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def exact_key(text: str) -> str:
    """`exact_digest` as 32 hex digits."""
    return exact_digest(text).hex()


def exact_keys(texts: Sequence[str]) -> np.ndarray:
    """(N, 2) uint64: the `exact_digest` of each text, as numbers numpy can sort."""
    return np.frombuffer(b"".join(map(exact_digest, texts)), dtype=np.uint64).reshape(len(texts), 2)


def first_of_equal(keys: np.ndarray) -> np.ndarray:
    """(N,) index of the first row whose key equals each row's key (its own index when none comes earlier).

    Args:
        keys: (N,) or (N, K) integers; rows with equal keys are equal.
    """
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64)
    keys = keys.reshape(len(keys), -1)
    order = np.lexsort(keys.T[::-1])  # stable: within equal keys, rows stay in index order
    ordered = keys[order]
    starts = np.r_[True, (ordered[1:] != ordered[:-1]).any(axis=1)]
    first = np.empty_like(order)
    first[order] = order[starts][np.cumsum(starts) - 1]
    return first


def find_exact_duplicates(texts: Sequence[str]) -> dict[int, int]:
    """Row -> the earlier row it duplicates, for every row but the first of each set of equal texts."""
    return duplicates_of(exact_keys(texts))


def duplicates_of(keys: np.ndarray) -> dict[int, int]:
    """Row -> the first row with the same key, for every row that is not the first of its key."""
    first = first_of_equal(keys)
    rows = np.flatnonzero(first != np.arange(len(keys)))
    return dict(zip(rows.tolist(), first[rows].tolist()))


# ------------------------------------------------------------------------------------------------
# Near duplicates

SHINGLES = ("word", "char")
_U64 = np.uint64
_EMPTY = np.uint32(0xFFFFFFFF)  # the signature value of a text with no shingles
_CHUNK = 256  # texts hashed at once: large enough for numpy, small enough to stay in the CPU cache
_MAX_BUCKET = 256  # LSH buckets up to this size have all their pairs verified
_NUM_THREADS = min(4, os.cpu_count() or 1)  # numpy releases the GIL: chunks hash in parallel
_WORD_BASE = 0x100000001B3  # odd, so invertible modulo 2**64
_WORD_BASE_INV = pow(_WORD_BASE, -1, 1 << 64)
_SHINGLE_BASE = _U64(0x9E3779B97F4A7C15)


def _fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser: spreads every input bit over the whole word. (K,) uint64."""
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xFF51AFD7ED558CCD)
    h = h ^ (h >> _U64(33))
    h = h * _U64(0xC4CEB9FE1A85EC53)
    return h ^ (h >> _U64(33))


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, which datasketch's "affine32" scheme applies before permuting."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


@cache
def _word_char_table() -> np.ndarray:
    """(65536,) bool: letters, combining marks and digits; everything else (space, punctuation) ends a word.
    Code points above U+FFFF count as word characters (they are looked up at U+FFFF)."""
    table = np.array([unicodedata.category(chr(cp))[0] in "LMN" for cp in range(0x10000)])
    table[0xFFFF] = True
    return table


def _powers(base: int, n: int) -> np.ndarray:
    """(n,) uint64: base**0 .. base**(n-1) modulo 2**64, by doubling (a cumprod is ~10x slower)."""
    p = np.ones(n, dtype=_U64)
    step = 1
    while step < n:
        p[step : 2 * step] = p[: min(step, n - step)] * _U64(pow(base, step, 1 << 64))
        step *= 2
    return p


def _token_hashes(folded: list[str], shingle: str) -> tuple[np.ndarray, np.ndarray]:
    """Hash of every token (word or character) of the texts and the index of its text, in order.

    Words are runs of letters, marks and digits, hashed as polynomials of their code points with prefix
    sums, so no Python code runs per word. Returns (T,) uint64 hashes and (T,) int64 text indices.
    """
    lengths = np.fromiter(map(len, folded), dtype=np.int64, count=len(folded))
    codes = np.frombuffer("".join(folded).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    if shingle == "char":
        return _fmix64(codes.astype(_U64)), np.repeat(np.arange(len(folded)), lengths)
    bounds = np.concatenate(([0], np.cumsum(lengths)))
    is_word = _word_char_table()[np.minimum(codes, 0xFFFF)]
    before, after = np.zeros_like(is_word), np.zeros_like(is_word)
    before[1:], after[:-1] = is_word[:-1], is_word[1:]
    before[bounds[:-1][lengths > 0]] = False  # a word never continues across two texts
    after[bounds[1:][lengths > 0] - 1] = False
    starts, ends = np.flatnonzero(is_word & ~before), np.flatnonzero(is_word & ~after) + 1
    # sum_j c_j * inv**j over [start, end), times base**start = sum_j c_j * inv**(j - start): position-free
    prefix = np.zeros(len(codes) + 1, dtype=_U64)
    np.cumsum(codes * _powers(_WORD_BASE_INV, len(codes)), out=prefix[1:])
    words = (prefix[ends] - prefix[starts]) * _powers(_WORD_BASE, len(codes))[starts]
    return _fmix64(words), np.searchsorted(bounds, starts, side="right") - 1


def _shingle_hashes(tokens: np.ndarray, text_of: np.ndarray, ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """32-bit hashes of every run of `ngram` tokens inside one text, and its text index.

    A text shorter than `ngram` tokens gets one shingle made of all its tokens. Returns (S,) uint32, (S,) int64.
    """
    num = len(tokens)
    padded_tokens = np.concatenate((tokens, np.zeros(ngram - 1, dtype=_U64)))
    padded_text = np.concatenate((text_of, np.full(ngram - 1, -1)))
    h = np.zeros(num, dtype=_U64)
    for k in range(ngram):
        same_text = padded_text[k : k + num] == text_of
        h = h * _SHINGLE_BASE + np.where(same_text, padded_tokens[k : k + num], _U64(0))
    whole = padded_text[ngram - 1 : ngram - 1 + num] == text_of
    first = np.ones(num, dtype=bool)
    first[1:] = text_of[1:] != text_of[:-1]
    keep = whole | first
    folded = (h ^ (h >> _U64(32))).astype(np.uint32)
    return folded[keep], text_of[keep]


def _signatures(hashes: np.ndarray, text_of: np.ndarray, num_texts: int, perms: np.ndarray) -> np.ndarray:
    """MinHash of each text: per permutation k, min over its shingles of a_k * fmix32(h) + b_k mod 2**32.

    One permutation at a time over all shingles, so each numpy call works on a long contiguous array.
    Returns (num_texts, num_perm) uint32; a text without shingles keeps the empty value 0xFFFFFFFF.
    """
    a, b = perms
    sig = np.full((num_texts, len(a)), _EMPTY, dtype=np.uint32)
    if len(hashes) == 0:
        return sig
    mixed = _fmix32(hashes)
    texts, starts = np.unique(text_of, return_index=True)
    buf = np.empty_like(mixed)
    for k in range(len(a)):
        np.multiply(mixed, a[k], out=buf)
        np.add(buf, b[k], out=buf)
        sig[texts, k] = np.minimum.reduceat(buf, starts)
    return sig


def minhash_signatures(
    texts: Sequence[str], shingle: str = "word", ngram: int = 5, num_perm: int = 128, seed: int = 1
) -> np.ndarray:
    """MinHash signature of each text's set of shingles (case-folded word or character n-grams).

    Each row equals `datasketch.MinHash(num_perm, seed, scheme="affine32")` updated with the text's 32-bit
    shingle hashes, so rows can be wrapped as `LeanMinHash` and compared with `.jaccard`.
    Returns:
        (N, num_perm) uint32; rows of texts without any token are all 0xFFFFFFFF.
    """
    _check_choice("shingle", shingle, SHINGLES)
    if ngram < 1 or num_perm < 2:
        raise ConfigError(f"near-dedup: ngram must be >= 1 and num_perm >= 2, got {ngram} and {num_perm}")
    from datasketch import MinHash  # 0.4 s of imports (scipy), paid only when near-dedup runs

    perms = MinHash(num_perm=num_perm, seed=seed, scheme="affine32").permutations  # (2, num_perm) uint32
    chunks = [texts[lo : lo + _CHUNK] for lo in range(0, len(texts), _CHUNK)]
    with ThreadPoolExecutor(max_workers=_NUM_THREADS) as pool:
        parts = pool.map(lambda chunk: _chunk_signatures(chunk, shingle, ngram, perms), chunks)
        return np.concatenate([np.empty((0, num_perm), dtype=np.uint32), *parts])


def _chunk_signatures(texts: Sequence[str], shingle: str, ngram: int, perms: np.ndarray) -> np.ndarray:
    """(len(texts), num_perm) uint32 signatures of a few hundred texts."""
    folded = [t.casefold() for t in texts]
    tokens, text_of = _token_hashes(folded, shingle)
    hashes, shingle_text = _shingle_hashes(tokens, text_of, ngram)
    return _signatures(hashes, shingle_text, len(folded), perms)


def near_duplicate_groups(
    texts: Sequence[str],
    threshold: float = 0.8,
    shingle: str = "word",
    ngram: int = 5,
    num_perm: int = 128,
    seed: int = 1,
) -> list[list[int]]:
    """Groups of rows whose shingle sets are near-duplicates (estimated Jaccard >= threshold).

    MinHashLSH proposes candidate pairs; each is kept only if its estimated Jaccard (share of equal signature
    values, as `MinHash.jaccard`) reaches the threshold; groups are the connected components of the kept
    pairs, so A~B and B~C put A and C in one group even if A and C differ more. Texts without any token are
    never grouped. Deterministic for a given seed.
    Returns:
        Groups of two or more row indices, each sorted, ordered by their first (lowest) row.
    """
    _check_threshold(threshold)
    sig = minhash_signatures(texts, shingle, ngram, num_perm, seed)
    return group_signatures(SignatureArray(sig, lsh_bands(threshold, num_perm)), np.arange(len(sig)), threshold)


def dedup_groups(groups: list[list[int]]) -> dict[int, int]:
    """Row -> the representative it duplicates (the group's first row), for every other group member."""
    return {row: group[0] for group in groups for row in group[1:]}


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"near-dedup: threshold must be in (0, 1], got {threshold}")


@dataclass(frozen=True)
class Bands:
    """The LSH layout: `count` bands of `width` consecutive signature values each."""

    count: int
    width: int


def lsh_bands(threshold: float, num_perm: int) -> Bands:
    """datasketch's MinHashLSH band layout for the threshold, chosen to miss few true pairs (weights 0.1 FP /
    0.9 FN): a missed pair is lost, while a false candidate is only verified away. At threshold 0.8 and 128
    permutations: 14 bands of 9, recall 0.87 at J=0.8, 0.975 at 0.85."""
    from datasketch import MinHashLSH  # 0.4 s of imports (scipy), paid only when near-dedup runs

    _check_threshold(threshold)
    layout = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.1, 0.9))
    return Bands(layout.b, layout.r)


def signature_keys(sig: np.ndarray) -> np.ndarray:
    """(N,) uint64 hash of each whole signature: equal signatures have equal keys. sig: (N, num_perm) uint32."""
    key = np.zeros(len(sig), dtype=_U64)
    for column in sig.T:
        key = key * _SHINGLE_BASE + column
    return key


def band_keys(sig: np.ndarray, bands: Bands) -> np.ndarray:
    """(bands.count, N) uint64: a 64-bit hash of each band of each signature."""
    return np.stack([_band_key(sig[:, k * bands.width : (k + 1) * bands.width]) for k in range(bands.count)])


def _band_key(band: np.ndarray) -> np.ndarray:
    """(N,) uint64 FNV-style hash (wrapping) of each row of a (N, width) block of signature values."""
    key = np.zeros(len(band), dtype=_U64)
    for column in band.T.astype(_U64):
        key = (key * _U64(0x100000001B3)) ^ column
    return key


class Signatures(Protocol):
    """MinHash signatures of N rows, however they are stored, as `group_signatures` reads them."""

    bands: Bands
    keys: np.ndarray  # (N,) uint64 `signature_keys`
    nonempty: np.ndarray  # (N,) bool: the row's text has at least one shingle

    def band(self, k: int, rows: np.ndarray) -> np.ndarray:
        """(len(rows),) uint64 keys of band k of the given rows."""

    def take(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), num_perm) uint32 signatures of the given rows."""


class SignatureArray:
    """Signatures held in one array."""

    def __init__(self, sig: np.ndarray, bands: Bands) -> None:
        self.sig, self.bands = sig, bands
        self.keys = signature_keys(sig)
        self.nonempty = (sig != _EMPTY).any(axis=1)

    def band(self, k: int, rows: np.ndarray) -> np.ndarray:
        return _band_key(self.sig[rows, k * self.bands.width : (k + 1) * self.bands.width])

    def take(self, rows: np.ndarray) -> np.ndarray:
        return self.sig[rows]


def group_signatures(sigs: Signatures, rows: np.ndarray, threshold: float) -> list[list[int]]:
    """`near_duplicate_groups` of the given rows (ascending indices into `sigs`), named by those indices."""
    rows = rows[sigs.nonempty[rows]]
    same_as = _identical_rows(sigs, rows)  # equal signatures are grouped without LSH: big buckets are quadratic
    distinct = rows[same_as == np.arange(len(rows))]
    pairs = _lsh_candidate_pairs(sigs, distinct, len(sigs.keys))
    pairs = pairs[_estimated_jaccard(sigs, pairs) >= threshold]
    identical = np.stack((rows[same_as], rows), axis=1)
    return _components(np.concatenate((identical, pairs)))


def _identical_rows(sigs: Signatures, rows: np.ndarray) -> np.ndarray:
    """(len(rows),) position in `rows` of the first row with the same signature as each (itself if none earlier)."""
    same_as = first_of_equal(sigs.keys[rows])
    maybe = np.flatnonzero(same_as != np.arange(len(rows)))
    # equal keys, different signatures: 2**-64 per pair
    collided = maybe[~(sigs.take(rows[maybe]) == sigs.take(rows[same_as[maybe]])).all(axis=1)]
    same_as[collided] = collided
    return same_as


def _lsh_candidate_pairs(sigs: Signatures, rows: np.ndarray, num_rows: int) -> np.ndarray:
    """(K, 2) distinct pairs (i < j) of rows that share at least one LSH band.

    The buckets are found with numpy (a 64-bit hash per band, sorted) instead of MinHashLSH's per-row dictionary
    inserts, which hold b keys per row and take several hundred MB at 200k rows. A hash collision only adds a
    candidate that the Jaccard check then rejects.
    """
    codes = [np.zeros(0, dtype=np.int64)]
    for k in range(sigs.bands.count):
        key = sigs.band(k, rows)
        order = np.argsort(key, kind="stable")
        starts = np.flatnonzero(np.r_[True, key[order][1:] != key[order][:-1]])
        sizes = np.diff(np.r_[starts, len(rows)])
        for size in np.unique(sizes[sizes > 1]):  # all buckets of one size at once, not a Python loop per bucket
            members = np.sort(rows[order[starts[sizes == size][:, None] + np.arange(size)]], axis=1)
            i, j = _bucket_pairs(members)
            codes.append((i * num_rows + j).ravel())  # one int per pair, to drop pairs that several bands repeat
    unique = np.unique(np.concatenate(codes))
    return np.stack((unique // num_rows, unique % num_rows), axis=1)


def _bucket_pairs(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows to verify in LSH buckets of one size ((buckets, size) rows, each bucket sorted): all of
    them, or in buckets larger than _MAX_BUCKET (templated texts) each row with the first and with the next,
    so the work stays linear. Returns (buckets, pairs) first and second rows."""
    size = members.shape[1]
    if size <= _MAX_BUCKET:
        i, j = np.triu_indices(size, 1)
        return members[:, i], members[:, j]
    rest = members[:, 1:]
    first = np.repeat(members[:, :1], size - 1, axis=1)
    return np.concatenate((first, members[:, :-1]), axis=1), np.concatenate((rest, rest), axis=1)


def _estimated_jaccard(sigs: Signatures, pairs: np.ndarray, block: int = 65536) -> np.ndarray:
    """(K,) share of equal signature values of each pair, in blocks to bound memory."""
    parts = [np.zeros(0)]
    for lo in range(0, len(pairs), block):
        i, j = pairs[lo : lo + block].T
        parts.append((sigs.take(i) == sigs.take(j)).mean(axis=1))
    return np.concatenate(parts)


def _components(pairs: np.ndarray) -> list[list[int]]:
    """Connected components (union-find) of the graph of pairs, as sorted lists of two or more rows."""
    parent: dict[int, int] = {}

    def root(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = parent[x]
        return x

    for i, j in pairs.tolist():
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the root stays the lowest row of its component
    groups: dict[int, list[int]] = {}
    for x in sorted(parent):
        groups.setdefault(root(x), []).append(x)
    return sorted(g for g in groups.values() if len(g) > 1)
