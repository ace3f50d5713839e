"""The package's user-facing errors: each message is one line naming the problem and the fix.

``InputError``: bad input from the user (arguments, files, images, budgets) → CLI exit 2.
``NonFiniteError``: NaN/Inf appeared during a run (nothing non-finite is ever saved) → exit 1.
Anything else escaping the package is an internal error (CLI exit 1; ``--debug`` shows it).
"""

import re


class DemoFusionError(Exception):
    """Base of every error this package raises on purpose."""


class InputError(DemoFusionError, ValueError):
    """An argument, file or image that cannot be used as given; the message says how to fix it."""


class NonFiniteError(DemoFusionError, RuntimeError):
    """Latents or images became NaN/Inf during a run; the message names the phase, step and likely cause."""


# ---- one translator from the API's words to a front end's ------------------------------------------
# Messages name the Python API's arguments (``width=500``, ``force=True``, a leading ``seed``); each front
# end (the CLI, the browser UI) has one table from those names to its own words, and this is the one
# place that applies it. A name mapped to None has no counterpart there: a later clause (after "; ")
# advising it is left out, so a front end never advises a setting it does not have.
_NAME = re.compile(r"[a-z_][a-z_0-9]*")


def reword(message: str, words: dict) -> str:
    """``message`` in a front end's ``words``: ``{"num_inference_steps": "--steps", "base_size": None,
    "--scale": "Scale", "/tmp/upload.png": "upload.png"}``. Identifier keys are arguments (``name=value``
    → ``word value``, ``name=True`` → ``word``, ``name=`` → ``word``, a leading ``name`` → ``word``);
    other keys (flags, paths) are replaced where they stand."""
    names = {k: v for k, v in words.items() if _NAME.fullmatch(k)}
    gone = [k for k, v in names.items() if v is None]
    clauses = message.split("; ")
    clauses = clauses[:1] + [c for c in clauses[1:] if not any(re.search(rf"\b{k}=", c) for k in gone)]
    message = "; ".join(clauses)

    def arg(m: re.Match) -> str:
        word = names.get(m[1])
        if not word:
            return m[0]
        valued = not m[2] and re.match(r"[\w(\[\-]", m.string[m.end():m.end() + 1])
        return word + " " if valued else word

    # name=True → word; name=VALUE → word VALUE; a bare name= (advice: pass name=) → word
    message = re.sub(r"\b([a-z_][a-z_0-9]*)=(True\b)?", arg, message)
    head = _NAME.match(message)
    if head and names.get(head.group()):
        message = names[head.group()] + message[head.end():]
    for key, word in words.items():
        if not _NAME.fullmatch(key) and word is not None:
            message = re.sub(rf"(?<![\w-]){re.escape(key)}(?![\w-])", lambda m, w=word: w, message)
    return message


def first_line(e: BaseException | str) -> str:
    """The first non-blank line of an error's message (or of a text), stripped; the exception's type
    name when the message is blank. For quoting a caught error inside a one-line message of ours:
    ``f"{path}: cannot be read ({first_line(e)}); re-download it"`` (a traceback-style or multi-line
    message from a library would break the one line)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else (type(e).__name__ if isinstance(e, BaseException) else "")
