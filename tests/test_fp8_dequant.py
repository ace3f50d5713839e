"""How fp8 layers dequantise their weight (demofusion/fp8.py ``dequantised_weight``).

* Values: every fp8 code (e4m3fn and e5m2) times per-tensor scales, in fp32, bf16 and fp16,
  equals the two-pass formula ``w8.to(dtype) * scale`` (a cast, then a separate multiply into a
  second tensor) bit for bit; FP8Linear / FP8Conv2d outputs equal ``F.linear`` / ``F.conv2d`` on
  that formula's weight, bit for bit.
* Work, on fake CUDA: one allocation (the weight in the activation dtype) and two ops, the cast and
  the in-place scale; the plain cast (no scale) is one op. float8 takes no part in type promotion,
  so no eager op can read fp8 and scale in one pass (checked: torch refuses ``w8 * scale``).
* Under inductor (CPU C++ backend) the cast and the scale are one fused kernel, same bits.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from demofusion.fp8 import FP8_DTYPES, to_fp8_
from demofusion.memory.measure import fake_input, fake_mode

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SCALES = (1.0, 1 / 448, 0.1234567, 7.7e-5, 2.9e-3, 3.3)


def _codes(fp8: torch.dtype) -> torch.Tensor:
    """All 256 bit patterns of ``fp8`` as a [16, 16] weight."""
    return torch.arange(256, dtype=torch.uint8).view(fp8).reshape(16, 16)


def _same(a: torch.Tensor, b: torch.Tensor, nan_bits: bool = True) -> bool:
    """Bitwise equal (e5m2 and e4m3fn have NaN codes: their payloads too unless ``nan_bits`` is
    False, then NaN is NaN — the quantiser never writes NaN codes)."""
    bits = lambda t: t.view(torch.int16 if t.element_size() == 2 else torch.int32)
    if not nan_bits:
        nan = a.isnan()
        return torch.equal(nan, b.isnan()) and torch.equal(bits(a)[~nan], bits(b)[~nan])
    return a.dtype == b.dtype and torch.equal(bits(a), bits(b))


def _fp8_linear(w8: torch.Tensor, scale: float | None) -> nn.Linear:
    lin = to_fp8_(nn.Linear(w8.shape[1], w8.shape[0]), w8.dtype, skip=())
    lin.weight = nn.Parameter(w8, requires_grad=False)
    lin.weight_scale = None if scale is None else torch.tensor(scale, dtype=torch.float32)
    return lin


@pytest.mark.parametrize("fp8", FP8_DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_code_and_scale_equals_the_two_pass_formula(fp8, dtype):
    w8 = _codes(fp8)
    for scale in (*SCALES, None):
        lin = _fp8_linear(w8, scale)
        two_pass = w8.to(dtype)
        if scale is not None:
            two_pass = two_pass * torch.tensor(scale, dtype=torch.float32)  # a second tensor
        assert _same(lin.dequantised_weight(dtype), two_pass), (fp8, dtype, scale)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_layers_compute_with_the_two_pass_weight(dtype):
    g = torch.Generator().manual_seed(0)
    lin, conv = nn.Linear(24, 16), nn.Conv2d(8, 12, 3, padding=1)
    with torch.no_grad():
        for m in (lin, conv):
            m.weight.normal_(0, 0.05, generator=g)
    to_fp8_(lin, skip=()).to(dtype)  # the model's .to(dtype): biases follow, fp8 weights stay
    to_fp8_(conv, skip=()).to(dtype)
    x, img = torch.randn(3, 24, generator=g).to(dtype), torch.randn(2, 8, 6, 5, generator=g).to(dtype)
    for m, inp, op in ((lin, x, F.linear), (conv, img, lambda i, w, b: F.conv2d(i, w, b, padding=1))):
        w = m.weight.to(dtype) * m.weight_scale
        with torch.no_grad():
            assert _same(m(inp), op(inp, w, m.bias.to(dtype)))


class _Ops(TorchDispatchMode):
    """The aten ops run, and the storages their outputs hold."""

    def __init__(self):
        super().__init__()
        self.ops, self.storages = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func)
        self.storages += [t.untyped_storage() for t in ([out] if isinstance(out, torch.Tensor) else [])]
        return out


@pytest.mark.parametrize("scaled", [True, False])
def test_one_allocation_on_fake_cuda(scaled):
    lin = _fp8_linear(_codes(torch.float8_e4m3fn), 1.0 if scaled else None)
    with fake_mode():
        lin.weight = nn.Parameter(fake_input(320, 640, dtype=torch.float8_e4m3fn), requires_grad=False)
        lin.weight_scale = fake_input(dtype=torch.float32) if scaled else None
        with _Ops() as rec:
            w = lin.dequantised_weight(torch.float16)
    aten = torch.ops.aten
    assert rec.ops == ([aten._to_copy.default, aten.mul_.Tensor] if scaled else [aten._to_copy.default])
    assert w.device.type == "cuda" and w.dtype == torch.float16
    fresh = {s._cdata for s in rec.storages} - {lin.weight.untyped_storage()._cdata}
    assert len(fresh) == 1 and rec.storages[0].nbytes() == 320 * 640 * 2  # the one new weight


def test_float8_refuses_type_promotion():
    """Why the scale is a second kernel in eager: no op reads fp8 and multiplies by fp32 at once."""
    with pytest.raises(RuntimeError, match="Promotion for Float8 Types is not supported"):
        _codes(torch.float8_e4m3fn) * torch.tensor([0.5])


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor's CPU backend needs a C++ compiler")
def test_inductor_fuses_cast_and_scale_into_one_kernel():
    from torch._inductor.utils import run_and_get_code

    lin = _fp8_linear(_codes(torch.float8_e4m3fn), 2.9e-3)
    fn = torch.compile(lin.dequantised_weight, backend="inductor", fullgraph=True)
    got, code = run_and_get_code(fn, torch.float16)
    assert _same(got, lin.dequantised_weight(torch.float16), nan_bits=False)  # NaN codes: another payload
    kernels = [line for line in "\n".join(code).splitlines() if "async_compile.cpp_pybinding(" in line]
    assert len(kernels) == 1 and "_to_copy_mul" in kernels[0], kernels
