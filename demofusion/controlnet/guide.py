"""ControlNets in a DemoFusion run (docs/components.md, ControlNet): the control arguments checked once
(:func:`check_control` → :class:`Control`), each phase's control image (:meth:`Guide.phase_images`)
and the ControlNets' residuals for a UNet call (:meth:`Guide.residuals`).

Default mode: every phase's control image is the original resized to that phase's exact pixel
size (bicubic, antialiased, clamped to [0, 1]); each local window sees its crop, each dilated
sub-latent the image at 1/s (:func:`~demofusion.pipeline.mechanisms.dilated_pixels`). Several
ControlNets add their residuals (diffusers' MultiControlNet); guess mode runs them on the
conditional half only. ``reference_compat``: the PRIS-CV ControlNet pipeline's choices instead
(each phase a bicubic resize of the previous phase's control tensor; zero padding; point samples).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import check_bool, check_float
from ..errors import InputError
from ..images import control_to_tensor
from ..tensors import unset_fake_temporarily


@dataclass(frozen=True)
class Control:
    """Validated control settings: per ControlNet its image (float32 [B,3,H,W] in [0, 1], CPU),
    conditioning scale and guidance window [start, end) as fractions of the steps."""

    images: tuple
    scales: tuple
    starts: tuple
    ends: tuple
    guess_mode: bool = False

    def weight(self, n: int, i: int, steps: int) -> float:
        """ControlNet n's scale at step i: 0 outside its window (diffusers' ``controlnet_keep``)."""
        outside = i / steps < self.starts[n] or (i + 1) / steps > self.ends[n]
        return 0.0 if outside else self.scales[n]


def _per_net(name: str, v, n: int, lo: float, hi: float) -> tuple:
    """A number, or a list of one number per ControlNet."""
    many = isinstance(v, (list, tuple))
    if many and len(v) != n:
        raise InputError(f"{name} has {len(v)} entries for {n} ControlNet(s); give one number or {n}")
    return tuple(check_float(name, x, lo, hi) for x in (v if many else [v] * n))


def check_control(n: int, batch: int, control_image=None, controlnet_conditioning_scale=1.0,
                  control_guidance_start=0.0, control_guidance_end=1.0, guess_mode=False) -> Control | None:
    """The control arguments of a call on a pipeline with ``n`` ControlNets (None when n = 0)."""
    if n == 0:
        given = control_image is not None or guess_mode or controlnet_conditioning_scale != 1.0 or \
            control_guidance_start != 0.0 or control_guidance_end != 1.0
        if given:
            raise InputError("control arguments given but this pipeline has no ControlNet; load one with "
                             "from_pretrained(..., controlnet=PATH) or --controlnet PATH")
        return None
    if control_image is None:
        raise InputError(f"this pipeline has {n} ControlNet(s): pass control_image= (one image per ControlNet)")
    if n > 1 and (not isinstance(control_image, (list, tuple)) or len(control_image) != n):
        got = len(control_image) if isinstance(control_image, (list, tuple)) else 1
        raise InputError(f"control_image: {got} image(s) for {n} ControlNets; give a list of {n} (one per ControlNet)")
    images = [control_image] if n == 1 else list(control_image)
    tensors = []
    for k, im in enumerate(images):
        name = "control_image" if n == 1 else f"control_image[{k}]"
        with unset_fake_temporarily():  # host data, read on the host (also under the memory tests' fake mode)
            x = control_to_tensor(im, name)
        if x.shape[0] not in (1, batch):
            raise InputError(f"{name} has a batch of {x.shape[0]} but prompt has {batch}; give one image or {batch}")
        tensors.append(x.expand(batch, -1, -1, -1) if x.shape[0] != batch else x)
    starts = _per_net("control_guidance_start", control_guidance_start, n, 0.0, 1.0)
    ends = _per_net("control_guidance_end", control_guidance_end, n, 0.0, 1.0)
    for k, (a, b) in enumerate(zip(starts, ends)):
        if a >= b:
            raise InputError(f"control_guidance_start={a} must be below control_guidance_end={b}"
                             + (f" (ControlNet {k})" if n > 1 else ""))
    scales = _per_net("controlnet_conditioning_scale", controlnet_conditioning_scale, n, 0.0, 100.0)
    return Control(tuple(tensors), scales, starts, ends, check_bool("guess_mode", guess_mode))


def check_fits(net, unet, name: str = "controlnet") -> None:
    """One line if ``net``'s residuals or conditioning cannot meet ``unet``'s."""
    a, b = net.config, unet.config
    for field in ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                  "projection_class_embeddings_input_dim", "addition_time_embed_dim"):
        if getattr(a, field) != getattr(b, field):
            raise InputError(f"{name} does not fit this UNet: its {field} is {getattr(a, field)}, the UNet's "
                             f"{getattr(b, field)} (an SDXL ControlNet needs an SDXL UNet; SD 1.5 ControlNets "
                             "do not fit)")


class Guide:
    """The ControlNets of one run: phase images on the device and residuals per UNet call."""

    def __init__(self, nets, control: Control, steps: int, device, reference: bool = False):
        self.nets, self.control, self.steps = list(nets), control, steps
        self.device, self.reference = device, reference

    def phase_images(self, sizes: list, k: int) -> list[torch.Tensor]:
        """Each ControlNet's image at phase k's pixel size (float32 on the device)."""
        size = tuple(sizes[k])
        if not self.reference or k == 0:
            return [_resize(x, size, antialias=True).clamp(0, 1).to(self.device) for x in self.control.images]
        # the reference: bicubic (no antialias, no clamp) of the previous phase's control tensor
        return [F.interpolate(x, size=size, mode="bicubic") for x in self.phase_images(sizes, k - 1)]

    def residuals(self, x, t, emb, pooled, time_ids, images: list, i: int, rows: str, zero_context=None) -> dict:
        """The UNet's extra arguments for batch ``x``: the ControlNets' summed residuals (none when
        every ControlNet is outside its window). ``images``: per ControlNet [N,3,8h,8w] (one row per
        view, before CFG doubling); ``rows``: "pairs" (unconditional, conditional interleaved),
        "uncond" or "cond"; ``zero_context``: the rows of ``x`` whose context is SDXL's forced zeros
        (their cross-attention skipped, bit for bit the same)."""
        c = self.control
        active = [(n, w) for n in range(len(self.nets)) if (w := c.weight(n, i, self.steps)) != 0.0]
        if not active or (c.guess_mode and rows == "uncond"):
            return {}
        if rows == "pairs" and c.guess_mode:  # conditional rows only; zeros for the unconditional
            x, emb, pooled, time_ids = x[1::2], emb[1::2], pooled[1::2], time_ids[1::2]
            zero_context = None
        elif rows == "pairs":
            images = [im.repeat_interleave(2, 0) for im in images]
        down = mid = None
        for n, w in active:
            net = self.nets[n]
            d, m = net(x, t, emb, pooled, time_ids, images[n].to(net.dtype), w, c.guess_mode,
                       **({} if zero_context is None else {"zero_context": zero_context}))
            down, mid = (d, m) if down is None else ([a + b for a, b in zip(down, d)], mid + m)
        if rows == "pairs" and c.guess_mode:
            pair = lambda r: torch.stack([torch.zeros_like(r), r], 1).flatten(0, 1)
            down, mid = [pair(r) for r in down], pair(mid)
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def _resize(x: torch.Tensor, size: tuple, antialias: bool) -> torch.Tensor:
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="bicubic", antialias=antialias)
