"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without churn).

Each step σ → σ' costs two model evaluations: an Euler predictor at σ, then a corrector at σ'
averaging the two slopes. As in diffusers the schedule lists every evaluation, so an ordinary
``for t in timesteps`` loop runs it: ``timesteps`` is [t₀, t₁, t₁, t₂, t₂, …, t_{n−1}, t_{n−1}]
(2n−1 entries) and ``sigmas`` [σ₀, σ₁, σ₁, …, σ_{n−1}, σ_{n−1}, 0]. Entry j is a predictor when j is
even and a corrector when j is odd; the last predictor (to σ = 0) needs no corrector.
"""

from __future__ import annotations

import torch

from .base import DIFFUSERS_COMMON, SDXL_COMMON
from .euler import _SigmaScheduler
from .schedule import to_d

_HEUN_EXTRA = {"use_karras_sigmas": False, "use_exponential_sigmas": False, "clip_sample": False,
               "clip_sample_range": 1.0}


class HeunDiscreteScheduler(_SigmaScheduler):
    """Heun sampler (2 evaluations per step, ``len(timesteps) = 2n − 1``); σ schedules: the model's,
    Karras (``use_karras_sigmas``) or exponential (``use_exponential_sigmas``)."""

    _defaults = dict(SDXL_COMMON, **_HEUN_EXTRA)
    _diffusers_defaults = dict(DIFFUSERS_COMMON, **_HEUN_EXTRA)
    stateful = True

    def __init__(self, **config):
        super().__init__(**config)
        self._half = None  # (slope, dt, sample) the predictor leaves for its corrector

    def _reset_history(self):
        self._half = None

    def _set_schedule(self, ts):
        ts, sig = self._schedule_sigmas(ts)
        sig = torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).float()
        # every σ but the first and the final 0 is visited twice: by a corrector, then a predictor
        self.sigmas = torch.cat([sig[:1], sig[1:-1].repeat_interleave(2), sig[-1:]])
        ts = ts.float()
        return torch.cat([ts[:1], ts[1:].repeat_interleave(2)])

    @staticmethod
    def is_corrector(step_index: int) -> bool:
        """Whether evaluation ``step_index`` is the second (corrector) half of a Heun step."""
        return step_index % 2 == 1

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x/√(σ²+1) at the counted step (timesteps repeat, so the counter, not the value, says which)."""
        return self.scale_model_input_at(sample, self._counted_index(timestep))

    def add_noise(self, original_samples, noise, timesteps):
        """x_0 + σ·ε at the first occurrence of each timestep (the predictor's)."""
        idx = [int((self._lookup == v).nonzero().flatten()[0]) for v in self._t_values(timesteps)]
        return original_samples + noise * self._per_sample(self.sigmas[idx], original_samples)

    def step(self, model_output, timestep, sample, generator=None, noise=None) -> torch.Tensor:
        """diffusers-style: the first call finds its place from ``timestep``, later calls advance."""
        i = self._counted_index(timestep)
        out = self.step_at(model_output, i, sample)
        self._step_index = i + 1
        return out

    def step_at(self, model_output, step_index: int, sample, generator=None, noise=None) -> torch.Tensor:
        """Evaluation ``step_index`` of the schedule (deterministic; ``generator``/``noise`` unused).

        Predictor (even j): d = (x − x̂₀(σ))/σ, x' = x + (σ' − σ)·d, remembering (d, σ' − σ, x).
        Corrector (odd j, x = the predictor's x'): d' = (x − x̂₀(σ'))/σ', result x_pred_in + (σ' − σ)·(d + d')/2.
        The corrector must follow its predictor (j − 1). Its result is built from the predictor's
        sample, so a change made to the latent between the two (DemoFusion's skip residual) shapes d′ only.
        """
        self._require_schedule("step_at")
        x, out = sample.float(), model_output.float()
        if not self.is_corrector(step_index):
            sigma, sigma_next = self.sigmas[step_index], self.sigmas[step_index + 1]
            d = to_d(x, sigma, self._clipped(self._denoised(x, sigma, out)))
            dt = sigma_next - sigma
            self._half = (step_index, d, dt, x)
            return (x + d * dt).to(sample.dtype)
        if self._half is None or self._half[0] != step_index - 1:
            raise RuntimeError(f"HeunDiscreteScheduler.step_at({step_index}): a corrector step needs its "
                               f"predictor step {step_index - 1} first (step every evaluation in order)")
        _, d, dt, x_prev = self._half
        sigma_next = self.sigmas[step_index]
        d2 = to_d(x, sigma_next, self._clipped(self._denoised(x, sigma_next, out)))
        self._half = None
        return (x_prev + (d + d2) / 2 * dt).to(sample.dtype)

    def _clipped(self, x0):
        if self.config["clip_sample"]:  # clamp x̂₀ (applies to the whole-latent prediction)
            r = self.config["clip_sample_range"]
            return x0.clamp(-r, r)
        return x0
