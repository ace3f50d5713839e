"""Finding, reading and loading official weight files (safetensors only by default).

One place for what every component loader needs:

* :func:`resolve_component` turns a user's path (a diffusers model folder, its component
  subfolder, or a single ``.safetensors`` file) into the weights file and its ``config.json``;
* :func:`component_config` picks the architecture: the caller's config, else that ``config.json``,
  else the tensors' shapes;
* :func:`read_tensors` reads a safetensors file, optionally only the keys under one prefix
  (so a 7 GB single-file checkpoint is never read whole to get its VAE);
* :func:`build_and_load` builds a module on the meta device and assigns the tensors into it,
  after checking that every expected key is present with the expected shape — so loading
  never needs twice the model's size in RAM and never silently leaves random weights.

Every check here is shared with ``demofusion inspect`` so both say the same thing in the same
words: :func:`safetensors_header` (file integrity from the header alone: a truncated or corrupt
file is caught before any tensor is read), :func:`read_config` (config.json readable, an
object, known fields of the right type), :func:`config_errors` (a config.json that does not
describe a buildable model), :func:`fit_problems` + :func:`word_fit_problems` (missing,
unexpected and mis-shaped keys). Each problem is one line that starts with the file it is
about and ends with the fix.

Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) are refused unless the caller
passes ``allow_pickle=True`` (and even then they are read with ``weights_only=True``).
"""

from __future__ import annotations

from .build import build_and_load, build_meta
from .common import (
    COMPONENT_NAMES,
    PICKLE_SUFFIXES,
    SINGLE_FILE_PREFIXES,
    WeightsError,
    is_single_file,
    parse_dtype,
)
from .config import component_config, config_errors, read_config, read_json
from .files import read_tensors, resolve_component
from .fit import FitProblems, check_state_dict, fit_problems, word_fit_problems
from .integrity import SAFETENSORS_DTYPE_SIZES, read_keys, safetensors_header

__all__ = [
    "WeightsError",
    "PICKLE_SUFFIXES",
    "SINGLE_FILE_PREFIXES",
    "resolve_component",
    "read_tensors",
    "read_keys",
    "read_config",
    "build_and_load",
    "read_json",
    "check_state_dict",
    "fit_problems",
    "word_fit_problems",
    "FitProblems",
    "safetensors_header",
    "config_errors",
    "component_config",
    "build_meta",
    "COMPONENT_NAMES",
    "SAFETENSORS_DTYPE_SIZES",
    "is_single_file",
    "parse_dtype",
]
