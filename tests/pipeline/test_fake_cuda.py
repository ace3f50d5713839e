"""GPU readiness without a GPU: one whole DemoFusion run of the real pipeline on a pretend CUDA device.

Technique: ``torch._subclasses.fake_tensor.FakeTensorMode``. Inside it every tensor is *fake*:
it has a shape, a dtype and a device — here ``cuda``, though this machine has none — but no
storage, and every operation only works out the metadata of its result. A step of the real
2.6 B-parameter SDXL UNet is then a few seconds of Python, whatever the image size, and two
classes of GPU bugs become exceptions on a CPU-only CI machine:

* device mix-ups: a CPU tensor (other than a 0-d scalar) meeting a CUDA one raises, as on a GPU;
* host reads of tensor values (``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``.tolist()``)
  raise ``DataDependentOutputException``: fake tensors have no values. On a GPU each such read
  on the hot path is a synchronisation that stalls the host until the device catches up.

A device-to-host copy (``.cpu()`` of a CUDA tensor, also a sync) is legal on fake tensors, so
:class:`DeviceToHost`, a dispatch mode next to the fake one, records such copies: a run must make none.

The networks are the real SDXL ones, built on the meta device (``random_components(…,
device="meta")``: no memory, no initialisation); their parameters are then swapped for fake fp16
CUDA tensors (``Module.to`` cannot move fake parameters, assigning them works). The scheduler
keeps its real CPU tables. What the pipeline legitimately reads on the host is plain host data
(the phase sub-seeds of a CPU generator); its once-per-phase NaN checks skip fake tensors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode, is_fake
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from demofusion.pipeline import DemoFusionPipeline, Mechanisms
from demofusion.pipeline import mechanisms as M
from demofusion.presets import random_components


class DeviceToHost(TorchDispatchMode):
    """Records every op that reads a CUDA tensor and returns a CPU one (``.cpu()``, ``.to("cpu")``, …)."""

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
        if any(a.device.type == "cuda" for a in ins) and any(o.device.type == "cpu" for o in outs):
            self.copies.append(str(func))
        return out


def fake_cuda(module: nn.Module, mode: FakeTensorMode, dtype=torch.float16) -> nn.Module:
    """Swap every parameter and buffer of a meta-device module for a fake CUDA tensor (floats in ``dtype``)."""
    for m in module.modules():
        for table in (m._parameters, m._buffers):
            for name, t in list(table.items()):
                if t is None:
                    continue
                with mode:
                    f = torch.empty(t.shape, dtype=dtype if t.is_floating_point() else t.dtype, device="cuda")
                table[name] = nn.Parameter(f, requires_grad=False) if table is m._parameters else f
    return module


def fake_pipeline(kind: str, mode: FakeTensorMode, mechanisms: Mechanisms | None = None) -> DemoFusionPipeline:
    unet, vae, text, scheduler = random_components(kind, device="meta", dtype=torch.float16)
    for module in (unet, vae, text.text_encoder, text.text_encoder_2):
        fake_cuda(module, mode)
    return DemoFusionPipeline(unet, vae, text, scheduler, mechanisms=mechanisms, name=f"fake-cuda {kind}")


def fake_run(pipe: DemoFusionPipeline, mode: FakeTensorMode, **kwargs):
    """One generation under the fake mode; returns (output, device→host copies seen)."""
    spy = DeviceToHost()
    args = dict(num_inference_steps=2, view_batch_size=16, output_type="pt", seed=3,
                offload_text_encoders=False)  # Module.to cannot move fake parameters (the visit is a .to)
    with mode, spy:
        out = pipe("a lighthouse at dusk", **{**args, **kwargs})
    return out, spy.copies


def new_mode() -> FakeTensorMode:
    # allow_non_fake_inputs: the scheduler's real CPU tables (built outside) may enter fake ops
    return FakeTensorMode(allow_non_fake_inputs=True)


def test_sdxl_generation_on_fake_cuda():
    """SDXL base, 2048² from a 1024² base (2 phases), 2 steps, decoded: no device mix-up, no host read."""
    mode = new_mode()
    pipe = fake_pipeline("sdxl-base", mode)
    assert pipe.device.type == "cuda" and pipe.unet.dtype == torch.float16 and pipe.base_size == 1024
    assert sum(p.numel() for p in pipe.unet.parameters()) > 2.5e9  # the real network, not a toy

    out, copies = fake_run(pipe, mode, height=2048, width=2048)

    assert copies == [], f"device→host copies during the run: {copies}"
    assert out.phase_sizes == [(1024, 1024), (2048, 2048)]
    assert [tuple(x.shape) for x in out.images] == [(1, 3, 1024, 1024), (1, 3, 2048, 2048)]
    assert [tuple(z.shape) for z in out.latents] == [(1, 4, 128, 128), (1, 4, 256, 256)]
    for x in out.images + out.latents:
        assert is_fake(x) and x.device.type == "cuda" and x.dtype == torch.float32
    assert out.unet_calls == [2, 2]  # phase 2: 9 local + 4 dilated views in one batch per step


# The detector itself: mechanisms that break GPU readiness make the same run fail. The tiny preset
# keeps these fast (the mechanisms only run in the upscaling phases).
def _read_c(t, T=1000):  # host read of a timestep-derived value (a sync on a GPU)
    return torch.tensor(M.cosine_factor(t, T).item())


def _cpu_residual(z, z_hat, c, alpha1):  # a CPU tensor meeting the CUDA latents
    return M.skip_residual(z, z_hat, c, alpha1) + torch.zeros(z.shape)


def _copy_stats(z, mean, std):  # legal on fake tensors, but a device→host copy per phase
    return M.renormalise(z, mean.cpu(), std.cpu())


def _run_tiny(mech: Mechanisms):
    mode = new_mode()
    return fake_run(fake_pipeline("tiny", mode, mech), mode, height=512, width=512)


def test_tiny_runs_clean():
    out, copies = _run_tiny(Mechanisms())
    assert copies == [] and [tuple(x.shape) for x in out.images] == [(1, 3, 256, 256), (1, 3, 512, 512)]


@pytest.mark.parametrize("mech, error, match", [
    (Mechanisms(cosine_factor=_read_c), DataDependentOutputException, "local_scalar_dense"),
    (Mechanisms(skip_residual=_cpu_residual), RuntimeError, "devices"),
])
def test_detector_catches_host_reads_and_device_mixups(mech, error, match):
    with pytest.raises(error, match=match):
        _run_tiny(mech)


def test_detector_catches_device_to_host_copies():
    _, copies = _run_tiny(Mechanisms(renormalise=_copy_stats))
    assert copies == ["aten._to_copy.default"] * 2
