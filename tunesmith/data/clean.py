"""Cleaning steps of the data pipeline: normalise, scrub personal data, filter by quality, drop duplicates.

Every step is optional and pure: it takes plain strings and returns what it changed, so a report can say how
many rows each step changed or removed and why. `clean_texts` runs the chosen steps in a fixed order:
normalise -> PII -> quality -> exact dedup -> near dedup (dedup last, so that it sees the final texts).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cache

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from tunesmith.errors import ConfigError


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"clean: unknown {name} {value!r} (expected one of {', '.join(map(repr, choices))})")


# ------------------------------------------------------------------------------------------------
# 1. Unicode and whitespace normalisation

UNICODE_FORMS = ("NFC", "NFKC")
# The line boundaries of str.splitlines, all made "\n".
_LINE_BREAK = re.compile("\r\n|[\r\v\f\x1c-\x1e\x85\u2028\u2029]")
# Control characters other than tab and newline, and invisible format characters: soft hyphen, zero-width
# space, word joiner, invisible operators, BOM, direction marks and bidi overrides (these can make text
# read differently from what it is). ZWJ/ZWNJ (U+200C/D) stay: emoji sequences and Persian and Indic
# spelling depend on them.
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u00ad\u180e\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]"
)
_INNER_SPACE_RUN = re.compile(r"(?<=\S)[^\S\n]{2,}(?=\S)")  # inside a line only: indentation is code's syntax


def normalize_text(text: str, unicode_form: str = "NFC", max_blank_lines: int = 2) -> tuple[str, bool]:
    """Unicode normal form, "\\n" line endings, no invisible characters, tidy spaces and blank lines.

    Runs of spaces/tabs inside a line become one space; leading indentation is kept (code depends on it).
    Trailing spaces, leading blank lines and trailing whitespace of the text are removed.

    Args:
        text: one text.
        unicode_form: "NFC" (composes characters, changes no meaning) or "NFKC" (also folds compatibility
            forms: full-width letters, ligatures, superscripts, non-breaking spaces).
        max_blank_lines: longer runs of blank lines are cut to this many.
    Returns:
        (normalised text, whether it differs from `text`).
    """
    _check_choice("unicode_form", unicode_form, UNICODE_FORMS)
    out = unicodedata.normalize(unicode_form, text)
    out = _LINE_BREAK.sub("\n", out)
    out = _INVISIBLE.sub("", out)
    out = _INNER_SPACE_RUN.sub(" ", out)
    out = "\n".join(line.rstrip() for line in out.split("\n"))  # not a regex: "\s+$" is quadratic in long runs
    out = re.sub("\n" * (max_blank_lines + 2) + "+", "\n" * (max_blank_lines + 1), out)
    out = out.lstrip("\n").rstrip()
    return out, out != text


# ------------------------------------------------------------------------------------------------
# 2. Exact duplicates


def exact_key(text: str) -> str:
    """A stable hash of the text with case and whitespace differences removed (blake2b, 128 bits)."""
    canonical = " ".join(text.casefold().split())
    return hashlib.blake2b(canonical.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def find_exact_duplicates(texts: Sequence[str]) -> dict[int, int]:
    """Row -> the earlier row it duplicates, for every row but the first of each set of equal texts."""
    first: dict[str, int] = {}
    duplicate_of = {}
    for i, text in enumerate(texts):
        j = first.setdefault(exact_key(text), i)
        if j != i:
            duplicate_of[i] = j
    return duplicate_of


# ------------------------------------------------------------------------------------------------
# 3. Near duplicates: MinHash signatures (computed in numpy, equal to datasketch's "affine32" MinHash of
#    our shingle hashes) indexed by datasketch's MinHashLSH; candidate pairs verified and grouped.

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
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"near-dedup: threshold must be in (0, 1], got {threshold}")
    sig = minhash_signatures(texts, shingle, ngram, num_perm, seed)
    rows = np.flatnonzero((sig != _EMPTY).any(axis=1))
    same_as = _identical_rows(sig[rows])  # equal signatures are grouped without LSH: big buckets are quadratic
    distinct = rows[same_as == np.arange(len(rows))]
    pairs = _lsh_candidate_pairs(sig, distinct, threshold, seed)
    pairs = pairs[_estimated_jaccard(sig, pairs) >= threshold]
    identical = np.stack((rows[same_as], rows), axis=1)
    return _components(np.concatenate((identical, pairs)))


def dedup_groups(groups: list[list[int]]) -> dict[int, int]:
    """Row -> the representative it duplicates (the group's first row), for every other group member."""
    return {row: group[0] for group in groups for row in group[1:]}


def _identical_rows(sig: np.ndarray) -> np.ndarray:
    """(N,) index of the first row with the same signature as each row (itself if none earlier)."""
    key = np.zeros(len(sig), dtype=_U64)
    for column in sig.T:
        key = key * _SHINGLE_BASE + column
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    same_as = first[inverse]
    collided = ~(sig == sig[same_as]).all(axis=1)  # equal keys, different signatures: 2**-64 per pair
    same_as[collided] = np.flatnonzero(collided)
    return same_as


def _lsh_candidate_pairs(sig: np.ndarray, rows: np.ndarray, threshold: float, seed: int) -> np.ndarray:
    """(K, 2) distinct pairs (i < j) of rows that share at least one LSH band."""
    # Bands chosen to miss few true pairs (weights 0.1 FP / 0.9 FN): a missed pair is lost, while a false
    # candidate is only verified away. At threshold 0.8: 14 bands of 9, recall 0.87 at J=0.8, 0.975 at 0.85.
    lsh = MinHashLSH(threshold=threshold, num_perm=sig.shape[1], weights=(0.1, 0.9))
    with lsh.insertion_session() as session:
        for i in rows.tolist():
            session.insert(i, LeanMinHash(seed=seed, hashvalues=sig[i], scheme="affine32"), check_duplication=False)
    codes = [np.zeros(0, dtype=np.int64)]
    for table in lsh.hashtables:
        for band, count in table.itemcounts().items():
            if count > 1:
                i, j = _bucket_pairs(np.sort(np.fromiter(table.get(band), dtype=np.int64, count=count)))
                codes.append(i * len(sig) + j)  # one int per pair, to drop pairs that several bands repeat
    unique = np.unique(np.concatenate(codes))
    return np.stack((unique // len(sig), unique % len(sig)), axis=1)


def _bucket_pairs(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows of one LSH bucket to verify: all of them, or in a bucket larger than _MAX_BUCKET
    (templated texts) each row with the first and with the next, so the work stays linear."""
    if len(members) <= _MAX_BUCKET:
        i, j = np.triu_indices(len(members), 1)
        return members[i], members[j]
    rest = members[1:]
    return np.concatenate((np.full(len(rest), members[0]), members[:-1])), np.concatenate((rest, rest))


def _estimated_jaccard(sig: np.ndarray, pairs: np.ndarray, block: int = 65536) -> np.ndarray:
    """(K,) share of equal signature values of each pair, in blocks to bound memory."""
    parts = [np.zeros(0)]
    for lo in range(0, len(pairs), block):
        i, j = pairs[lo : lo + block].T
        parts.append((sig[i] == sig[j]).mean(axis=1))
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


# ------------------------------------------------------------------------------------------------
# 4. Personal data: each match is checked before it is replaced by a typed placeholder.

PII_KINDS = ("API_KEY", "EMAIL", "IBAN", "CREDIT_CARD", "IP", "PHONE")
_VERSION_BEFORE = re.compile(r"(?i)\b(?:v|ver|version|release)\.?\s*$")
_ISBN_BEFORE = re.compile(r"(?i)\bisbn(?:-1[03])?:?\s*$")
_DATE_START = re.compile(r"\d{1,4}[-./]\d{1,2}[-./]\d{2,4}(?!\d)")


@dataclass(frozen=True)
class _PiiRule:
    """Matches of `pattern` whose group "pii" passes `is_valid` become `[kind]`."""

    kind: str
    pattern: re.Pattern
    is_valid: Callable[[re.Match], bool] = lambda m: True
    # Cheap pre-checks (re scans are slow, ~30 us per 1000 characters): skip the rule unless one of
    # `needs` occurs in the text and it has at least `min_digits` ASCII digits.
    needs: tuple[str, ...] = ()
    min_digits: int = 0


def _preceded_by(m: re.Match, context: re.Pattern) -> bool:
    return bool(context.search(m.string, max(0, m.start("pii") - 20), m.start("pii")))


def _digits(s: str) -> str:
    return re.sub(r"\D", "", s)


def _luhn_ok(digits: str) -> bool:
    """The Luhn checksum of card numbers: double every second digit from the right; the sum ends in 0."""
    total = 0
    for i, d in enumerate(map(int, reversed(digits))):
        total += d if i % 2 == 0 else (2 * d if d < 5 else 2 * d - 9)
    return total % 10 == 0


def _card_ok(m: re.Match) -> bool:
    digits = _digits(m["pii"])
    return 13 <= len(digits) <= 19 and _luhn_ok(digits) and not _preceded_by(m, _ISBN_BEFORE)


def _iban_ok(m: re.Match) -> bool:
    """ISO 13616: 15-34 characters, check digits 02-98, and (rest + country + check) as a number mod 97 == 1."""
    iban = m["pii"].replace(" ", "")
    if not (15 <= len(iban) <= 34 and 2 <= int(iban[2:4]) <= 98):
        return False
    return int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 == 1


def _ipv4_ok(m: re.Match) -> bool:
    """Octets 0-255 without leading zeros, and not a version number ("v1.2.3.4", "version 1.2.3.4")."""
    try:
        ipaddress.IPv4Address(m["pii"])
    except ValueError:
        return False
    return not _preceded_by(m, _VERSION_BEFORE)


def _ipv6_ok(m: re.Match) -> bool:
    """A valid IPv6 address with a digit in it ("abc::def" or "::" are more often code than addresses)."""
    try:
        ipaddress.IPv6Address(m["pii"])
    except ValueError:
        return False
    return any(c.isdigit() for c in m["pii"])


def _phone_ok(m: re.Match) -> bool:
    """8-15 digits for +international numbers (E.164), 9-12 for national ones with a trunk 0, not a date."""
    phone, digits = m["pii"], _digits(m["pii"])
    if _DATE_START.match(phone) or _preceded_by(m, _ISBN_BEFORE):
        return False
    if phone.startswith("+"):
        return 8 <= len(digits) <= 15
    return 9 <= len(digits) <= 12 if phone.lstrip("(").startswith("0") else len(digits) in (10, 11)


_API_KEY_PREFIXES = ("sk-", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "AKIA", "ASIA", "xox", "hf_", "eyJ")
_PII_RULES = (  # in this order: a key may hold digit runs, and phones are the loosest shape
    _PiiRule("API_KEY", re.compile(
        r"(?i:authorization)[\"']?\s*[:=]\s*[\"']?(?i:bearer)\s+(?P<pii>[A-Za-z0-9._~+/-]{20,}=*)"),
        needs=("earer", "EARER")),
    _PiiRule("API_KEY", re.compile(
        r"(?<![\w-])(?P<pii>sk-[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic-style secret keys
        r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_\w{30,}"  # GitHub tokens
        r"|(?:AKIA|ASIA)[0-9A-Z]{16}"  # AWS access key ids
        r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
        r"|hf_[A-Za-z0-9]{30,}"  # Hugging Face
        r"|eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]{8,}"  # JWT: base64url header.payload.signature
        r")(?![\w-])"), needs=_API_KEY_PREFIXES),
    _PiiRule("EMAIL", re.compile(
        r"(?<![\w.%+-])(?<!\w')(?P<pii>\w[\w.%+'-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,})"
        r"(?![\w-])"), needs=("@",)),
    _PiiRule("IBAN", re.compile(r"(?<!\w)(?P<pii>[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?)(?!\w)"),
             _iban_ok, min_digits=2),
    # contiguous, in fours (4-4-4-4, 4-4-4-4-3 ...), or Amex/Diners 4-6-5 / 4-6-4: ISBN-style groups are not cards
    _PiiRule("CREDIT_CARD", re.compile(
        r"(?<![\w+.,-])(?P<pii>\d{13,19}|\d{4}(?:[ -]\d{4}){2,3}(?:[ -]\d{1,4})?|\d{4}[ -]\d{6}[ -]\d{4,5})"
        r"(?![\w-]|[.,]\d)"), _card_ok, min_digits=13),
    _PiiRule("IP", re.compile(
        r"(?<![\w:.])(?P<pii>(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?)(?![\w:]|\.\d)"),
        _ipv6_ok, needs=(":",), min_digits=1),
    # not inside a longer dotted run (1.2.3.4.5) nor glued to letters or digits
    _PiiRule("IP", re.compile(r"(?<![\w.])(?P<pii>\d{1,3}(?:\.\d{1,3}){3})(?!\w|\.\d)"), _ipv4_ok,
             needs=(".",), min_digits=4),
    _PiiRule("PHONE", re.compile(
        r"(?<![\w+./-])(?<!\d[ .])(?P<pii>"
        r"\+\d{1,3}(?:[ .-]?(?:\(\d{1,4}\)|\d{1,8})){1,6}"  # +44 20 7946 0958, +1 (555) 123-4567
        r"|(?:\(0\d{1,4}\)|0\d{1,4})(?:[ -]\d{2,8}){1,4}"  # national with trunk 0: 020 7946 0958
        r"|(?:1[ .-])?(?:\([2-9]\d{2}\) ?|[2-9]\d{2}[ .-])\d{3}[ .-]\d{4}"  # North American: (555) 123-4567
        r")(?![\w-]|[ .-]?\d|[.:]\d)"), _phone_ok, min_digits=8),
)


def scrub_pii(text: str, kinds: Sequence[str] = PII_KINDS) -> tuple[str, dict[str, int]]:
    """Replace personal data and secrets by typed placeholders: `[EMAIL]`, `[PHONE]`, `[IP]`, `[CREDIT_CARD]`,
    `[IBAN]`, `[API_KEY]`.

    Shapes are checked before replacing, so near-misses stay: card numbers must pass Luhn, IBANs mod 97;
    IPv4 octets are 0-255 without leading zeros and the quad is neither part of a longer dotted run nor
    after "v"/"version"/"release"; IPv6 needs a digit; phones need a "+" country code, a trunk "0" with
    separated groups, or the North American 3-3-4 shape (bare digit runs, dates, times, ZIP codes and
    ISBNs are not phones).
    Returns:
        (scrubbed text, {kind: placeholders inserted}) with only kinds that occurred.
    """
    for kind in kinds:
        _check_choice("PII kind", kind, PII_KINDS)
    num_digits = sum(map(text.count, "0123456789"))  # replacing only removes digits: stays an upper bound
    counts: Counter[str] = Counter()
    for rule in _PII_RULES:
        if rule.kind in kinds and num_digits >= rule.min_digits and _has_any(text, rule.needs):
            text, counts[rule.kind] = _apply_rule(rule, text, counts[rule.kind])
    return text, {kind: n for kind, n in counts.items() if n}


def _has_any(text: str, needs: tuple[str, ...]) -> bool:
    return not needs or any(map(text.__contains__, needs))


def _apply_rule(rule: _PiiRule, text: str, count: int) -> tuple[str, int]:
    def swap(m: re.Match) -> str:
        nonlocal count
        if not rule.is_valid(m):
            return m[0]
        count += 1
        start, end = m.start("pii") - m.start(), m.end("pii") - m.start()
        return m[0][:start] + f"[{rule.kind}]" + m[0][end:]

    return rule.pattern.sub(swap, text), count


# ------------------------------------------------------------------------------------------------
# 5. Quality filters

BASIC_PUNCTUATION = ".,;:!?¿¡'\"()[]-‐–—…‘’“”„«»"
_TEXT_RUN = re.compile(r"[^\W\d_]+|\s+|[" + re.escape(BASIC_PUNCTUATION) + "]+")  # letters, spaces, punctuation


@dataclass(frozen=True)
class QualityLimits:
    """Thresholds of the quality filter; None turns a check off. Ratios are shares in [0, 1]."""

    min_chars: int | None = 1
    max_chars: int | None = None
    min_words: int | None = None
    max_words: int | None = None
    max_repeated_line_ratio: float | None = 0.3
    max_repeated_ngram_ratio: float | None = 0.2
    repeated_ngram_size: int = 5
    max_non_text_ratio: float | None = 0.5


def repeated_line_ratio(text: str) -> float:
    """Share of the non-blank lines that repeat an earlier line (whitespace at the ends ignored)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


def repeated_ngram_ratio(text: str, n: int = 5) -> float:
    """Share of word characters covered by word n-grams that occur more than once (Gopher's duplicate
    n-gram fraction; each word counted once however many repeats cover it)."""
    words = text.split()
    grams = list(zip(*(words[k:] for k in range(n))))
    counts = Counter(grams)
    if len(counts) == len(grams):
        return 0.0
    covered = [False] * len(words)
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i : i + n] = [True] * n
    return sum(len(w) for w, c in zip(words, covered) if c) / sum(map(len, words))


def non_text_ratio(text: str) -> float:
    """Share of characters that are not letters (with their combining marks), whitespace or basic
    punctuation: digits, symbols, markup and code count as non-text."""
    if not text:
        return 0.0
    rest = _TEXT_RUN.sub("", text)
    return sum(not unicodedata.category(c).startswith("M") for c in rest) / len(text)


def quality_problem(text: str, limits: QualityLimits = QualityLimits()) -> str | None:
    """Why the text fails the quality limits, as "check: detail", or None when it passes."""
    num_words = len(text.split())
    problem = _outside("chars", len(text), limits.min_chars, limits.max_chars) or _outside(
        "words", num_words, limits.min_words, limits.max_words
    )
    if problem:
        return problem
    ratios = (
        ("repeated_lines", limits.max_repeated_line_ratio, repeated_line_ratio, "of lines repeat an earlier line"),
        ("repeated_ngrams", limits.max_repeated_ngram_ratio,
         lambda t: repeated_ngram_ratio(t, limits.repeated_ngram_size),
         f"of characters are in repeated {limits.repeated_ngram_size}-grams"),
        ("non_text", limits.max_non_text_ratio, non_text_ratio,
         "of characters are not letters, whitespace or basic punctuation"),
    )
    for check, limit, measure, what in ratios:
        if limit is not None and (value := measure(text)) > limit:
            return f"{check}: {value:.0%} {what} (max {limit:.0%})"
    return None


def _outside(unit: str, value: int, low: int | None, high: int | None) -> str | None:
    if low is not None and value < low:
        return f"min_{unit}: {value} {unit} < {low}"
    if high is not None and value > high:
        return f"max_{unit}: {value} {unit} > {high}"
    return None


# ------------------------------------------------------------------------------------------------
# 6. Driver

STEPS = ("normalize", "pii", "quality", "exact_dedup", "near_dedup")
NEAR_DEDUP_MODES = ("off", "group", "drop")


@dataclass(frozen=True)
class CleanSteps:
    """Which cleaning steps run, with their settings. Content-changing and probabilistic steps are off
    unless asked for.

    near_dedup: "off"; "group" finds near-duplicate groups and keeps every row (so that a split can keep
    each group on one side); "drop" also keeps only the first row of each group.
    """

    normalize: bool = True
    unicode_form: str = "NFC"
    max_blank_lines: int = 2
    pii: bool = False
    pii_kinds: tuple[str, ...] = PII_KINDS
    quality: QualityLimits | None = None
    exact_dedup: bool = True
    near_dedup: str = "off"
    near_threshold: float = 0.8
    shingle: str = "word"
    ngram: int = 5
    num_perm: int = 128
    seed: int = 1

    def __post_init__(self) -> None:
        for name, ok, expected in (
            ("max_blank_lines", self.max_blank_lines >= 0, ">= 0"),
            ("near_threshold", 0.0 < self.near_threshold <= 1.0, "in (0, 1]"),
            ("ngram", self.ngram >= 1, ">= 1"),
            ("num_perm", self.num_perm >= 2, ">= 2"),
        ):
            if not ok:
                raise ConfigError(f"clean: {name} must be {expected}, got {getattr(self, name)!r}")
        _check_choice("unicode_form", self.unicode_form, UNICODE_FORMS)
        _check_choice("near_dedup", self.near_dedup, NEAR_DEDUP_MODES)
        _check_choice("shingle", self.shingle, SHINGLES)
        for kind in self.pii_kinds:
            _check_choice("PII kind", kind, PII_KINDS)


@dataclass
class StepCount:
    changed: int = 0
    removed: int = 0


@dataclass
class CleanReport:
    """What each step did: rows changed and removed, placeholders by kind, why each removed row went."""

    num_rows: int
    steps: dict[str, StepCount] = field(default_factory=lambda: {step: StepCount() for step in STEPS})
    pii: dict[str, int] = field(default_factory=dict)  # placeholders inserted, by kind
    quality: dict[str, int] = field(default_factory=dict)  # rows dropped, by failed check
    removed: dict[int, str] = field(default_factory=dict)  # row -> reason
    duplicate_of: dict[int, int] = field(default_factory=dict)  # removed duplicate row -> row kept
    near_groups: list[list[int]] = field(default_factory=list)  # original row indices

    @property
    def num_kept(self) -> int:
        return self.num_rows - len(self.removed)

    def group_ids(self, rows: Sequence[int]) -> list[int | None]:
        """The near-duplicate group (index into near_groups) of each row, or None: what a split keeps whole."""
        group_of = {row: g for g, group in enumerate(self.near_groups) for row in group}
        return [group_of.get(row) for row in rows]

    def summary(self) -> str:
        """A few lines for the log."""
        lines = [f"cleaning: kept {self.num_kept} of {self.num_rows} rows"]
        for step, c in self.steps.items():
            if c.changed or c.removed:
                lines.append(f"  {step}: {c.changed} changed, {c.removed} removed")
        if self.pii:
            lines.append("  PII replaced: " + ", ".join(f"{k} {n}" for k, n in sorted(self.pii.items())))
        if self.quality:
            lines.append("  quality drops: " + ", ".join(f"{k} {n}" for k, n in sorted(self.quality.items())))
        if self.near_groups:
            lines.append(f"  near-duplicate groups: {len(self.near_groups)} "
                         f"({sum(map(len, self.near_groups))} rows)")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return asdict(self)


def clean_texts(texts: Sequence[str], steps: CleanSteps = CleanSteps()) -> tuple[list[int], list[str], CleanReport]:
    """Run the chosen steps in order: normalise -> PII -> quality -> exact dedup -> near dedup.

    Returns:
        kept: indices of the rows that survive, ascending.
        new_texts: the cleaned text of every row (removed rows included), aligned with `texts`.
        report: counts per step and the reason for every removed row.
    """
    report = CleanReport(len(texts))
    new_texts = list(texts)
    if steps.normalize:
        _run_normalize(new_texts, steps, report)
    if steps.pii:
        _run_pii(new_texts, steps, report)
    kept = list(range(len(texts)))
    if steps.quality is not None:
        kept = _run_quality(new_texts, kept, steps.quality, report)
    if steps.exact_dedup:
        kept = _drop_duplicates(kept, find_exact_duplicates([new_texts[i] for i in kept]), "exact_dedup", report)
    if steps.near_dedup != "off":
        kept = _run_near_dedup(new_texts, kept, steps, report)
    return kept, new_texts, report


def _run_normalize(texts: list[str], steps: CleanSteps, report: CleanReport) -> None:
    for i, text in enumerate(texts):
        texts[i], changed = normalize_text(text, steps.unicode_form, steps.max_blank_lines)
        report.steps["normalize"].changed += changed


def _run_pii(texts: list[str], steps: CleanSteps, report: CleanReport) -> None:
    for i, text in enumerate(texts):
        texts[i], counts = scrub_pii(text, steps.pii_kinds)
        report.steps["pii"].changed += bool(counts)
        for kind, n in counts.items():
            report.pii[kind] = report.pii.get(kind, 0) + n


def _run_quality(texts: list[str], rows: list[int], limits: QualityLimits, report: CleanReport) -> list[int]:
    kept = []
    for i in rows:
        problem = quality_problem(texts[i], limits)
        if problem is None:
            kept.append(i)
            continue
        check = problem.split(":")[0]
        report.quality[check] = report.quality.get(check, 0) + 1
        report.removed[i] = f"quality: {problem}"
        report.steps["quality"].removed += 1
    return kept


def _run_near_dedup(texts: list[str], rows: list[int], steps: CleanSteps, report: CleanReport) -> list[int]:
    groups = near_duplicate_groups(
        [texts[i] for i in rows], steps.near_threshold, steps.shingle, steps.ngram, steps.num_perm, steps.seed
    )
    report.near_groups = [[rows[j] for j in group] for group in groups]
    if steps.near_dedup == "group":
        return rows
    return _drop_duplicates(rows, dedup_groups(groups), "near_dedup", report)


def _drop_duplicates(rows: list[int], duplicate_of: dict[int, int], step: str, report: CleanReport) -> list[int]:
    """Remove rows[j] for each local duplicate j -> k, recording original indices."""
    for j, k in duplicate_of.items():
        report.removed[rows[j]] = f"{step}: duplicate of row {rows[k]}"
        report.duplicate_of[rows[j]] = rows[k]
    report.steps[step].removed += len(duplicate_of)
    return [row for j, row in enumerate(rows) if j not in duplicate_of]

