"""Euler (SDXL base's sampler) and Euler-ancestral (SDXL-Turbo's) in the σ parametrisation.

The sample lives in the variance-exploding scale x = x_0 + σ·ε (so noise starts at σ_max), the
model sees x/√(σ²+1) (``scale_model_input``), and one step moves σ_i → σ_{i+1}.
"""

from __future__ import annotations

import torch

from .base import DIFFUSERS_COMMON, SDXL_COMMON, Scheduler
from .config import SDXL_TURBO_CONFIG, check_choice
from .schedule import (SIGMA_SCHEDULES, ancestral_split, denoised_from_eps, denoised_from_v, interp_sigmas,
                       sigma_to_t, sigmas_from_alphas_cumprod, to_d)

_EULER_EXTRA = {
    "interpolation_type": "linear",
    "timestep_type": "discrete",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "sigma_min": None,
    "sigma_max": None,
    "final_sigmas_type": "zero",
}


def sigma_kind(config: dict) -> str | None:
    """"karras", "exponential" or None (the model's σ) from ``use_karras_sigmas`` / ``use_exponential_sigmas``."""
    karras, expo = config.get("use_karras_sigmas", False), config.get("use_exponential_sigmas", False)
    if karras and expo:
        raise ValueError("use_karras_sigmas and use_exponential_sigmas are both set; choose one")
    return "karras" if karras else "exponential" if expo else None


class _SigmaScheduler(Scheduler):
    """Shared by Euler and Euler-ancestral: σ table, input scaling, add_noise."""

    _integer_timesteps = False

    def __init__(self, **config):
        super().__init__(**config)
        self.train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)  # float32 [T], by increasing t

    def _schedule_sigmas(self, ts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps float64 [n], σ float64 [n]) before the final σ is appended: the model's σ at
        the spaced timesteps, or Karras / exponential σ between their ends (``sigma_min`` /
        ``sigma_max`` when configured), each mapped back to a fractional timestep."""
        sig = interp_sigmas(ts, self.train_sigmas)
        kind = sigma_kind(self.config)
        if kind is None:
            return ts, sig
        smin = self.config.get("sigma_min") if self.config.get("sigma_min") is not None else sig[-1].item()
        smax = self.config.get("sigma_max") if self.config.get("sigma_max") is not None else sig[0].item()
        sig = SIGMA_SCHEDULES[kind](smin, smax, len(ts))
        return sigma_to_t(sig, self.train_sigmas), sig

    def _final_sigma(self) -> float:
        return 0.0

    def _set_schedule(self, ts):
        ts, sig = self._schedule_sigmas(ts)
        sig = torch.cat([sig, torch.tensor([self._final_sigma()], dtype=torch.float64)])
        self.sigmas = sig.float()  # float32 [n+1], on the CPU (scalars for the step maths)
        return ts.float()  # timesteps: float32 [n], descending

    # ------------------------------------------------------------ public API
    @property
    def init_noise_sigma(self) -> float:
        """Std of the starting noise: σ_max for linspace/trailing, √(σ_max²+1) for leading spacing."""
        return self.init_sigma().item()

    def init_sigma(self) -> torch.Tensor:
        """``init_noise_sigma`` as a 0-d float32 CPU tensor (no host read)."""
        sigmas = self.sigmas if self.sigmas is not None else self.train_sigmas
        smax = sigmas.max()
        if self.config["timestep_spacing"] == "leading":
            smax = (smax**2 + 1) ** 0.5
        return smax

    def sigma_at(self, t) -> torch.Tensor:
        """σ for each timestep in ``t`` (float32 [k], CPU). Before set_timesteps, t indexes the training table."""
        vals = self._t_values(t)
        if self.timesteps is None:
            T = len(self.train_sigmas)
            bad = [v for v in vals if v != int(v) or not 0 <= v < T]
            if bad:
                raise ValueError(f"timestep {bad[0]:g} is not a training timestep 0..{T - 1}")
            return self.train_sigmas[[int(v) for v in vals]]
        return self.sigmas[[self._index_of(v) for v in vals]]

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Model input c_in·x = x/√(σ²+1); ``timestep`` scalar, or [B] for one per sample."""
        sigma = self.sigma_at(timestep)  # float32: the factor is formed in float32 as in diffusers
        return sample / self._per_sample((sigma**2 + 1) ** 0.5, sample)

    def scale_model_input_at(self, sample: torch.Tensor, step_index: int) -> torch.Tensor:
        """x/√(σ²+1) with σ = ``sigmas[step_index]`` (index n: the final σ). For reproducing the
        reference pipeline's stale input scaling (docs/algorithm.md, reference quirk 1)."""
        self._require_schedule("scale_model_input_at")
        return sample / (self.sigmas[step_index] ** 2 + 1) ** 0.5

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """Forward process in σ form: x_t = x_0 + σ_t·ε; ``timesteps`` scalar or [B]."""
        sigma = self._per_sample(self.sigma_at(timesteps), original_samples)
        return original_samples + noise * sigma

    def add_noise_at(self, original_samples: torch.Tensor, noise: torch.Tensor, step_index: int) -> torch.Tensor:
        """x_t = x_0 + σ_t·ε at the ``step_index``-th timestep (σ a CPU scalar: no lookup, no copy)."""
        self._require_schedule("add_noise_at")
        return original_samples + noise * self._scalar(self.sigmas[step_index], original_samples)

    def _denoised(self, x, sigma, out):
        if self.config["prediction_type"] == "epsilon":
            return denoised_from_eps(x, sigma, out)
        return denoised_from_v(x, sigma, out)

    def _step_sigmas(self, i: int):
        self._require_schedule("step_at")
        return self.sigmas[i], self.sigmas[i + 1]

    def step(self, model_output, timestep, sample, generator=None, noise=None) -> torch.Tensor:
        """One step from ``timestep`` (located in the schedule by value): see :meth:`step_at`."""
        return self.step_at(model_output, self.index_for_timestep(timestep), sample, generator, noise)


class EulerDiscreteScheduler(_SigmaScheduler):
    """Euler method on the probability-flow ODE (k-diffusion ``sample_euler``, no churn).

    ``EulerDiscreteScheduler()`` is SDXL base's scheduler; ``from_config`` reads diffusers' files.
    Options: timestep_spacing leading/trailing/linspace, steps_offset, use_karras_sigmas
    (with sigma_min/sigma_max), final_sigmas_type zero/sigma_min, epsilon/v_prediction.
    """

    _defaults = dict(SDXL_COMMON, **_EULER_EXTRA)
    _diffusers_defaults = dict(DIFFUSERS_COMMON, **_EULER_EXTRA)

    def __init__(self, **config):
        super().__init__(**config)
        name = type(self).__name__
        check_choice(name, "interpolation_type", self.config["interpolation_type"], ("linear",))
        check_choice(name, "timestep_type", self.config["timestep_type"], ("discrete",))
        check_choice(name, "final_sigmas_type", self.config["final_sigmas_type"], ("zero", "sigma_min"))

    def _final_sigma(self) -> float:
        # "sigma_min": end at the smallest training σ instead of 0
        return self.train_sigmas[0].item() if self.config["final_sigmas_type"] == "sigma_min" else 0.0

    def step_at(self, model_output, step_index: int, sample, generator=None, noise=None) -> torch.Tensor:
        """One Euler step σ → σ_next:  x_next = x + (σ_next − σ)·(x − x̂_0)/σ.

        Deterministic (``generator``/``noise`` accepted and unused). Computed in float32, returned in
        ``sample.dtype``. ``step(…, timestep, …)`` locates the step from ``timestep`` alone (no counter).
        """
        sigma, sigma_next = self._step_sigmas(step_index)
        x, out = sample.float(), model_output.float()
        denoised = self._denoised(x, sigma, out)
        d = to_d(x, sigma, denoised)
        return (x + d * (sigma_next - sigma)).to(sample.dtype)


class EulerAncestralDiscreteScheduler(_SigmaScheduler):
    """Euler-ancestral (k-diffusion ``sample_euler_ancestral``, η = 1).

    ``EulerAncestralDiscreteScheduler()`` is SDXL-Turbo's scheduler (trailing spacing).
    """

    _defaults = {k: v for k, v in SDXL_TURBO_CONFIG.items() if k in DIFFUSERS_COMMON}
    _diffusers_defaults = DIFFUSERS_COMMON
    stochastic = True

    def step_at(self, model_output, step_index: int, sample, generator=None, noise=None) -> torch.Tensor:
        """One ancestral step:  x_next = x + (σ_down − σ)·(x − x̂_0)/σ + σ_up·z.

        ``z`` is ``noise`` when given (shape of model_output), else drawn as
        ``torch.randn(model_output.shape, dtype=model_output.dtype, generator=generator,
        device=generator.device if generator else model_output.device)`` moved to model_output's
        device — the same call diffusers makes, so a generator in the same state gives the same z.
        One draw per call, also on the last step (σ_up = 0), as diffusers does.
        Computed in float32, returned in ``sample.dtype``; ``step(…, timestep, …)`` locates the step
        from ``timestep`` alone.
        """
        self._check_noise(noise, generator, model_output)
        sigma, sigma_next = self._step_sigmas(step_index)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next)
        x, out = sample.float(), model_output.float()
        denoised = self._denoised(x, sigma, out)
        d = to_d(x, sigma, denoised)
        x = x + d * (sigma_down - sigma)
        z = noise if noise is not None else self._draw_noise(model_output, generator)
        return (x + z.float() * sigma_up).to(sample.dtype)
