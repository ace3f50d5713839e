"""What the multistep exponential-integrator solvers (DPM-Solver++, UniPC) share.

They work in the variance-preserving scale x_t = α_t·x_0 + σ_t·ε with α_t = 1/√(σ²+1), σ_t = σ·α_t
(σ the variance-exploding noise level), in half-log-SNR time λ = log α_t − log σ_t, and integrate
the data prediction x̂₀ (Lu et al. 2022, "DPM-Solver++"). The sample is never rescaled for the
model (``init_noise_sigma`` = 1). Earlier steps' x̂₀ are kept in the scheduler: they are forgotten
by ``set_timesteps`` and whenever a step is not the one after the previous step.
"""

from __future__ import annotations

import torch

from .base import DIFFUSERS_COMMON, Scheduler
from .euler import sigma_kind
from .schedule import SIGMA_SCHEDULES, interp_sigmas, sigma_to_t, sigmas_from_alphas_cumprod, solver_timesteps

SOLVER_COMMON = dict(DIFFUSERS_COMMON, solver_order=2, lower_order_final=True, use_karras_sigmas=False,
                     use_exponential_sigmas=False, final_sigmas_type="zero")


def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) of a variance-exploding σ: α_t = 1/√(σ²+1), σ_t = σ·α_t."""
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def half_log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """λ = log α_t − log σ_t (= −log σ; +∞ at σ = 0)."""
    alpha, sigma_t = alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(sigma_t)


class MultistepSolver(Scheduler):
    """Base of DPMSolverMultistepScheduler and UniPCMultistepScheduler."""

    _integer_timesteps = True
    _max_order = 3
    stateful = True

    def __init__(self, **config):
        super().__init__(**config)
        name = type(self).__name__
        order = self.config["solver_order"]
        if order not in range(1, self._max_order + 1):
            raise ValueError(f"{name}: solver_order must be 1..{self._max_order}, got {order!r}")
        if self.config["final_sigmas_type"] not in ("zero", "sigma_min"):
            raise ValueError(f"{name}: final_sigmas_type must be 'zero' or 'sigma_min', "
                             f"got {self.config['final_sigmas_type']!r}")
        sigma_kind(self.config)  # both Karras and exponential → error now, not at set_timesteps
        self.train_sigmas = sigmas_from_alphas_cumprod(self.alphas_cumprod)
        self._reset_history()

    init_noise_sigma = 1.0

    def _reset_history(self):
        self._history = []  # x̂₀ of the latest consecutive steps, newest last
        self._last_index = None

    def _spaced_timesteps(self, n):
        return solver_timesteps(self.config["timestep_spacing"], n, self.config["num_train_timesteps"],
                                self.config["steps_offset"])

    def _set_schedule(self, ts):
        kind = sigma_kind(self.config)
        if kind is None:  # the model's σ at the spaced timesteps
            sig = interp_sigmas(ts, self.train_sigmas)
        else:  # Karras / exponential σ spanning the whole training range, mapped back to timesteps
            sig = SIGMA_SCHEDULES[kind](*self._sigma_range(), len(ts))
            ts = sigma_to_t(sig, self.train_sigmas)
            # Karras timesteps are rounded, exponential ones truncated (as diffusers does)
            ts = ts.round() if kind == "karras" and self.config["beta_schedule"] != "squaredcos_cap_v2" else ts
        last = self._final_sigma(sig) if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = torch.cat([sig, torch.tensor([last], dtype=torch.float64)]).float()
        return ts.long()

    def _sigma_range(self) -> tuple[float, float]:
        return self.train_sigmas[0].item(), self.train_sigmas[-1].item()

    def _final_sigma(self, sig: torch.Tensor) -> float:
        """The last σ with final_sigmas_type="sigma_min": the smallest training σ."""
        return self.train_sigmas[0].item()

    # ------------------------------------------------------------ model I/O
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The solvers feed the sample unscaled."""
        return sample

    def scale_model_input_at(self, sample: torch.Tensor, step_index: int) -> torch.Tensor:
        """The solvers feed the sample unscaled."""
        return sample

    def add_noise(self, original_samples, noise, timesteps):
        """α_t·x_0 + σ_t·ε with σ at each timestep's place in the current schedule."""
        idx = [self._index_of(v) for v in self._t_values(timesteps)]
        alpha, sigma_t = alpha_sigma(self._per_sample(self.sigmas[idx], original_samples))
        return alpha * original_samples + sigma_t * noise

    def add_noise_at(self, original_samples, noise, step_index):
        """α_t·x_0 + σ_t·ε at the ``step_index``-th step (CPU scalars: no lookup, no copy)."""
        self._require_schedule("add_noise_at")
        alpha, sigma_t = alpha_sigma(self.sigmas[step_index])
        like = original_samples
        return self._scalar(alpha, like) * original_samples + self._scalar(sigma_t, like) * noise

    def _data_prediction(self, x, out, step_index):
        """x̂₀ from the model output (ε or v) at ``sigmas[step_index]``."""
        alpha, sigma_t = alpha_sigma(self.sigmas[step_index])
        if self.config["prediction_type"] == "epsilon":
            return (x - sigma_t * out) / alpha
        return alpha * x - sigma_t * out

    def _remember(self, step_index: int, x0) -> int:
        """Add this step's x̂₀ to the history (restarted if the previous step was not step_index − 1);
        returns how many earlier consecutive steps the history held before it."""
        if self._last_index is None or step_index != self._last_index + 1:
            self._history = []
        earlier = len(self._history)
        self._history = (self._history + [x0])[-self.config["solver_order"]:]
        self._last_index = step_index
        return earlier

    def step(self, model_output, timestep, sample, generator=None, noise=None) -> torch.Tensor:
        """diffusers-style: the first call finds its place from ``timestep``, later calls advance."""
        i = self._counted_index(timestep)
        out = self.step_at(model_output, i, sample, generator=generator, noise=noise)
        self._step_index = i + 1
        return out
