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


def steps_of(n: int, phase: int, phases: int, progress: bool, start: int = 0):
    """The step indices ``start`` … n−1, behind a tqdm bar per phase when ``progress`` (on rank 0)."""
    if not progress or parallel.rank() != 0:
        return range(start, n)
    from tqdm.auto import tqdm

    return tqdm(range(start, n), desc=f"phase {phase}/{phases}", unit="step", leave=True)


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
    zero_negative: bool = False  # neg_embeds are SDXL's forced zeros: their cross-attention is skipped


ZERO_ROWS = {"pairs": slice(0, None, 2), "uncond": slice(None)}  # the zero-context rows of each kind of call


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
        timestep, chunk by chunk: ``chunks[k] = (chunk, σ index of its input scaling)``, a
        :class:`~.reference.Chunk` (its views, rank and CFG half). ``crops`` [N·B,2]: crop
        coordinates (px); ``control``: a :class:`~.algorithm.ControlCut` (its ``rows(a, n)`` per
        ControlNet) or None. Chunks run on their ranks of a process group, which all-gather the
        predictions; a view's lone CFG halves are combined after the gather."""
        B, c, t = self.batch, self.cond, self.scheduler.timesteps[i]  # t on the device, for the UNet only

        def one(k: int) -> torch.Tensor:  # chunk k: guided UNet call(s), or one CFG half
            chunk, idx = chunks[k]
            first, views = chunk.first, chunk.views
            a, b = first * B, (first + views) * B
            xs = self.scheduler.scale_model_input_at(x[a:b], idx).to(self.unet.dtype)
            images = None if control is None else [im.to(self.unet.dtype) for im in control.rows(first, views)]
            emb, pooled = c.embeds.repeat(views, 1, 1), c.pooled.repeat(views, 1)
            neg = lambda: (c.neg_embeds.repeat(views, 1, 1), c.neg_pooled.repeat(views, 1))
            time_ids = c.time_ids.repeat(b - a, 1)
            time_ids[:, 2:4] = crops[a:b].to(time_ids)
            unet = lambda rows, *args: self._unet(x.dtype, *args, i=i, images=images, rows=rows)
            if chunk.half is not None:  # one CFG half alone: combined with its other half after the gather
                return unet(chunk.half, xs, t, *(neg() if chunk.half == "uncond" else (emb, pooled)), time_ids)
            if self.cfg and self.cfg_apart:
                uncond = unet("uncond", xs, t, *neg(), time_ids)
                cond = unet("cond", xs, t, emb, pooled, time_ids)
            elif self.cfg:
                n_emb, n_pooled = neg()
                emb = torch.stack([n_emb, emb], 1).flatten(0, 1)
                pooled = torch.stack([n_pooled, pooled], 1).flatten(0, 1)
                eps = unet("pairs", xs.repeat_interleave(2, 0), t, emb, pooled, time_ids.repeat_interleave(2, 0))
                uncond, cond = eps[0::2], eps[1::2]
            else:
                return unet("cond", xs, t, emb, pooled, time_ids)
            return self.guided(uncond, cond)

        rows = [ch.views * B for ch, _ in chunks]
        # as one process makes them
        self.calls += sum(2 if self.cfg and self.cfg_apart and ch.half is None else 1 for ch, _ in chunks)
        out = self.runner.map(one, rows, x, [ch.rank for ch, _ in chunks])
        out = self.join_halves(out, [ch for ch, _ in chunks])
        return torch.cat(out) if len(out) > 1 else out[0]

    def guided(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return uncond + self.guidance_scale * (cond - uncond)  # ε = ε_u + g·(ε_c − ε_u)

    def join_halves(self, eps: list, chunks: list) -> list:
        """The chunks' predictions with each lone (uncond, cond) pair of halves guided into one."""
        out, k = [], 0
        while k < len(eps):
            if chunks[k].half == "uncond":
                out.append(self.guided(eps[k], eps[k + 1]))
                k += 2
            else:
                out.append(eps[k])
                k += 1
        return out

    def _unet(self, dtype, x, t, emb, pooled, time_ids, i: int, images, rows: str):
        """One UNet call (with the ControlNets' residuals, if any); ε in ``dtype`` (the latents',
        float32: guidance combines in it). ``rows``: "pairs", "uncond" or "cond" (Guide.residuals).
        The unconditional rows of SDXL's forced-zero negative skip their cross-attention (the
        UNet writes to_out's bias: bit for bit the computed value)."""
        zero = {"zero_context": ZERO_ROWS[rows]} if self.cond.zero_negative and rows in ZERO_ROWS else {}
        extra = {} if self.guide is None else self.guide.residuals(x, t, emb, pooled, time_ids, images, i, rows,
                                                                   **zero)
        return self.unet(x, t, emb, pooled, time_ids, **extra, **zero).to(dtype)
