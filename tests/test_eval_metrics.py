"""Eval metrics against values computed by hand: exact match, ROUGE-L, BLEU, chrF, answer extraction."""

from __future__ import annotations

import math

import pytest
import sacrebleu

from tunesmith.errors import ConfigError
from tunesmith.data.answers import exact_match, extract_answer, extract_number, normalize_answer, numeric_match
from tunesmith.eval.metrics import MeanScore, ScorerMeans, load_scorer, make_accumulator, rouge_l


def stream(name: str, predictions: list[str], references: list[str], batch: int = 1) -> float:
    acc = make_accumulator(name)
    for i in range(0, len(predictions), batch):
        acc.update(predictions[i:i + batch], references[i:i + batch])
    return acc.value()[name]


# ---------------------------------------------------------------------------------------------------- exact match


@pytest.mark.parametrize("prediction,reference,expected", [
    ("  The  Marnburg. ", "the marnburg", True),  # case, runs of spaces, trailing full stop
    ("Paris!", "paris", True),
    ("Paris, France", "Paris", False),  # only trailing punctuation goes
    ("4 2", "42", False),
])
def test_exact_match_normalisation(prediction, reference, expected):
    assert exact_match(prediction, reference) is expected


def test_exact_match_accumulates_the_share_of_matches():
    # 2 of 3 match after normalisation
    assert stream("exact_match", ["Lima.", "lima", "Paris"], ["Lima", "LIMA", "Lima"]) == pytest.approx(2 / 3)
    assert normalize_answer(" A  b. ") == "a b"


# ---------------------------------------------------------------------------------------------------- ROUGE-L


def test_rouge_l_from_the_longest_common_subsequence():
    """pred "the cat sat on the mat", ref "the cat is on the mat": LCS "the cat on the mat" = 5 words,
    P = 5/6, R = 5/6, F = 5/6.  pred "a b c d", ref "a c e": LCS "a c" = 2, P = 2/4, R = 2/3,
    F = 2PR/(P+R) = (2/3)/(7/6) = 4/7."""
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("a b c d", "a c e") == pytest.approx(4 / 7)
    assert rouge_l("The Cat!", "the cat") == pytest.approx(1.0)  # lowercased, punctuation is a separator
    assert rouge_l("", "a b") == 0.0
    assert stream("rouge_l", ["a b c d", "x"], ["a c e", "x"]) == pytest.approx((4 / 7 + 1) / 2)


# ---------------------------------------------------------------------------------------------------- BLEU


def test_bleu_by_hand():
    """hyp "a b c d e" vs ref "a b c d f": n-gram precisions 4/5, 3/4, 2/3, 1/2, equal lengths (BP = 1):
    BLEU = 100 * (0.8 * 0.75 * 2/3 * 0.5) ** (1/4) = 100 * 0.2 ** 0.25.
    hyp "a b c d" vs ref "a b c d e f": every precision 1, BP = exp(1 - 6/4)."""
    assert stream("bleu", ["a b c d e"], ["a b c d f"]) == pytest.approx(100 * 0.2 ** 0.25)
    assert stream("bleu", ["a b c d"], ["a b c d e f"]) == pytest.approx(100 * math.exp(-0.5))
    assert stream("bleu", ["the same sentence here"], ["the same sentence here"]) == pytest.approx(100.0)
    assert stream("bleu", ["x y z"], ["a b c"]) == 0.0


def test_corpus_bleu_sums_statistics_not_sentence_scores():
    """Both sentences above as one corpus: matches 8/9, 6/7, 4/5, 2/3 (summed over sentences), lengths 9 vs 11:
    BLEU = 100 * exp(1 - 11/9) * (8/9 * 6/7 * 4/5 * 2/3) ** (1/4); streamed one sentence at a time it equals
    sacrebleu's corpus_bleu on all of them at once."""
    hyps, refs = ["a b c d e", "a b c d"], ["a b c d f", "a b c d e f"]
    expected = 100 * math.exp(1 - 11 / 9) * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25
    assert stream("bleu", hyps, refs, batch=1) == pytest.approx(expected)
    assert sacrebleu.corpus_bleu(hyps, [refs]).score == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------- chrF


def test_chrf_by_hand():
    """hyp "ab" vs ref "abc" (chrF: character 1..6-grams, beta 2, P and R averaged over the orders both sides
    have): order 1 P = 2/2, R = 2/3; order 2 P = 1/1, R = 1/2; so P = 1, R = 7/12 and
    F = 5PR / (4P + R) = (35/12) / (55/12) = 7/11."""
    assert stream("chrf", ["ab"], ["abc"]) == pytest.approx(100 * 7 / 11)
    assert stream("chrf", ["same words"], ["same words"]) == pytest.approx(100.0)
    assert stream("chrf", ["xyz"], ["abc"]) == 0.0


def test_streamed_chrf_equals_corpus_chrf():
    hyps = ["the cat sat", "a dog ran far", "hello", "it is 5."]
    refs = ["the cat sat down", "the dog ran", "hello there", "It is 5."]
    expected = sacrebleu.corpus_chrf(hyps, [refs]).score
    assert stream("chrf", hyps, refs, batch=3) == pytest.approx(expected)
    assert 0 < expected < 100


def test_accumulator_state_does_not_grow():
    acc = make_accumulator("bleu")
    acc.update(["a b"], ["a b"])
    size = len(acc.stats)
    for _ in range(50):
        acc.update(["a b c", "x"], ["a b", "x y"])
    assert len(acc.stats) == size  # summed statistics, not a list of sentences


# ---------------------------------------------------------------------------------------------------- answers

SHAPES = [
    ("42", "42"),
    ("-3.5", "-3.5"),
    ("1,234", "1234"),
    ("$12", "12"),
    ("The answer is 42.", "42"),
    ("#### 42", "42"),
    ("2 * 21 = 42", "42"),
    ("answer: 7", "7"),
    ("\\boxed{9}", "9"),
    ("so x = 12 apples", "12"),
    ("3 + 4 = 7, then 7 * 2 = 14. So 14 in all", "14"),  # last number after the reasoning
    ("The answer is 1/2.", "1/2"),
    ("\\boxed{\\frac{3}{4}}", "3/4"),
    ("The final answer is $1,234.50.", "1234.50"),
    ("The answer is **-3**", "-3"),
    ("I think the answer is 4. Wait, no: the answer is 5.", "5"),  # the last marker wins
    ("She paid 10 and got 3 back\n#### 7", "7"),
    ("Answer:\n42", "42"),  # the answer on the line after the marker
    ("The answer is 12.5%", "12.5"),
    ("It is \u22125 degrees", "-5"),  # Unicode minus
    ("The answer is Paris. Hope that helps!", "Paris"),
    ("The answer is (B).", "B"),
    ("The answer is \\boxed{8}. Check: 2 * 4 = 8, so 9 is wrong.", "8"),  # the box beats later numbers
    ("10-3 = 7", "7"),  # "-3" inside "10-3" is not a negative number
    ("No idea at all.", None),
]


@pytest.mark.parametrize("text,expected", SHAPES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("The answer is 1/2.", 0.5), ("\\boxed{\\frac{3}{4}}", 0.75), ("$1,234.50", 1234.5), ("-3.5", -3.5),
    ("It is 12.5%", 12.5), ("The answer is Paris.", None), ("nothing", None), ("The answer is 7 apples", 7.0),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_numeric_match():
    assert numeric_match("So the answer is 1,000.", "1000")
    assert numeric_match("x = 0.50", "#### 1/2")
    assert not numeric_match("The answer is 41.", "42")
    assert not numeric_match("no number", "42")
    assert stream("numeric", ["It is 5.", "It is 6.", "?"], ["5", "7", "1"]) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------------- scorers


def test_user_scorer_from_a_file(tmp_path):
    (tmp_path / "my_scores.py").write_text(
        "def length_ratio(prediction, reference):\n    return len(prediction) / len(reference)\n\n"
        "def two(prediction, reference):\n    return {'same': float(prediction == reference), 'one': 1.0}\n")
    ratio = ScorerMeans(load_scorer(f"{tmp_path / 'my_scores.py'}:length_ratio"))
    ratio.update(["ab", "abcd"], ["abcd", "abcd"])
    assert ratio.value() == {"length_ratio": pytest.approx((0.5 + 1.0) / 2)}
    two = ScorerMeans(load_scorer(f"{tmp_path / 'my_scores.py'}:two"))
    two.update(["a", "b", "c"], ["a", "x", "c"])
    assert two.value() == {"same": pytest.approx(2 / 3), "one": 1.0}


def test_bad_scorer_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.sets\[0\].scorer: cannot import 'no_such_module_xyz'"):
        load_scorer("no_such_module_xyz:f", "eval.sets[0].scorer")
    with pytest.raises(ConfigError, match="has no function 'nope'"):
        load_scorer("math:nope")
    with pytest.raises(ConfigError, match="expected 'module:function'"):
        load_scorer("just_a_name")
    with pytest.raises(ConfigError, match="scorer file not found"):
        load_scorer(f"{tmp_path / 'missing.py'}:f")


def test_mean_score_of_nothing_is_zero():
    assert MeanScore("x", exact_match).value() == {"x": 0.0}
