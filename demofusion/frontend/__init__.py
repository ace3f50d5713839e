"""What the command line (:mod:`demofusion.cli`) and the browser UI (:mod:`demofusion.ui`) share,
one home each, below both: a run's keys, defaults and id (runs.py), the checks and loading of a
model (loading.py), the ControlNet maps' Canny edges and hashes (control.py), the sampler's names
(sampling.py), and the user-facing error with the out-of-memory words (errors.py).

Nothing here imports ``cli`` or ``ui`` (tests/house/test_layers.py); importing this package loads
none of its modules.
"""
