"""Reading answers out of generated text: normalisation, exact and numeric matching, and the final answer of a
chain-of-thought response. Plain text functions, shared by the data layer (instruction templates that show a
worked answer), rule-based RL rewards and evaluation metrics.

    extract_answer("... so the answer is $1,234.50.")   # "1234.50"
    exact_match("  The  Marnburg. ", "the marnburg")    # True
"""

from __future__ import annotations

import math
import re

_TRAILING_PUNCTUATION = ".,;:!?\"'"


def normalize_answer(text: str) -> str:
    """Strip, casefold, collapse runs of whitespace to one space and drop trailing punctuation.

    "  The  Marnburg. " -> "the marnburg"
    """
    text = " ".join(text.casefold().split())
    return text.rstrip(_TRAILING_PUNCTUATION).rstrip()


def exact_match(prediction: str, reference: str) -> bool:
    """Whether `prediction` equals `reference` after `normalize_answer` on both."""
    return normalize_answer(prediction) == normalize_answer(reference)



# A number: sign, currency, thousands commas, decimals, a fraction; not the tail of a word or another number.
_NUMBER = re.compile(
    r"(?<![\w.,])(?P<sign>[-\u2212+])?\$?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)"
    r"(?:\s*/\s*(?P<den>\d+)(?!\d|\.\d))?"
)
_ANSWER_MARK = re.compile(
    r"\bthe\s+(?:final\s+)?answer\s+(?:is|was|would\s+be)\b|\banswer\s*[:=]|####", re.IGNORECASE
)
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_TEXT = re.compile(r"\\(?:text|mathrm|textbf)\s*\{([^{}]*)\}")


def extract_answer(text: str) -> str | None:
    """The answer a response ends on, e.g. after chain-of-thought reasoning.

    In order: the content of the last `\\boxed{...}`; else the text after the last "the answer is" / "the final
    answer is" / "Answer:" / "####" (a number there wins, as a plain number; otherwise the words up to the end of
    the sentence); else the last number in the text. Numbers lose "$", "+" and thousands commas ("$1,234.50" ->
    "1234.50"), a Unicode minus becomes "-", fractions stay fractions ("1/2").

    Returns:
        The answer as a string, or None when there is no marker, box or number.
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return _answer_at(_plain_latex(boxed))
    marks = list(_ANSWER_MARK.finditer(text))
    if marks:
        tail = text[marks[-1].end():].lstrip(" \t\n:=*$")
        return _answer_at(tail.split("\n", 1)[0])
    numbers = list(_NUMBER.finditer(text))
    return _number_text(numbers[-1]) if numbers else None


def extract_number(text: str) -> float | None:
    """The value of the first number in `extract_answer(text)` ("1/2" -> 0.5, "12.5%" -> 12.5), or None."""
    answer = extract_answer(text)
    found = _NUMBER.search(answer) if answer is not None else None
    if found is None:
        return None
    value = float(found["digits"].replace(",", ""))
    if found["den"] is not None:
        if int(found["den"]) == 0:
            return None
        value /= int(found["den"])
    return -value if found["sign"] in ("-", "\u2212") else value


def numeric_match(prediction: str, reference: str) -> bool:
    """Whether the numbers `extract_number` reads from prediction and reference are equal (relative 1e-6)."""
    a, b = extract_number(prediction), extract_number(reference)
    return a is not None and b is not None and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def _answer_at(tail: str) -> str | None:
    """A number at the start of `tail`, else its words up to the end of the sentence."""
    number = _NUMBER.match(tail)
    if number:
        return _number_text(number)
    words = re.split(r"[.!?](?:\s|$)", tail, maxsplit=1)[0]
    return words.strip(" *\"'`()$") or None


def _number_text(match: re.Match) -> str:
    sign = "-" if match["sign"] in ("-", "\u2212") else ""
    fraction = f"/{match['den']}" if match["den"] is not None else ""
    return sign + match["digits"].replace(",", "") + fraction


def _last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (nested braces allowed), or None."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return text[start:]  # unclosed: the rest


def _plain_latex(text: str) -> str:
    """'\\frac{1}{2}' -> '1/2', '\\text{cm}' -> 'cm', thin spaces and braces dropped."""
    text = _TEXT.sub(r"\1", _FRAC.sub(r"\1/\2", text))
    return re.sub(r"\\[,!;: ]|[{}$]", "", text).strip()
