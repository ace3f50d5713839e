"""Building a module on the meta device and assigning checked tensors into it."""

from __future__ import annotations

import os
from typing import Callable, Mapping

import torch
from torch import nn

from .common import parse_dtype
from .config import config_errors
from .fit import check_state_dict


def build_meta(
    factory: Callable[[], nn.Module], what: str, config_file: str | os.PathLike | None = None
) -> nn.Module:
    """``factory()`` on the meta device; errors blamed on ``config_file`` when it is given."""
    with config_errors(config_file, what), torch.device("meta"):
        return factory()


def build_and_load(
    factory: Callable[[], nn.Module],
    state_dict: Mapping[str, torch.Tensor],
    what: str,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    ignore: Callable[[str], bool] = lambda k: False,
    file: str | os.PathLike | None = None,
    config_file: str | os.PathLike | None = None,
) -> nn.Module:
    """Build ``factory()`` on the meta device, check ``state_dict`` against it, assign it.

    ``file`` (the weights file) starts the message of a mismatch; errors while building the
    module are blamed on ``config_file`` (the config.json it was built from) when given.

    Tensors are cast to ``dtype`` (default: keep the file's dtype) and moved to ``device``
    one at a time, so peak memory stays near one copy of the weights. Modules must keep all
    their state in the state dict (no non-persistent buffers), since meta tensors are never
    materialised.
    """
    module = build_meta(factory, what, config_file)
    expected = {k: v.shape for k, v in module.state_dict().items()}
    check_state_dict(expected, state_dict, what, ignore, file)
    dtype = parse_dtype(dtype) if dtype is not None else None
    sd = {}
    for k in expected:
        t = state_dict[k]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        sd[k] = t.to(device)
    module.load_state_dict(sd, strict=True, assign=True)
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{what}: tensors left unset after loading: {left[:5]}")
    return module.eval().requires_grad_(False)
