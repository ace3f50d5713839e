"""The command's output streams: a terminal whose encoding lacks a character (``PYTHONIOENCODING=ascii``,
an old Windows console) gets an ASCII spelling of it, and a closed stdout (``demofusion … | head -1``)
ends the command quietly."""

from __future__ import annotations

import codecs
import os
import sys

# the non-ASCII characters our messages use, spelled in ASCII; anything else becomes '?'
ASCII = {"×": "x", "→": "->", "←": "<-", "—": "-", "–": "-", "−": "-", "…": "...", "²": "^2", "³": "^3",
         "⁹": "^9", "≤": "<=", "≥": ">=", "≈": "~", "·": "*", "σ": "sigma", "α": "alpha", "’": "'", "‘": "'",
         "“": '"', "”": '"', "°": " deg", "±": "+-", "µ": "u"}
HANDLER = "demofusion-ascii"
CLOSED_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a command stopped by a closed pipe


def _ascii(e: UnicodeError):
    if not isinstance(e, UnicodeEncodeError):
        raise e
    return "".join(ASCII.get(ch, "?") for ch in e.object[e.start:e.end]), e.end


codecs.register_error(HANDLER, _ascii)


def ascii_fallback() -> None:
    """stdout and stderr write what their encoding cannot hold in ASCII instead of failing."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.reconfigure(errors=HANDLER)
        except (AttributeError, ValueError, OSError):  # not a text stream we may reconfigure: leave it
            pass


def closed_pipe() -> int:
    """The reader of stdout went away: point stdout at /dev/null (so the interpreter's last flush is
    quiet too) and return the exit status a shell gives a command stopped by SIGPIPE."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, ValueError, OSError):  # stdout has no file descriptor (embedded use)
        pass
    return CLOSED_PIPE
