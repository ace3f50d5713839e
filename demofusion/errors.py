"""The package's user-facing errors: each message is one line naming the problem and the fix.

``InputError``: bad input from the user (arguments, files, images, budgets) → CLI exit 2.
``NonFiniteError``: NaN/Inf appeared during a run (nothing non-finite is ever saved) → exit 1.
Anything else escaping the package is an internal error (CLI exit 1; ``--debug`` shows it).
"""


class DemoFusionError(Exception):
    """Base of every error this package raises on purpose."""


class InputError(DemoFusionError, ValueError):
    """An argument, file or image that cannot be used as given; the message says how to fix it."""


class NonFiniteError(DemoFusionError, RuntimeError):
    """Latents or images became NaN/Inf during a run; the message names the phase, step and likely cause."""
