"""How many steps each phase runs, from where, and what they cost in UNet evaluations.

The paper restarts every phase from pure noise with the run's steps. ``steps_per_phase`` gives
each phase its own count; ``upscale_strength`` s starts every upscaling phase where a fraction s
of its schedule remains, from the upsampled latent noised to that step (SDEdit, Meng et al. 2022),
the skip residual acting from there on (docs/algorithm.md, "Fewer evaluations").
"""

from __future__ import annotations

from ..schedulers import by_name, sampler_key


def upscale_start(n: int, strength: float) -> int:
    """The first step an upscaling phase of ``n`` steps runs: where a fraction ``strength`` of the
    schedule remains (⌊n·strength + ½⌋ steps, at least 1), SDEdit-style; 0 at strength 1 (the paper)."""
    return n - max(1, min(n, int(n * strength + 0.5)))


def phase_steps(s, k: int) -> tuple[int, int]:
    """(steps of phase ``k``'s schedule, the first step it runs): ``steps_per_phase[k]`` or the run's
    steps; an upscaling phase starts at :func:`upscale_start` of ``upscale_strength``."""
    per_phase = getattr(s, "steps_per_phase", None)
    n = per_phase[k] if per_phase else s.num_inference_steps
    return n, upscale_start(n, getattr(s, "upscale_strength", 1.0)) if k >= s.first_upscale else 0


def sampler_evaluations(sampler: str | None, steps: int) -> int:
    """UNet evaluations of ``steps`` sampler steps: one each, but Heun's two less the last corrector."""
    return 2 * steps - 1 if sampler in ("heun", "HeunDiscreteScheduler") else steps


def first_entry(sched, step: int) -> int:
    """The schedule entry where step ``step`` begins: Heun lists two evaluations a step
    (a predictor at entry 2j, its corrector at 2j + 1), every other sampler one."""
    return 2 * step if hasattr(sched, "is_corrector") else step


def run_scheduler(scheduler, s):
    """The sampler of run ``s``: the pipeline's ``scheduler``, or the one the call (or its preset)
    names, built on the model's schedule (a new instance: its multistep history is the run's)."""
    if s.sampler is None and s.sigmas is None and s.timestep_spacing is None:
        return scheduler
    return by_name(s.sampler or sampler_key(scheduler), scheduler, s.timestep_spacing, s.sigmas)
