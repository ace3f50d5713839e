"""A torchrun worker that runs the `demofusion` command and records its exit code in DIR/rank<r>.code
(torchrun does not pass its workers' codes on when it is interrupted), for tests/test_parallel.py.

    python -m torch.distributed.run --standalone --nproc_per_node N tests/helpers/dist_exit.py DIR ARGS...
"""

import os
import sys
from pathlib import Path

from demofusion.cli import main

folder, args = Path(sys.argv[1]), sys.argv[2:]
code = main(args)
(folder / f"rank{os.environ.get('RANK', '0')}.code").write_text(str(code))
sys.exit(code)
