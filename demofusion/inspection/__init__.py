"""`demofusion inspect` (docs/cli.md): what a checkpoint is, checked as loading would check it.

* :mod:`~demofusion.inspection.checkpoint`: model folders, component folders and files, single-file
  checkpoints, from their safetensors headers (:func:`inspect`, :func:`read_header`);
* :mod:`~demofusion.inspection.kinds`: every value read (NaN/Inf, float16's range) and the files that
  are not an SDXL model (a LoRA, a ControlNet, the ``tiny`` preset);
* :mod:`~demofusion.inspection.report`: the report types both fill (:class:`Report`,
  :class:`ComponentReport`).

The package is named ``inspection`` so that it does not shadow the standard library's ``inspect``.
"""

from .checkpoint import inspect, read_header
from .report import ComponentReport, Report

__all__ = ["inspect", "read_header", "Report", "ComponentReport"]
