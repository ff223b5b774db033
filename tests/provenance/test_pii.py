"""Personal data scrubbing of captions and prompts."""

from __future__ import annotations

import pytest

from sora_train.utils.pii import scrub, scrub_pii


@pytest.mark.parametrize("text, expected", [
    ("write to jane.doe@example.com today", "write to [email] today"),
    ("call +1 (415) 555-0132 now", "call [phone] now"),
    ("tel 020 7946 0958", "tel [phone]"),
    ("see https://example.org/a?b=1 or www.site.net", "see [url] or [url]"),
    ("a dog at example.com/dogs", "a dog at [url]"),
    ("follow @janedoe", "follow [user]"),
    ("card 4111 1111 1111 1111", "card [card]"),
    ("ssn 123-45-6789", "ssn [id]"),
    ("from 192.168.1.20", "from [ip]"),
    ("IBAN DE89 3704 0044 0532 0130 00", "IBAN [iban]"),
])
def test_personal_data_is_replaced(text, expected):
    assert scrub(text) == expected


@pytest.mark.parametrize("text", [
    "a small red circle moving left, 3 px per frame, size 12",
    "shot in 2024 at 1080p, 30 fps, 12:30 in the afternoon",
    "the years 1999-2004 in review",
    "1234567890123",  # a long number that fails the Luhn check and has no phone grouping
    "a ratio of 16:9 and 4.5 stars",
])
def test_ordinary_captions_survive(text):
    assert scrub(text) == text


def test_counts_say_what_was_removed():
    text, counts = scrub_pii("mail a@b.io and c@d.org, or https://x.io")
    assert text == "mail [email] and [email], or [url]"
    assert counts == {"email": 2, "url": 1}
