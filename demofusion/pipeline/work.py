"""The work of a run, counted from the same view layout and batching the denoiser uses: single-view
UNet evaluations per phase in one process (the dry run's work line, the UI, benchmarks) and on the
busiest of N ranks (benchmarks/distributed.py)."""

from __future__ import annotations

from .algorithm import view_layout
from .reference import DEFAULT, Policy
from .steps import phase_steps, sampler_evaluations


def _evaluations_per_view(s, k: int) -> int:
    """UNet evaluations one view of phase ``k`` gets: the steps the phase runs (``phase_steps``) of its sampler."""
    n, first = phase_steps(s, k)
    return sampler_evaluations(getattr(s, "counted_sampler", None), n - first)


def unet_evaluations(s, layout=view_layout) -> list[int]:
    """Single-view UNet forwards per phase (× 2 with guidance): the run's work."""
    return [sum(p.count for p in layout(s, k)) * _evaluations_per_view(s, k) * (2 if s.cfg else 1)
            for k in range(s.phases)]


def rank_evaluations(s, ranks: int, layout=view_layout, policy: Policy = DEFAULT) -> list[int]:
    """Single-view UNet forwards per phase on the busiest of ``ranks`` ranks, the views batched and
    split as the denoiser does (:meth:`~.reference.Policy.step_chunks`, ``s.view_batch_size`` a
    call): a view with both CFG halves counts 2, a lone half 1; a stack of one chunk runs on
    every rank (:class:`~demofusion.parallel.ViewParallel`)."""
    out, rows = [], 2 if s.cfg else 1
    for k in range(s.phases):
        work = [0] * ranks
        for _, cut in policy.step_chunks(layout(s, k), s.view_batch_size, ranks, s.cfg, s.control is not None):
            for c in cut:
                n = c.views * (1 if c.half else rows)
                for r in (range(ranks) if len(cut) == 1 else [c.rank % ranks]):
                    work[r] += n
        out.append(max(work) * _evaluations_per_view(s, k))
    return out
