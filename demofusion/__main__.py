"""`python -m demofusion` is the `demofusion` command."""

import sys

from .cli import main

sys.exit(main())
