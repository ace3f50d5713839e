"""DPM-Solver++ multistep, orders 1–3, ODE and SDE (Lu et al. 2022, "DPM-Solver++", Algorithm 2 and
its 3rd-order multistep form; the SDE variant of the same paper's §5/appendix, as used by k-diffusion's
``sample_dpmpp_2m_sde``/``3m_sde``).

Notation (multistep.py): α, σ in the variance-preserving scale; λ = log α − log σ; h = λ_next − λ_now;
D₀ = x̂₀ now, D₁, D₂ divided differences of the history of x̂₀ over λ, scaled by h:
r_k = (λ_now−k+1 − λ_now−k)/h; D₁ = (m₀ − m₁)/r₀ (2nd order); for 3rd order
D₁ = D₁⁰ + r₀/(r₀+r₁)(D₁⁰ − D₁¹), D₂ = (D₁⁰ − D₁¹)/(r₀+r₁) with D₁⁰ = (m₀−m₁)/r₀, D₁¹ = (m₁−m₂)/r₁.
"""

from __future__ import annotations

import math

import torch

from .base import check_only, sdxl_defaults
from .config import check_choice
from .multistep import SOLVER_COMMON, MultistepSolver, alpha_sigma, half_log_snr

_DPM_EXTRA = {"algorithm_type": "dpmsolver++", "solver_type": "midpoint", "euler_at_final": False,
              "lambda_min_clipped": -math.inf, "variance_type": None, "use_lu_lambdas": False,
              "use_flow_sigmas": False}


def divided_differences(hist: list, lams: list, h):
    """[D₀, D₁, D₂][:order] from the newest-last x̂₀ history ``hist`` and λ_now, λ_prev, … ``lams``."""
    m0 = hist[-1]
    if len(lams) == 1:
        return [m0]
    r0 = (lams[0] - lams[1]) / h
    d10 = (1.0 / r0) * (m0 - hist[-2])
    if len(lams) == 2:
        return [m0, d10]
    r1 = (lams[1] - lams[2]) / h
    d11 = (1.0 / r1) * (hist[-2] - hist[-3])
    return [m0, d10 + (r0 / (r0 + r1)) * (d10 - d11), (1.0 / (r0 + r1)) * (d10 - d11)]


def ode_update(x, D, ratio, alpha_t, h, midpoint):
    """x' = (σ'/σ)·x − α'(e^{−h}−1)·D₀ [+ D₁ term] [+ D₂ term] (DPM-Solver++ data-prediction ODE)."""
    em1 = torch.exp(-h) - 1.0
    out = ratio * x - (alpha_t * em1) * D[0]
    if len(D) > 1:
        c1 = -0.5 * (alpha_t * em1) if midpoint and len(D) == 2 else alpha_t * (em1 / h + 1.0)
        out = out + c1 * D[1]
    if len(D) > 2:
        out = out - (alpha_t * ((em1 + h) / h**2 - 0.5)) * D[2]
    return out


def sde_update(x, D, ratio, alpha_t, sigma_t, h, midpoint, z):
    """x' = (σ'/σ)e^{−h}·x + α'(1−e^{−2h})·D₀ [+ …] + σ'√(1−e^{−2h})·z (DPM-Solver++ SDE)."""
    one_m = 1.0 - torch.exp(-2.0 * h)
    out = (ratio * torch.exp(-h)) * x + (alpha_t * one_m) * D[0]
    if len(D) > 1:
        c1 = 0.5 * (alpha_t * one_m) if midpoint and len(D) == 2 else alpha_t * (one_m / (-2.0 * h) + 1.0)
        out = out + c1 * D[1]
    if len(D) > 2:
        out = out + (alpha_t * ((one_m - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D[2]
    return out + sigma_t * torch.sqrt(one_m) * z


class DPMSolverMultistepScheduler(MultistepSolver):
    """DPM-Solver++ (``algorithm_type`` "dpmsolver++" or "sde-dpmsolver++"), ``solver_order`` 1–3.

    One model evaluation per step. Lower orders at the start (warm-up) and, with
    ``lower_order_final`` and fewer than 15 steps, for the last two steps; the last step is first
    order with ``euler_at_final`` or ``final_sigmas_type="zero"``. σ schedules: the model's,
    ``use_karras_sigmas``, ``use_exponential_sigmas``.
    """

    _defaults = sdxl_defaults(SOLVER_COMMON, _DPM_EXTRA)
    _diffusers_defaults = dict(SOLVER_COMMON, **_DPM_EXTRA)

    def __init__(self, **config):
        super().__init__(**config)
        name = type(self).__name__
        check_choice(name, "algorithm_type", self.config["algorithm_type"], ("dpmsolver++", "sde-dpmsolver++"))
        check_choice(name, "solver_type", self.config["solver_type"], ("midpoint", "heun"))
        check_only(self, {"lambda_min_clipped": -math.inf, "variance_type": None, "use_lu_lambdas": False,
                          "use_flow_sigmas": False})

    @property
    def stochastic(self) -> bool:
        return self.config["algorithm_type"] == "sde-dpmsolver++"

    def _order_at(self, i: int, earlier: int) -> int:
        n, c = len(self.sigmas) - 1, self.config
        few = c["lower_order_final"] and n < 15
        if i == n - 1 and (c["euler_at_final"] or few or c["final_sigmas_type"] == "zero"):
            return 1
        if i == n - 2 and few:
            return min(2, c["solver_order"], earlier + 1)
        return min(c["solver_order"], earlier + 1)

    def step_at(self, model_output, step_index: int, sample, generator=None, noise=None) -> torch.Tensor:
        """One DPM-Solver++ step from ``sigmas[i]`` to ``sigmas[i+1]``, using the x̂₀ of the previous
        consecutive steps (kept here). SDE: ``noise`` (shape of model_output) or a float32 draw from
        ``generator`` (diffusers' ``randn_tensor`` call), one per step. Computed in float32."""
        self._require_schedule("step_at")
        self._check_noise(noise, generator, model_output)
        i, x = step_index, sample.float()
        x0 = self._data_prediction(x, model_output.float(), i)
        order = self._order_at(i, self._remember(i, x0))
        lams = [half_log_snr(self.sigmas[i - k]) for k in range(order)]
        alpha_t, sigma_t = alpha_sigma(self.sigmas[i + 1])
        _, sigma_s = alpha_sigma(self.sigmas[i])
        h = half_log_snr(self.sigmas[i + 1]) - lams[0]
        D = divided_differences(self._history, lams, h)
        midpoint = self.config["solver_type"] == "midpoint"
        if not self.stochastic:
            return ode_update(x, D, sigma_t / sigma_s, alpha_t, h, midpoint).to(sample.dtype)
        z = noise.float() if noise is not None else self._draw_noise(model_output.float(), generator)
        return sde_update(x, D, sigma_t / sigma_s, alpha_t, sigma_t, h, midpoint, z).to(sample.dtype)
