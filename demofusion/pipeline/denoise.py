"""The guided UNet on a stack of views: classifier-free guidance, ControlNet residuals, batches of
``view_batch_size`` views, view parallelism across ranks — predictions only, no sampler step.

:class:`GuidedUNet` holds what every UNet call of a run shares (the text conditioning, the
micro-conditioning, the guidance scale, the batch size); the multi-view denoiser
(:class:`~.algorithm.MultiViewDenoiser`) hands it the views of a step and merges what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import parallel
from ..tensors import unset_fake_temporarily


def phase_generators(seed: int, phases: int) -> list[torch.Generator]:
    """One CPU generator per phase, seeded by a 62-bit sub-seed drawn from the root seed.

    The sub-seeds are host bookkeeping (a CPU generator's draw, read once per run): they are
    drawn for real even under a FakeTensorMode (the GPU-readiness test), where tensors hold no data.
    """
    root = torch.Generator().manual_seed(seed)
    with unset_fake_temporarily():
        return [torch.Generator().manual_seed(int(s)) for s in torch.randint(2**62, (phases,), generator=root)]


def steps_of(n: int, phase: int, phases: int, progress: bool):
    """The step indices 0 … n−1, behind a tqdm bar per phase when ``progress`` (on rank 0)."""
    if not progress or parallel.rank() != 0:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=f"phase {phase}/{phases}", unit="step", leave=True)


def needs_noise(scheduler) -> bool:
    """Whether the sampler's step takes a noise canvas: its ``stochastic`` attribute when it has
    one, else Euler-ancestral, or DDIM with η > 0."""
    flag = getattr(scheduler, "stochastic", None)
    if flag is not None:
        return bool(flag)
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
class GuidedUNet:
    unet: torch.nn.Module
    scheduler: object  # for the input scaling x/√(σ²+1) only: the multi-view denoiser never steps
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

    def __call__(self, x: torch.Tensor, crops: torch.Tensor, i: int, chunks: list, control=None) -> torch.Tensor:
        """ε [N·B,C,h,w] of the views x (unscaled latents, view-major) at the schedule's ``i``-th
        timestep, chunk by chunk: ``chunks[k] = (first view, views, σ index of its input scaling)``.
        ``crops`` [N·B,2]: crop coordinates (px); ``control``: a :class:`~.algorithm.ControlCut`
        (its ``rows(a, n)`` per ControlNet) or None. Chunks are dealt to the ranks of a process group,
        which all-gather the predictions."""
        B, c, t = self.batch, self.cond, self.scheduler.timesteps[i]  # t on the device, for the UNet only

        def one(k: int) -> torch.Tensor:  # chunk k: guided UNet call(s)
            first, views, idx = chunks[k]
            a, b = first * B, (first + views) * B
            xs = self.scheduler.scale_model_input_at(x[a:b], idx).to(self.unet.dtype)
            images = None if control is None else [im.to(self.unet.dtype) for im in control.rows(first, views)]
            emb, pooled = c.embeds.repeat(views, 1, 1), c.pooled.repeat(views, 1)
            time_ids = c.time_ids.repeat(b - a, 1)
            time_ids[:, 2:4] = crops[a:b].to(time_ids)
            unet = lambda rows, *args: self._unet(x.dtype, *args, i=i, images=images, rows=rows)
            if self.cfg and self.cfg_apart:
                uncond = unet("uncond", xs, t, c.neg_embeds.repeat(views, 1, 1), c.neg_pooled.repeat(views, 1),
                              time_ids)
                cond = unet("cond", xs, t, emb, pooled, time_ids)
            elif self.cfg:
                emb = torch.stack([c.neg_embeds.repeat(views, 1, 1), emb], 1).flatten(0, 1)
                pooled = torch.stack([c.neg_pooled.repeat(views, 1), pooled], 1).flatten(0, 1)
                eps = unet("pairs", xs.repeat_interleave(2, 0), t, emb, pooled, time_ids.repeat_interleave(2, 0))
                uncond, cond = eps[0::2], eps[1::2]
            else:
                return unet("cond", xs, t, emb, pooled, time_ids)
            return uncond + self.guidance_scale * (cond - uncond)  # ε = ε_u + g·(ε_c − ε_u)

        rows = [views * B for _, views, _ in chunks]
        self.calls += len(rows) * (2 if self.cfg and self.cfg_apart else 1)  # as one process makes them
        out = self.runner.map(one, rows, x)
        return torch.cat(out) if len(out) > 1 else out[0]

    def _unet(self, dtype, x, t, emb, pooled, time_ids, i: int, images, rows: str):
        """One UNet call (with the ControlNets' residuals, if any); ε in ``dtype`` (the latents',
        float32: guidance combines in it). ``rows``: "pairs", "uncond" or "cond" (Guide.residuals)."""
        extra = {} if self.guide is None else self.guide.residuals(x, t, emb, pooled, time_ids, images, i, rows)
        return self.unet(x, t, emb, pooled, time_ids, **extra).to(dtype)
