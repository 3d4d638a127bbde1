"""Text that is safe to store on every database backend."""

import re

_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Return `text` storable and shown the same on SQLite and PostgreSQL.

    PostgreSQL rejects NUL characters and no backend can encode lone
    surrogates (JSON allows "\\ud800"); both become U+FFFD instead of losing
    the whole message. Other odd Unicode (RTL overrides, zero-width) is kept:
    templates escape it and it is the user's text.
    """
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # In a str every surrogate is a lone one (pairs decode to one code point).
        text = _SURROGATE.sub("\ufffd", text)
    return text
