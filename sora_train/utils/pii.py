"""Personal data out of captions and prompts: e-mail addresses, phone numbers, URLs and similar.

``scrub_pii`` replaces each match with a typed placeholder (``[email]``, ``[phone]``, ...) so a
caption keeps its shape and a reader sees that something was removed. It runs before a caption
or prompt is stored anywhere we write: shards, caches, logs, video metadata and C2PA manifests.
``sora-data ingest --keep-pii`` opts out and is recorded in the shard set's index.

Patterns are conservative on purpose: a caption like "3 red circles moving 2 px per frame"
must survive, so a phone number needs 7+ digits in phone-like grouping, a card number must
pass the Luhn check, and a bare number stays.
"""

from __future__ import annotations

import re
from collections import Counter

# Order matters: URLs before e-mails (a URL may hold an '@'), e-mails before handles, card and
# IBAN before phone numbers (long digit runs).
_URL = re.compile(r"\b(?:https?://|ftp://|www\.)[^\s<>\"']+|\b[a-z0-9][a-z0-9-]*(?:\.[a-z0-9-]+)*\.(?:com|org|net|io|edu|gov|co|uk|de|fr|ru|cn|info|biz|me|ly|app|dev)(?:/[^\s<>\"']*)?\b", re.IGNORECASE)
_EMAIL = re.compile(r"\b[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}\b", re.IGNORECASE)
_HANDLE = re.compile(r"(?<![\w@])@[A-Za-z0-9_]{2,30}\b")
_IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
# +CC, optional area code in brackets, then groups of digits separated by space/dot/dash; 7+ digits in all.
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]?\d{2,4}){1,4}(?!\w)")

PLACEHOLDERS = ("[url]", "[email]", "[user]", "[ip]", "[iban]", "[card]", "[id]", "[phone]")


def _luhn_ok(digits: str) -> bool:
    total, parity = 0, len(digits) % 2
    for i, ch in enumerate(digits):
        d = int(ch)
        if i % 2 == parity:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _phone_like(match: str) -> bool:
    digits = re.sub(r"\D", "", match)
    groups = re.findall(r"\d+", match)
    if len(groups) == 2 and all(len(g) == 4 and 1800 <= int(g) <= 2199 for g in groups):
        return False  # a range of years, "1999-2004"
    if len(digits) < 7 or len(digits) > 15:
        return False
    # A plain run of digits with no separator and no '+' is more likely a count or an id.
    return bool(re.search(r"[\s().+-]", match.strip())) or match.strip().startswith("+")


def scrub_pii(text: str) -> tuple[str, Counter]:
    """-> (text with personal data replaced by placeholders, Counter of what was replaced)."""
    counts: Counter = Counter()
    if not text:
        return text, counts

    def sub(pattern: re.Pattern, kind: str, s: str, keep=None) -> str:
        def repl(m: re.Match) -> str:
            if keep is not None and not keep(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return f"[{kind}]"

        return pattern.sub(repl, s)

    out = sub(_EMAIL, "email", text)  # before URLs: "bob@mail.example.com" is an address, not a host
    out = sub(_URL, "url", out)
    out = sub(_HANDLE, "user", out)
    out = sub(_IPV4, "ip", out)
    out = sub(_IBAN, "iban", out, keep=lambda s: len(re.sub(r"\s", "", s)) >= 15)
    out = sub(_CARD, "card", out, keep=lambda s: _luhn_ok(re.sub(r"\D", "", s)))
    out = sub(_SSN, "id", out)
    out = sub(_PHONE, "phone", out, keep=_phone_like)
    return out, counts


def scrub(text: str) -> str:
    """``scrub_pii`` without the counts."""
    return scrub_pii(text)[0]
