"""daphne without Twisted's TLS stack: `python -m chatsite.serve <daphne's arguments>`.

daphne's command line imports Twisted before the application, and Twisted's
reactor imports its TLS support (pyOpenSSL) whether or not an endpoint uses
it: ~5 MB of every worker's memory (docs/performance-profile.md). Workers
behind nginx, which ends TLS, never use it. This runs daphne's own command
line, unchanged, with pyOpenSSL refused, so Twisted sees no TLS support; an
endpoint that asks for TLS (`-e ssl:...`) gets it, as under plain `daphne`.
"""

from __future__ import annotations

import sys

# What Twisted's reactor imports for TLS; without it Twisted runs without TLS.
TLS_MODULE = "OpenSSL"
# Twisted endpoint types that need TLS: ssl: and tls: (and txacme's le:, lets:).
TLS_ENDPOINTS = ("ssl:", "tls:", "le:", "lets:")


def tls_wanted(argv: list[str]) -> bool:
    """Whether daphne's arguments ask for a TLS endpoint (`-e ssl:...`, `--endpoint=ssl:...`)."""
    for arg in argv:
        value = arg.split("=", 1)[1] if arg.startswith("--endpoint=") else arg
        if value.startswith("-e") and not value.startswith("--"):
            value = value[2:]  # "-essl:443" is one argument
        if value.lower().startswith(TLS_ENDPOINTS):
            return True
    return False


def refuse_tls(argv: list[str]) -> None:
    """Keep Twisted from loading TLS support, unless `argv` asks for a TLS endpoint."""
    if not tls_wanted(argv) and TLS_MODULE not in sys.modules:
        sys.modules[TLS_MODULE] = None  # `import OpenSSL` now raises ImportError


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    refuse_tls(argv)
    from daphne.cli import CommandLineInterface

    CommandLineInterface().run(argv)


if __name__ == "__main__":
    main()
