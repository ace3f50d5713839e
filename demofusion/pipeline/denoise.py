"""One denoising step of a stack of views: guided UNet calls in batches, then the scheduler step.

:class:`Denoiser` holds what every UNet call of a run shares (the text conditioning, the
micro-conditioning, the guidance scale, the batch size); :func:`upscale_step` is one step of an
upscaling phase — local and global paths from the same z, denoised together, fused (DESIGN §3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import parallel
from .mechanisms import Views
from .settings import Settings


try:
    from torch._subclasses.fake_tensor import unset_fake_temporarily
except ImportError:  # pragma: no cover - very old torch
    from contextlib import nullcontext as unset_fake_temporarily


def phase_generators(seed: int, phases: int) -> list[torch.Generator]:
    """One CPU generator per phase, seeded by a 62-bit sub-seed drawn from the root seed.

    The sub-seeds are host bookkeeping (a CPU generator's draw, read once per run): they are
    drawn for real even under a FakeTensorMode (the GPU-readiness test), where tensors hold no data.
    """
    root = torch.Generator().manual_seed(seed)
    with unset_fake_temporarily():
        return [torch.Generator().manual_seed(int(s)) for s in torch.randint(2**62, (phases,), generator=root)]


def steps_of(timesteps, phase: int, phases: int, progress: bool):
    """The timesteps, behind a tqdm bar per phase when ``progress``."""
    if not progress or parallel.rank() != 0:  # one bar, on rank 0
        return timesteps
    from tqdm.auto import tqdm

    return tqdm(timesteps, desc=f"phase {phase}/{phases}", unit="step", leave=True)


def needs_noise(scheduler) -> bool:
    name = type(scheduler).__name__
    return name == "EulerAncestralDiscreteScheduler" or (name == "DDIMScheduler" and scheduler.config.get("eta", 0) > 0)


@dataclass
class Conditioning:
    """Prompt embeddings and micro-conditioning on the UNet's device and dtype."""

    embeds: torch.Tensor  # [B,77,2048]
    pooled: torch.Tensor  # [B,1280]
    neg_embeds: torch.Tensor | None  # None without classifier-free guidance
    neg_pooled: torch.Tensor | None
    time_ids: torch.Tensor  # [1,6]: (orig h, orig w, crop top, crop left, target h, target w)


@dataclass
class Denoiser:
    unet: torch.nn.Module
    scheduler: object
    cond: Conditioning
    batch: int
    view_batch_size: int
    guidance_scale: float
    cfg_apart: bool = False  # the unconditional and conditional halves in two UNet calls (less memory)
    runner: object = field(default_factory=parallel.Serial)  # who runs which chunk (demofusion.parallel)
    guide: object = None  # the run's ControlNets (demofusion.controlnet.guide.Guide), or None
    calls: int = 0  # UNet forward calls so far (all ranks' together: one process's count)

    @property
    def cfg(self) -> bool:
        return self.cond.neg_embeds is not None

    def __call__(self, to_step, model_in, crops, t, i: int, noise, scale_index, control=None, views_per_call=None):
        """Guided UNet calls on ``model_in`` in chunks of ``view_batch_size`` views (or
        ``views_per_call``), then one scheduler step per chunk from ``to_step``, at timestep ``t``
        (for the UNet, on its device), the schedule's ``i``-th (for the scheduler: found by
        position, so t is never read on the host). ``scale_index(k)``: the σ index used to scale
        chunk k's input (None: i, the correct one). ``control``: per ControlNet, one function per
        view giving its control image [B,3,8h,8w]."""
        B, c, sched = self.batch, self.cond, self.scheduler
        chunk = (views_per_call or self.view_batch_size) * B
        starts = list(range(0, to_step.shape[0], chunk))

        def one(k: int) -> torch.Tensor:  # chunk k: guided UNet call(s), then its scheduler step
            a = starts[k]
            x, src = model_in[a : a + chunk], to_step[a : a + chunk]
            idx = scale_index(k)
            x = sched.scale_model_input_at(x, i if idx is None else idx)
            views = x.shape[0] // B
            images = None if control is None else \
                [torch.cat([f() for f in per_net[a // B : a // B + views]]).to(self.unet.dtype) for per_net in control]
            emb, pooled = c.embeds.repeat(views, 1, 1), c.pooled.repeat(views, 1)
            time_ids = c.time_ids.repeat(x.shape[0], 1)
            time_ids[:, 2:4] = crops[a : a + chunk].to(time_ids)
            x = x.to(self.unet.dtype)
            unet = lambda rows, *a: self._unet(src.dtype, *a, i=i, images=images, rows=rows)
            if self.cfg and self.cfg_apart:
                uncond = unet("uncond", x, t, c.neg_embeds.repeat(views, 1, 1), c.neg_pooled.repeat(views, 1),
                              time_ids)
                cond = unet("cond", x, t, emb, pooled, time_ids)
            elif self.cfg:
                emb = torch.stack([c.neg_embeds.repeat(views, 1, 1), emb], 1).flatten(0, 1)
                pooled = torch.stack([c.neg_pooled.repeat(views, 1), pooled], 1).flatten(0, 1)
                eps = unet("pairs", x.repeat_interleave(2, 0), t, emb, pooled, time_ids.repeat_interleave(2, 0))
                uncond, cond = eps[0::2], eps[1::2]
            else:
                eps = unet("cond", x, t, emb, pooled, time_ids)
            if self.cfg:
                eps = uncond + self.guidance_scale * (cond - uncond)  # ε = ε_u + g·(ε_c − ε_u)
            return sched.step_at(eps, i, src, noise=None if noise is None else noise[a : a + chunk])

        rows = [min(chunk, to_step.shape[0] - a) for a in starts]
        self.calls += len(rows) * (2 if self.cfg and self.cfg_apart else 1)  # as one process makes them
        return torch.cat(self.runner.map(one, rows, to_step))

    def _unet(self, dtype, x, t, emb, pooled, time_ids, i: int, images, rows: str):
        """One UNet call (with the ControlNets' residuals, if any); ε in ``dtype`` (the latents',
        float32: guidance combines in it). ``rows``: "pairs", "uncond" or "cond" (Guide.residuals)."""
        extra = {} if self.guide is None else self.guide.residuals(x, t, emb, pooled, time_ids, images, i, rows)
        return self.unet(x, t, emb, pooled, time_ids, **extra).to(dtype)

    def paths(self, paths: list[Views], noise, t, i: int, compat: bool, scale_index, images=None):
        """Denoise every path's views: all in shared UNet batches when their shapes agree
        (default), or path after path as the reference batches them (``compat``; with ControlNets
        its dilated views are one batch, as its ControlNet pipeline). ``images``: each ControlNet's
        control image at the phase's pixel size (cut per view by ``Views.pixels``)."""
        noises = [None if noise is None else v.take(noise) for v in paths]
        controls = [None if images is None else [v.pixels(im, compat) for im in images] for v in paths]
        if not compat and all(v.to_step.shape[1:] == paths[0].to_step.shape[1:] for v in paths):
            cat = lambda xs: torch.cat(xs) if len(xs) > 1 else xs[0]
            control = None if images is None else [sum((c[n] for c in controls), []) for n in range(len(images))]
            stepped = self(cat([v.to_step for v in paths]), cat([v.model_in for v in paths]),
                           cat([v.crops for v in paths]), t, i, None if noise is None else cat(noises), scale_index,
                           control)
            return stepped.split([v.to_step.shape[0] for v in paths])
        out, first_chunk = [], 0
        for v, nz, control in zip(paths, noises, controls):
            one_batch = images is not None and v.path == "global"  # the reference's dilated batch
            n = v.to_step.shape[0] // self.batch if one_batch else self.view_batch_size
            out.append(self(v.to_step, v.model_in, v.crops, t, i, nz, lambda k, f=first_chunk: scale_index(f + k),
                            control, n))
            first_chunk += -(-v.to_step.shape[0] // (n * self.batch))
        return out


def upscale_step(mech, denoise: Denoiser, s: Settings, z, t, i: int, c, scale: int, jitter_g, noise_g, scale_index,
                 images=None):
    """Step ``i`` (timestep ``t``) of an upscaling phase at dilation ``scale``: local and global
    paths from the same z, denoised together, fused by the cosine weight c^α2. ``images``: the
    phase's control images (one per ControlNet) or None."""
    paths = []
    if s.local_paths:
        paths.append(mech.multidiffusion_views(z, s.window, s.stride, s.view_jitter, jitter_g))
    if s.dilated_sampling:
        std = mech.dilation_blur_std(c, s.sigma, s.cosine_scale_3) if s.blur else None
        paths.append(mech.dilated_views(z, scale, std, exact_stats=not s.reference_compat))
    noise = torch.randn(z.shape, generator=noise_g).to(z.device) if noise_g is not None else None
    stepped = denoise.paths(paths, noise, t, i, s.reference_compat, scale_index, images)
    merged = [v.merge(x) for v, x in zip(paths, stepped)]
    if len(merged) == 1:
        return merged[0]
    return mech.fuse(merged[0], merged[1], c, s.cosine_scale_2)
