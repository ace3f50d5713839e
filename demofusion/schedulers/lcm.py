"""Few-step samplers for consistency-distilled models: LCM (Luo et al. 2023, "Latent Consistency
Models", Algorithm 1 multistep sampling) and TCD (Zheng et al. 2024, "Trajectory Consistency
Distillation", strategic stochastic sampling with γ).

Both work in the ᾱ scale (x_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε, sample unscaled, ``init_noise_sigma`` 1) on
timesteps picked from the distillation's own skipping schedule: with k = ⌊T/N⌋ (N =
``original_inference_steps``) the candidates are k−1, 2k−1, …, Nk−1, and n steps take every
(N/n)-th of them from the top (floor of evenly spaced indices).
"""

from __future__ import annotations

import numpy as np
import torch

from .base import DIFFUSERS_COMMON, SDXL_COMMON, Scheduler
from .schedule import sigmas_from_alphas_cumprod

_CONSISTENCY_EXTRA = {"original_inference_steps": 50, "clip_sample": False, "clip_sample_range": 1.0,
                      "set_alpha_to_one": True, "timestep_scaling": 10.0}


def consistency_timesteps(n: int, original_steps: int, T: int) -> np.ndarray:
    """n descending timesteps from LCM's skipping schedule (int64)."""
    k = T // original_steps
    candidates = (np.arange(1, original_steps + 1) * k - 1)[::-1]
    return candidates[np.floor(np.linspace(0, original_steps, num=n, endpoint=False)).astype(np.int64)]


class _ConsistencyScheduler(Scheduler):
    _defaults = dict(SDXL_COMMON, **_CONSISTENCY_EXTRA)
    _diffusers_defaults = dict(DIFFUSERS_COMMON, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                               timestep_spacing="leading", **_CONSISTENCY_EXTRA)
    _integer_timesteps = True
    init_noise_sigma = 1.0

    def _spaced_timesteps(self, n):
        N, T = self.config["original_inference_steps"], self.config["num_train_timesteps"]
        if not 1 <= N <= T:
            raise ValueError(f"{type(self).__name__}: original_inference_steps={N} must be 1..{T}")
        if n > N:
            raise ValueError(f"{type(self).__name__}.set_timesteps: {n} steps is more than the "
                             f"{N} the model was distilled with (original_inference_steps); use ≤ {N}")
        return consistency_timesteps(n, N, T).astype(np.float64)

    def _set_schedule(self, ts):
        t = ts.long()
        self.sigmas = sigmas_from_alphas_cumprod(torch.cat([self.alphas_cumprod[t], torch.ones(1)]))  # informative
        return t

    def scale_model_input(self, sample, timestep=None):
        """Fed unscaled."""
        return sample

    def scale_model_input_at(self, sample, step_index):
        """Fed unscaled."""
        return sample

    def add_noise(self, original_samples, noise, timesteps):
        """√ᾱ_t·x₀ + √(1−ᾱ_t)·ε for training timestep(s) t."""
        ac = self.alphas_cumprod[[int(v) for v in self._t_values(timesteps)]]
        a = self._per_sample(ac, original_samples)
        return a**0.5 * original_samples + (1 - a) ** 0.5 * noise

    def add_noise_at(self, original_samples, noise, step_index):
        """√ᾱ_t·x₀ + √(1−ᾱ_t)·ε at the ``step_index``-th timestep (ᾱ a CPU scalar)."""
        self._require_schedule("add_noise_at")
        a = self._scalar(self.alphas_cumprod[self.timesteps_cpu[step_index]], original_samples)
        return a**0.5 * original_samples + (1 - a) ** 0.5 * noise

    def _x0_eps(self, x, out, a_t):
        """(x̂₀, ε̂) from an ε or v prediction at ᾱ_t."""
        b_t = 1 - a_t
        if self.config["prediction_type"] == "epsilon":
            return (x - b_t.sqrt() * out) / a_t.sqrt(), out
        return a_t.sqrt() * x - b_t.sqrt() * out, a_t.sqrt() * out + b_t.sqrt() * x

    def step(self, model_output, timestep, sample, generator=None, noise=None, **kw) -> torch.Tensor:
        """diffusers-style: the first call finds its place from ``timestep``, later calls advance."""
        i = self._counted_index(timestep)
        out = self.step_at(model_output, i, sample, generator=generator, noise=noise, **kw)
        self._step_index = i + 1
        return out


class LCMScheduler(_ConsistencyScheduler):
    """LCM multistep sampling: x̂ = c_skip(t)·x + c_out(t)·x̂₀, then re-noised to the next timestep
    (not after the last). One model evaluation per step; stochastic (``noise=``/``generator=``)."""

    stochastic = True

    def step_at(self, model_output, step_index: int, sample, generator=None, noise=None) -> torch.Tensor:
        """c_skip = σ_d²/((s·t)² + σ_d²), c_out = s·t/√((s·t)² + σ_d²) with σ_d = 0.5, s = timestep_scaling;
        x_next = √ᾱ_next·x̂ + √(1−ᾱ_next)·z. Computed in float32."""
        self._require_schedule("step_at")
        self._check_noise(noise, generator, model_output)
        i, ts = step_index, self.timesteps_cpu
        a_t = self.alphas_cumprod[ts[i]]
        x0, _ = self._x0_eps(sample.float(), model_output.float(), a_t)
        if self.config["clip_sample"]:  # applies to the whole-latent prediction
            x0 = x0.clamp(-self.config["clip_sample_range"], self.config["clip_sample_range"])
        scaled = ts[i] * self.config["timestep_scaling"]
        c_skip = 0.25 / (scaled**2 + 0.25)
        c_out = scaled / (scaled**2 + 0.25) ** 0.5
        denoised = c_out * x0 + c_skip * sample.float()
        if i == len(ts) - 1:
            return denoised.to(sample.dtype)
        a_next = self.alphas_cumprod[ts[i + 1]]
        z = noise.float() if noise is not None else self._draw_noise(denoised, generator)
        return (a_next.sqrt() * denoised + (1 - a_next).sqrt() * z).to(sample.dtype)


class TCDScheduler(_ConsistencyScheduler):
    """TCD strategic stochastic sampling with ``gamma`` γ ∈ [0, 1] (0: deterministic; the paper's
    default 0.3): predict x̂₀, ε̂, go to s = ⌊(1−γ)·t_next⌋, then re-noise to t_next. One model
    evaluation per step."""

    _defaults = dict(_ConsistencyScheduler._defaults, gamma=0.3)
    _diffusers_defaults = dict(_ConsistencyScheduler._diffusers_defaults, gamma=0.3)

    @property
    def stochastic(self) -> bool:
        return self.config["gamma"] > 0

    def __init__(self, **config):
        super().__init__(**config)
        if not 0 <= self.config["gamma"] <= 1:
            raise ValueError(f"TCDScheduler: gamma must be in [0, 1], got {self.config['gamma']!r}")

    def step_at(self, model_output, step_index: int, sample, generator=None, noise=None, eta=None) -> torch.Tensor:
        """x_s = √ᾱ_s·x̂₀ + √(1−ᾱ_s)·ε̂;  x_next = √(ᾱ_next/ᾱ_s)·x_s + √(1 − ᾱ_next/ᾱ_s)·z (γ > 0, not
        after the last step). ``eta`` overrides γ (diffusers' name for it in ``step``). Float32."""
        self._require_schedule("step_at")
        self._check_noise(noise, generator, model_output)
        gamma = self.config["gamma"] if eta is None else eta
        if not 0 <= gamma <= 1:
            raise ValueError(f"TCDScheduler.step: gamma must be in [0, 1], got {gamma!r}")
        i, ts = step_index, self.timesteps_cpu
        t_next = ts[i + 1] if i + 1 < len(ts) else torch.tensor(0)
        s = torch.floor((1 - gamma) * t_next).long()
        a_t, a_next, a_s = self.alphas_cumprod[ts[i]], self.alphas_cumprod[t_next], self.alphas_cumprod[s]
        x0, eps = self._x0_eps(sample.float(), model_output.float(), a_t)
        x_s = a_s.sqrt() * x0 + (1 - a_s).sqrt() * eps
        if gamma == 0 or i == len(ts) - 1:
            return x_s.to(sample.dtype)
        z = noise.float() if noise is not None else self._draw_noise(x_s, generator)
        return ((a_next / a_s).sqrt() * x_s + (1 - a_next / a_s).sqrt() * z).to(sample.dtype)
