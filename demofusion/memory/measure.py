"""The measuring instrument: a tracker of live CUDA storages under a fake mode, attention routed as
CUDA routes it, and the stated reserve for what fake tensors cannot see (see the package docstring)."""


from __future__ import annotations

import contextlib
import functools
import weakref

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..tensors import tensors_of

GiB, MiB = 2**30, 2**20

# ---- what the tracker cannot see: ASSUMPTIONS, not yet measured on a GPU ------------------------
# CUDA context + kernel images of torch/cuBLAS/cuDNN, outside PyTorch's allocator: commonly
# 0.3–0.6 GiB with lazy module loading (nvidia-smi minus memory_reserved); the upper end is taken.
CUDA_CONTEXT = GiB // 2
# cuBLAS/cuBLASLt workspaces per handle and stream (CUBLAS_WORKSPACE_CONFIG: a few MiB to 32 MiB
# by default) plus cuDNN convolution workspace, which cuDNN sizes to what is free: 64 + 256 MiB.
WORKSPACES = 64 * MiB + 256 * MiB
# Allocator slack (blocks rounded up, freed blocks not reusable): memory_reserved commonly runs
# 5–15 % above max_memory_allocated; 10 % of the activations is taken.
FRAGMENTATION = 0.10


def reserve(activation_bytes: int, gpu: bool = True) -> int:
    """Bytes a real GPU needs beyond what the tracker counts, for a stage of these activations
    (``gpu`` False: a CPU run, which has no CUDA context nor cuBLAS/cuDNN workspaces)."""
    return (CUDA_CONTEXT + WORKSPACES if gpu else 0) + int(FRAGMENTATION * activation_bytes)


# ---- the tracker -----------------------------------------------------------------------------
class Tracker(TorchDispatchMode):
    """Sums the bytes of live CUDA storages (``now``) and keeps the maximum (``peak``). Each op
    output's storage counts once until it dies (``weakref.finalize``); tensors alive before the run
    are :meth:`add`-ed by hand (they outlive it). Ops on real CPU tensors only run for real."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def add(self, t: torch.Tensor, finalize: bool = False) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
            return
        st = t.untyped_storage()
        if id(st) in self.live:
            return
        self.live[id(st)] = st.nbytes()
        self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        if finalize:
            weakref.finalize(st, self._free, id(st))

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default and leaves[0].dtype == torch.bool:
            return True  # a check such as isfinite(x).all(): the healthy path
        device = kwargs.get("device")
        if all(not isinstance(t, FakeTensor) and t.device.type == "cpu" for t in leaves) and \
                (device is None or torch.device(device).type == "cpu") and not kwargs.get("pin_memory"):
            # (pinned host memory needs a CUDA driver: it stays fake, like the copy it feeds)
            with unset_fake_temporarily():  # host work on real tensors: run it for real
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            self.add(t, finalize=True)
        return out


class SDPARouter(TorchFunctionMode):
    """Sends ``F.scaled_dot_product_attention`` ([B, heads, L, D]) to the kernel CUDA picks: flash
    for fp16/bf16 without mask and head dim ≤ 256; memory-efficient for other head dims that are
    multiples of 8 (the VAE's 512, fp32); anything else (masks: none of ours) unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _sdpa(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **rest):
    d, aten = q.shape[-1], torch.ops.aten
    if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and d <= 256 and d % 8 == 0:
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    if attn_mask is None and d % 8 == 0:
        return aten._scaled_dot_product_efficient_attention(q, k, v, None, False, dropout_p, is_causal, scale=scale)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **rest)


@functools.lru_cache(maxsize=1)
def fake_mode():
    """The one fake mode every module and input here lives in (fake tensors of two modes don't mix)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


class _Enough(Exception):
    """Ends a tiled run after its first batch of tiles (:class:`_FirstBatch`)."""


def track(fn, *args, resident=(), flash: bool = True) -> tuple[object, Tracker]:
    """Run ``fn(*args)`` under a tracker in the fake mode; return (result, tracker). CUDA tensors in
    ``args``, in ``resident`` and the module ``fn`` is bound to are alive from the start (the
    baseline). ``flash``: route attention as CUDA does (False: the math path)."""
    tr, result, owner = Tracker(), None, getattr(fn, "__self__", None)
    for t in tensors_of([*args, *resident, *([owner] if isinstance(owner, torch.nn.Module) else [])]):
        tr.add(t)
    with fake_mode(), torch.no_grad(), tr, (SDPARouter() if flash else contextlib.nullcontext()), \
            contextlib.suppress(_Enough):
        result = fn(*args)
    return result, tr


def measure(fn, *args, resident=(), flash: bool = True) -> tuple[object, int]:
    """``(fn(*args), peak bytes)``: the peak counts what was resident at the start (see :func:`track`)."""
    result, tr = track(fn, *args, resident=resident, flash=flash)
    return result, tr.peak


def on_fake_cuda(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A module built on ``meta`` given fake CUDA parameters and buffers (floats in ``dtype``), in
    place (``module.to()`` cannot swap fake parameters; reassigning ``_parameters`` can)."""
    like = lambda t: fake_input(*t.shape, dtype=dtype if t.is_floating_point() else t.dtype)
    for m in module.modules():
        m._parameters.update({n: torch.nn.Parameter(like(p), requires_grad=False)
                              for n, p in m._parameters.items() if p is not None})
        m._buffers.update({n: like(b) for n, b in m._buffers.items() if b is not None})
    return module.eval()


def fake_input(*shape, dtype=torch.float16) -> torch.Tensor:
    with fake_mode():
        return torch.empty(shape, dtype=dtype, device="cuda")
