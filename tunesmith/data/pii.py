"""Personal-data scrubbing: e-mails, phones, IP addresses, card numbers, IBANs and API keys become typed
placeholders; each match is checked (Luhn, IBAN mod 97, valid IP, phone shape) before it is replaced.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tunesmith.data.normalize import _check_choice

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
