"""Text that is safe to store on every database backend."""


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
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    return text
