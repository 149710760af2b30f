"""Cleaning steps (tunesmith.data.clean): golden inputs whose right answer is known by hand.

Normalisation, exact and near duplicates, personal-data placeholders (with the near-misses that must stay),
quality filters (one passing and one failing row per check) and the driver's report.
"""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
from datasketch import LeanMinHash, MinHash

from tunesmith.data.clean import CleanSteps, clean_texts
from tunesmith.data.dedup import (
    _components,
    _shingle_hashes,
    _token_hashes,
    dedup_groups,
    exact_key,
    find_exact_duplicates,
    minhash_signatures,
    near_duplicate_groups,
)
from tunesmith.data.normalize import normalize_text
from tunesmith.data.pii import scrub_pii
from tunesmith.data.quality import (
    QualityLimits,
    non_text_ratio,
    quality_problem,
    repeated_line_ratio,
    repeated_ngram_ratio,
)
from tunesmith.errors import ConfigError

VOCAB = [f"{a}{b}{c}" for a in "bcdfgklmnprstvz" for b in "aeiou" for c in "bdgklmnprstxz"]  # 975 words


def random_text(seed: int, num_words: int = 150) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(VOCAB) for _ in range(num_words))


def change_words(text: str, positions: list[int]) -> str:
    words = text.split()
    for p in positions:
        words[p] = "changed"
    return " ".join(words)


# ------------------------------------------------------------------------------------------------
# Normalisation


@pytest.mark.parametrize(
    "text, expected",
    [
        ("cafe\u0301", "caf\u00e9"),  # NFC composes e + combining acute
        ("a\u200bb\x07c\ufeffd\u00ade\u202eF", "abcdeF"),  # zero-width, bell, BOM, soft hyphen, bidi override
        ("a\r\nb\rc\u2028d\x0ce", "a\nb\nc\nd\ne"),  # every line break becomes \n
        ("a  \t b\tc", "a b\tc"),  # runs collapse; a single tab stays (TSV)
        ("def f():\n    return  1", "def f():\n    return 1"),  # indentation kept
        ("one   \ntwo\t\n", "one\ntwo"),  # trailing spaces, trailing newline
        ("\n\n  x", "  x"),  # leading blank lines go, first-line indentation stays
        ("a\n\n\n\n\n\nb", "a\n\n\nb"),  # at most 2 blank lines
        ("a\n \n\t\n  \n\nb", "a\n\n\nb"),  # whitespace-only lines are blank lines
    ],
)
def test_normalize_golden(text, expected):
    assert normalize_text(text) == (expected, True)


def test_normalize_keeps_joiners_and_reports_no_change():
    emoji = "\U0001f469\u200d\U0001f4bb and \u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # ZWJ, ZWNJ
    assert normalize_text(emoji) == (emoji, False)
    assert normalize_text("Tab\tseparated\nlines") == ("Tab\tseparated\nlines", False)


def test_normalize_nfkc_and_blank_line_limit():
    assert normalize_text("\uff46\uff55\uff4c\uff4c \ufb01 x\u00b2", "NFKC") == ("full fi x2", True)
    assert normalize_text("\uff46\uff55\uff4c\uff4c", "NFC") == ("\uff46\uff55\uff4c\uff4c", False)
    assert normalize_text("a\n\n\nb", max_blank_lines=0) == ("a\nb", True)
    with pytest.raises(ConfigError, match="unicode_form 'NFD'"):
        normalize_text("x", "NFD")


# ------------------------------------------------------------------------------------------------
# Exact duplicates


def test_exact_duplicates_ignore_case_and_whitespace():
    texts = ["Hello  World", "hello world", "HELLO\nWORLD ", "hello, world", "\thello world"]
    assert find_exact_duplicates(texts) == {1: 0, 2: 0, 4: 0}  # the comma makes row 3 different


def test_exact_key_is_a_stable_blake2b():
    assert exact_key(" Hello\n WORLD") == hashlib.blake2b(b"hello world", digest_size=16).hexdigest()


# ------------------------------------------------------------------------------------------------
# Near duplicates


def test_planted_near_duplicate_is_grouped_and_unrelated_is_not():
    base = random_text(0)
    texts = [base, random_text(1), change_words(base, [10, 70, 130]), random_text(2)]
    assert near_duplicate_groups(texts) == [[0, 2]]


def test_near_duplicates_ignore_case_and_punctuation():
    base = random_text(3)
    shouted = base.upper().replace(" ", ", ", 5)
    assert near_duplicate_groups([random_text(4), base, shouted]) == [[1, 2]]


def test_char_shingles_group_spelling_variants():
    a = "The colour of the harbour was grey, and the neighbours organised a festival in the centre of town."
    b = "The color of the harbor was gray, and the neighbors organized a festival in the center of town."
    # Jaccard of character 3-grams: 0.70; of word 3-grams: 0.07
    assert near_duplicate_groups([a, b], threshold=0.6, shingle="char", ngram=3) == [[0, 1]]
    assert near_duplicate_groups([a, b], threshold=0.6, shingle="word", ngram=3) == []


def test_groups_are_connected_components_over_verified_pairs():
    assert _components(np.array([[1, 2], [5, 6], [2, 0], [6, 9]])) == [[0, 1, 2], [5, 6, 9]]
    assert dedup_groups([[0, 1, 2], [5, 6, 9]]) == {1: 0, 2: 0, 6: 5, 9: 5}


def test_identical_and_empty_texts():
    texts = ["", "same short text", "   ", "same short text", "\n", "Same short TEXT"]
    assert near_duplicate_groups(texts) == [[1, 3, 5]]  # texts without words never group


def test_groups_cross_chunk_boundaries_and_scale():
    texts = [random_text(seed, 60) for seed in range(1000)]
    texts[999] = change_words(texts[3], [30])  # far apart: hashed in different chunks
    texts[600] = texts[500]
    assert near_duplicate_groups(texts) == [[3, 999], [500, 600]]


def test_large_lsh_bucket_of_templated_texts_is_one_group():
    base = random_text(11, 100).split()
    texts = [" ".join(base[:k] + ["slot"] + base[k + 1 :]) for k in range(300)]  # > _MAX_BUCKET rows
    assert near_duplicate_groups(texts + [random_text(12)]) == [list(range(300))]


def test_signatures_equal_datasketch_minhash_of_the_shingles():
    text = "Alpha beta, gamma delta! epsilon zeta eta theta"
    tokens, text_of = _token_hashes([text.casefold()], "word")
    hashes, _ = _shingle_hashes(tokens, text_of, 3)
    assert len(hashes) == 8 - 3 + 1
    reference = MinHash(num_perm=64, seed=7, hashfunc=int)
    reference.update_batch(hashes.tolist())
    ours = minhash_signatures([text], ngram=3, num_perm=64, seed=7)[0]
    np.testing.assert_array_equal(ours, reference.hashvalues)


def test_signature_agreement_estimates_jaccard_of_shingle_sets():
    base = random_text(5)
    other = change_words(base, list(range(0, 150, 15)))  # 10 words changed: about 40% of 5-grams differ
    sets = []
    for text in (base, other):
        tokens, text_of = _token_hashes([text], "word")
        sets.append(set(_shingle_hashes(tokens, text_of, 5)[0].tolist()))
    exact = len(sets[0] & sets[1]) / len(sets[0] | sets[1])
    sig = minhash_signatures([base, other], num_perm=256)
    a, b = (LeanMinHash(seed=1, hashvalues=row, scheme="affine32") for row in sig)
    assert a.jaccard(b) == pytest.approx(exact, abs=0.1)
    assert near_duplicate_groups([base, other], threshold=exact + 0.15) == []


def test_word_hashes_do_not_depend_on_position_or_neighbours():
    tokens, text_of = _token_hashes(["hello world", "say hello", "", "héllo"], "word")
    assert text_of.tolist() == [0, 0, 1, 1, 3]
    assert tokens[0] == tokens[3] and tokens[0] != tokens[4]


def test_near_dedup_is_deterministic_and_seeded():
    texts = [random_text(s, 40) for s in range(50)]
    np.testing.assert_array_equal(minhash_signatures(texts), minhash_signatures(texts))
    assert not np.array_equal(minhash_signatures(texts, seed=1), minhash_signatures(texts, seed=2))
    with pytest.raises(ConfigError, match="threshold"):
        near_duplicate_groups(texts, threshold=1.5)
    with pytest.raises(ConfigError, match="shingle 'line'"):
        near_duplicate_groups(texts, shingle="line")


# ------------------------------------------------------------------------------------------------
# Personal data

REPLACED = [
    # e-mail
    ("Write to <john.doe@example.com>.", "Write to <[EMAIL]>.", "EMAIL"),
    ("mailto:jane.o'neil+tag@mail.example.co.uk, thanks", "mailto:[EMAIL], thanks", "EMAIL"),
    ("quoted 'bob_99@example.com' and \"ann@x.io\"", "quoted '[EMAIL]' and \"[EMAIL]\"", "EMAIL"),
    # phone numbers
    ("Call +44 20 7946 0958 today", "Call [PHONE] today", "PHONE"),
    ("US: +1 (555) 123-4567.", "US: [PHONE].", "PHONE"),
    ("office (555) 123-4567 or 555.123.4567", "office [PHONE] or [PHONE]", "PHONE"),
    ("toll free 1-800-555-0199", "toll free [PHONE]", "PHONE"),
    ("London 020 7946 0958, Paris 06 12 34 56 78", "London [PHONE], Paris [PHONE]", "PHONE"),
    ("Berlin +49 30 12345678", "Berlin [PHONE]", "PHONE"),
    # IP addresses
    ("host 192.168.0.1 answered", "host [IP] answered", "IP"),
    ("proxy 10.0.0.255:8080.", "proxy [IP]:8080.", "IP"),
    ("ipv6 2001:db8::1 and ::1", "ipv6 [IP] and [IP]", "IP"),
    ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334.", "full [IP].", "IP"),
    ("mapped ::ffff:192.168.0.1 here", "mapped [IP] here", "IP"),
    # credit cards (Luhn-valid test numbers)
    ("card 4111 1111 1111 1111 exp 12/27", "card [CREDIT_CARD] exp 12/27", "CREDIT_CARD"),
    ("mc 5555-5555-5555-4444", "mc [CREDIT_CARD]", "CREDIT_CARD"),
    ("amex 378282246310005 and 3782 822463 10005", "amex [CREDIT_CARD] and [CREDIT_CARD]", "CREDIT_CARD"),
    # IBANs (mod-97 valid)
    ("pay to GB82 WEST 1234 5698 7654 32 now", "pay to [IBAN] now", "IBAN"),
    ("DE89370400440532013000", "[IBAN]", "IBAN"),
    ("FR14 2004 1010 0505 0001 3M02 606.", "[IBAN].", "IBAN"),
    # API keys and tokens
    ("OPENAI_API_KEY=sk-proj-abcDEF1234567890abcdef12", "OPENAI_API_KEY=[API_KEY]", "API_KEY"),
    ("token ghp_" + "A1b2" * 9, "token [API_KEY]", "API_KEY"),
    ("aws AKIAIOSFODNN7EXAMPLE key", "aws [API_KEY] key", "API_KEY"),
    ("slack xoxb-123456789012-abcdefABCDEF", "slack [API_KEY]", "API_KEY"),
    ("HF_TOKEN=hf_" + "abcdEFGH" * 4 + "xy", "HF_TOKEN=[API_KEY]", "API_KEY"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dBjftJeZ4CVPmB92K27uhbUJU1p1r", "jwt [API_KEY]", "API_KEY"),
    ("Authorization: Bearer abc.DEF-123_456~789+xyz/0123=", "Authorization: Bearer [API_KEY]", "API_KEY"),
    ('{"authorization": "bearer 0123456789abcdefghij0123"}', '{"authorization": "bearer [API_KEY]"}', "API_KEY"),
]


@pytest.mark.parametrize("text, expected, kind", REPLACED)
def test_pii_replaced(text, expected, kind):
    out, counts = scrub_pii(text)
    assert out == expected
    assert counts == {kind: expected.count(f"[{kind}]")}


KEPT = [
    "card 4111 1111 1111 1112 fails Luhn",  # 16 digits, wrong check digit
    "card 1234567890123456",
    "iban GB83 WEST 1234 5698 7654 32 has wrong check digits",
    "upgrade to version 1.2.3.4 now",  # a version, not an address
    "release v1.2.3.4 and build 1.2.3.4.5",
    "octets 999.1.1.1 and 256.0.0.1 are too big",
    "leading zeros 010.001.001.001",
    "on 2024-01-15 at 12:30:45 (15.01.2024, 01/15/2024)",
    "ZIP 10115, room 42, ext. 1234",
    "ISBN 978-3-16-148410-0 and ISBN 0-306-40615-2",
    "order 123456789, invoice 2024-000123, ref 100-200-3000",
    "meeting 05-01-2024 12:30",
    "std::vector<int> and Foo::Bar and abc::def",
    "MAC 00:1a:2b:3c:4d:5e",
    "pip install scikit-learn; sk-learn is not a key; hf_hub_download(); AKIA123",
    "Authorization: Bearer short",
    "user@localhost and @handle and a@b",
    "3.14159265358979323846 is pi",
]


@pytest.mark.parametrize("text", KEPT)
def test_pii_near_misses_kept(text):
    assert scrub_pii(text) == (text, {})


def test_pii_kinds_subset_and_counts():
    text = "mail a.b@example.com or c@example.org, call +44 20 7946 0958 from 192.168.0.1"
    assert scrub_pii(text) == (
        "mail [EMAIL] or [EMAIL], call [PHONE] from [IP]", {"EMAIL": 2, "PHONE": 1, "IP": 1}
    )
    assert scrub_pii(text, kinds=("EMAIL",)) == (
        "mail [EMAIL] or [EMAIL], call +44 20 7946 0958 from 192.168.0.1", {"EMAIL": 2}
    )
    with pytest.raises(ConfigError, match="PII kind 'SSN'"):
        scrub_pii(text, kinds=("SSN",))


# ------------------------------------------------------------------------------------------------
# Quality filters


def test_repeated_line_ratio_golden():
    assert repeated_line_ratio("x\ny\n x\n\nx") == 2 / 4  # blank line ignored, " x" equals "x"
    assert repeated_line_ratio("a\nb\nc") == 0.0
    assert repeated_line_ratio("") == 0.0


def test_repeated_ngram_ratio_golden():
    # "the cat" repeats: words 0, 1, 6, 7 (12 of 26 word characters)
    assert repeated_ngram_ratio("the cat sat on the mat the cat ran", 2) == pytest.approx(12 / 26)
    assert repeated_ngram_ratio("a b c a b c", 3) == 1.0
    assert repeated_ngram_ratio("one two three four", 2) == 0.0
    assert repeated_ngram_ratio("short", 5) == 0.0


def test_non_text_ratio_golden():
    assert non_text_ratio("Hello, world! \u201cQuoted\u201d \u2014 yes\u2026") == 0.0
    assert non_text_ratio("\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e") == 0.0
    assert non_text_ratio("abc 123") == pytest.approx(3 / 7)
    assert non_text_ratio("$$$ a") == pytest.approx(3 / 5)
    assert non_text_ratio("") == 0.0


@pytest.mark.parametrize(
    "limits, passing, failing, reason",
    [
        (QualityLimits(min_chars=10), "long enough", "short", "min_chars: 5 chars < 10"),
        (QualityLimits(max_chars=10), "short", "far too long", "max_chars: 12 chars > 10"),
        (QualityLimits(min_words=3), "one two three", "one two", "min_words: 2 words < 3"),
        (QualityLimits(max_words=2), "one two", "one two three", "max_words: 3 words > 2"),
        (QualityLimits(max_repeated_line_ratio=0.3), "a\nb\nc\nd", "spam\nspam\nspam\nham",
         "repeated_lines: 50% of lines repeat an earlier line (max 30%)"),
        (QualityLimits(max_repeated_ngram_ratio=0.2, repeated_ngram_size=3),
         "the quick brown fox jumps over the lazy dog", "buy now buy now buy now buy now",
         "repeated_ngrams: 100% of characters are in repeated 3-grams (max 20%)"),
        (QualityLimits(max_non_text_ratio=0.5), "Plain words, mostly letters.", "{}#$ 1234 ab",  # 8 of 12
         "non_text: 67% of characters are not letters, whitespace or basic punctuation (max 50%)"),
    ],
)
def test_quality_filters(limits, passing, failing, reason):
    assert quality_problem(passing, limits) is None
    assert quality_problem(failing, limits) == reason


def test_quality_defaults_drop_only_empty_and_junk():
    assert quality_problem("A normal sentence about cats.") is None
    assert quality_problem("") == "min_chars: 0 chars < 1"
    assert quality_problem("\n".join(["same line"] * 5)).startswith("repeated_lines:")


# ------------------------------------------------------------------------------------------------
# Driver


def test_clean_texts_runs_steps_in_order_and_reports():
    base = random_text(7)
    texts = [
        "Contact  me at  bob@example.com ",  # 0: normalised and scrubbed
        base,  # 1
        "contact me at bob@example.com",  # 2: exact duplicate of 0 once both are scrubbed
        "x",  # 3: too short
        change_words(base, [20, 90]),  # 4: near duplicate of 1
        random_text(8),  # 5
        "Call 555-123-4567\r\n\r\n\r\n\r\nbye",  # 6
    ]
    steps = CleanSteps(pii=True, quality=QualityLimits(min_chars=5), near_dedup="drop")
    kept, new_texts, report = clean_texts(texts, steps)
    assert kept == [0, 1, 5, 6]
    assert new_texts[0] == "Contact me at [EMAIL]"
    assert new_texts[2] == "contact me at [EMAIL]"
    assert new_texts[6] == "Call [PHONE]\n\n\nbye"
    assert {s: (c.changed, c.removed) for s, c in report.steps.items()} == {
        "normalize": (2, 0), "pii": (3, 0), "quality": (0, 1), "exact_dedup": (0, 1), "near_dedup": (0, 1),
    }
    assert report.pii == {"EMAIL": 2, "PHONE": 1}
    assert report.quality == {"min_chars": 1}
    assert report.removed == {
        3: "quality: min_chars: 1 chars < 5",
        2: "exact_dedup: duplicate of row 0",
        4: "near_dedup: duplicate of row 1",
    }
    assert report.duplicate_of == {2: 0, 4: 1}
    assert report.near_groups == [[1, 4]]
    assert report.num_kept == 4
    assert "kept 4 of 7 rows" in report.summary()
    json.dumps(report.to_dict())


def test_near_dedup_group_mode_keeps_rows_and_maps_indices():
    base = random_text(9)
    texts = ["dup", "dup", base, random_text(10), change_words(base, [5])]
    kept, _, report = clean_texts(texts, CleanSteps(near_dedup="group"))
    assert kept == [0, 2, 3, 4]
    assert report.near_groups == [[2, 4]]  # original row numbers, after exact dedup removed row 1
    assert report.steps["near_dedup"].removed == 0
    assert report.group_ids(kept) == [None, 0, None, 0]


def test_clean_texts_defaults_and_bad_steps():
    kept, new_texts, report = clean_texts(["a  b", "A B", "c"])
    assert (kept, new_texts) == ([0, 2], ["a b", "A B", "c"])
    assert report.steps["pii"].changed == 0 and report.near_groups == []
    with pytest.raises(ConfigError, match="near_dedup 'yes'"):
        CleanSteps(near_dedup="yes")
    with pytest.raises(ConfigError, match="PII kind 'NAME'"):
        CleanSteps(pii_kinds=("NAME",))
    with pytest.raises(ConfigError, match=r"near_threshold must be in \(0, 1\], got 80"):
        CleanSteps(near_threshold=80)
    with pytest.raises(ConfigError, match="max_blank_lines must be >= 0"):
        CleanSteps(max_blank_lines=-1)
