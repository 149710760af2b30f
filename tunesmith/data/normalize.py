"""Unicode and whitespace normalisation of texts: one normal form, "\n" line endings, no invisible
characters, tidy spaces and blank lines (leading indentation kept).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

from tunesmith.errors import ConfigError


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"clean: unknown {name} {value!r} (expected one of {', '.join(map(repr, choices))})")


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
