"""DDIM (Song et al. 2021) in the ᾱ parametrisation: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε."""

from __future__ import annotations

import torch

from .base import DIFFUSERS_COMMON, SDXL_COMMON, Scheduler
from .schedule import ddim_prev, ddim_sigma, ddim_x0_eps, sigmas_from_alphas_cumprod

_DDIM_EXTRA = {"set_alpha_to_one": False, "clip_sample": False, "clip_sample_range": 1.0, "eta": 0.0}


class DDIMScheduler(Scheduler):
    """DDIM sampler; ``eta`` ≥ 0 (0: deterministic DDIM, 1: DDPM-like noise).

    ``DDIMScheduler()`` uses SDXL's schedule (leading spacing, steps_offset 1, set_alpha_to_one
    False). ``from_config`` fills missing keys with diffusers' DDIM defaults (among them
    clip_sample=True, set_alpha_to_one=True, leading spacing). ``thresholding`` is not supported.
    Like diffusers, the previous timestep is t − ⌊T/n⌋ whatever the spacing (for linspace spacing
    this is not the next timestep of the schedule).
    """

    _defaults = dict(SDXL_COMMON, **_DDIM_EXTRA)
    _diffusers_defaults = dict(DIFFUSERS_COMMON, timestep_spacing="leading", set_alpha_to_one=True,
                               clip_sample=True, clip_sample_range=1.0, eta=0.0)
    _integer_timesteps = True

    def __init__(self, **config):
        super().__init__(**config)
        if not self.config["eta"] >= 0:
            raise ValueError(f"DDIMScheduler: eta must be ≥ 0, got {self.config['eta']!r}")
        # ᾱ used after the last step: 1 (fully denoised) or ᾱ_0
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]
        self._step_alphas = None  # (ᾱ_t [n], ᾱ_prev [n]), set by set_timesteps

    @property
    def stochastic(self) -> bool:
        return self.config["eta"] > 0

    init_noise_sigma = 1.0  # the sample is in the ᾱ scale: unit variance at the start

    def _set_schedule(self, ts):
        # informative: σ = √((1−ᾱ)/ᾱ) at each timestep, then at the final ᾱ (float32 [n+1], CPU)
        ac = torch.cat([self.alphas_cumprod[ts.long()], self.final_alpha_cumprod.reshape(1)])
        self.sigmas = sigmas_from_alphas_cumprod(ac)
        # ᾱ_t and ᾱ_prev of every step (prev = t − ⌊T/n⌋; ᾱ_final below 0), for step_at
        t = ts.long()
        prev = t - self.config["num_train_timesteps"] // len(t)
        self._step_alphas = (self.alphas_cumprod[t],
                             torch.where(prev >= 0, self.alphas_cumprod[prev.clamp(min=0)], self.final_alpha_cumprod))
        return t  # timesteps: int64 [n], descending

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """DDIM feeds the sample unscaled."""
        return sample

    def scale_model_input_at(self, sample: torch.Tensor, step_index: int) -> torch.Tensor:
        """DDIM feeds the sample unscaled."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε for any training timestep(s) t (scalar or [B])."""
        T = len(self.alphas_cumprod)
        vals = [float(v) for v in self._t_values(timesteps)]
        bad = [v for v in vals if v != int(v) or not 0 <= v < T]
        if bad:
            raise ValueError(f"DDIMScheduler.add_noise: timestep {bad[0]:g} is not a training timestep 0..{T - 1}")
        ac = self.alphas_cumprod[[int(v) for v in vals]]
        a = self._per_sample(ac, original_samples)
        return a**0.5 * original_samples + (1 - a) ** 0.5 * noise

    def add_noise_at(self, original_samples: torch.Tensor, noise: torch.Tensor, step_index: int) -> torch.Tensor:
        """x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε at the ``step_index``-th timestep (ᾱ a CPU scalar: no lookup)."""
        self._require_schedule("add_noise_at")
        a = self._scalar(self._step_alphas[0][step_index], original_samples)
        return a**0.5 * original_samples + (1 - a) ** 0.5 * noise

    def step(self, model_output, timestep, sample, generator=None, noise=None, eta=None) -> torch.Tensor:
        """One DDIM step t → t − ⌊T/n⌋ (eq. 12 of the DDIM paper).

        ``eta`` overrides the configured η. With η > 0 the added noise is ``noise`` when given, else
        ``torch.randn(model_output.shape, dtype=model_output.dtype, generator=generator,
        device=generator.device if generator else model_output.device)`` moved to model_output's
        device (diffusers' draw). Computed in float32, returned in ``sample.dtype``.
        """
        return self.step_at(model_output, self.index_for_timestep(timestep), sample, generator, noise, eta)

    def step_at(self, model_output, step_index: int, sample, generator=None, noise=None, eta=None) -> torch.Tensor:
        """``step`` at the schedule's ``step_index``-th timestep (ᾱ_t, ᾱ_prev as CPU scalars)."""
        eta = self.config["eta"] if eta is None else eta
        if not eta >= 0:
            raise ValueError(f"DDIMScheduler.step: eta must be ≥ 0, got {eta!r}")
        self._check_noise(noise, generator, model_output)
        self._require_schedule("step_at")
        a_t, a_prev = self._step_alphas[0][step_index], self._step_alphas[1][step_index]
        x, out = sample.float(), model_output.float()
        x0, eps = ddim_x0_eps(x, a_t, out, self.config["prediction_type"])
        if self.config["clip_sample"]:  # clamp x̂_0 to [−r, r]
            r = self.config["clip_sample_range"]
            x0 = x0.clamp(-r, r)
        std = ddim_sigma(a_t, a_prev, eta)
        prev = ddim_prev(x0, eps, a_prev, std)
        if eta > 0:
            z = noise if noise is not None else self._draw_noise(model_output, generator)
            prev = prev + std * z.float()
        return prev.to(sample.dtype)
