"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models"), data prediction, B(h) = e^h − 1 ("bh2").

Each step first *corrects* the sample it is given with UniC — using the model output just computed
at that sample and the previous step's sample and x̂₀ — then *predicts* the next sample with UniP.
One model evaluation per step (the corrector reuses the evaluation the predictor needs).

With hh = −h, φ₁ = e^{hh} − 1, and for p = 1..K: R_p = (r₁^{p−1}, …, r_{K−1}^{p−1}, 1),
b_p = p!·φ_{p+1}(hh)/B(hh) (φ_{k+1} = φ_k/hh − 1/k!, φ₂ = φ₁/hh − 1):
    UniP:  x' = (σ'/σ)·x − α'φ₁·m₀ − α'B(hh)·Σ_k ρᵖ_k·D_k,  ρᵖ solves R[:K−1,:K−1]ρ = b[:K−1] (½ for K = 2)
    UniC:  x_c = (σ/σ₋)·x₋ − αφ₁·m₋ − αB(hh)·(Σ_k ρᶜ_k·D_k + ρᶜ_K·(m − m₋)),  ρᶜ solves Rρ = b (½ for K = 1)
with D_k = (m_{−k} − m₀)/r_k, r_k = (λ_{−k} − λ₀)/h.
"""

from __future__ import annotations

import torch

from .base import check_only, sdxl_defaults
from .config import check_choice
from .multistep import SOLVER_COMMON, MultistepSolver, alpha_sigma, half_log_snr

_UNIPC_EXTRA = {"predict_x0": True, "solver_type": "bh2", "disable_corrector": [], "solver_p": None,
                "sigma_min": None, "sigma_max": None, "use_flow_sigmas": False}


def unipc_coefficients(rks: list, h, corrector: bool):
    """ρ (predictor: for D₁..D_{K−1}; corrector: for D₁..D_{K−1} and the new output) of order K = len(rks)+1."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    B_h = torch.expm1(hh)
    K = len(rks) + 1
    if K == 1:
        return h_phi_1, B_h, (torch.tensor([0.5]) if corrector else None)
    if K == 2 and not corrector:
        return h_phi_1, B_h, torch.tensor([0.5])
    r = torch.stack(rks + [torch.ones(())])
    h_phi_k, fact, R, b = h_phi_1 / hh - 1, 1, [], []
    for p in range(1, K + 1):
        R.append(r ** (p - 1))
        b.append(h_phi_k * fact / B_h)
        fact *= p + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R, b = torch.stack(R), torch.stack(b)
    rho = torch.linalg.solve(R, b) if corrector else torch.linalg.solve(R[:-1, :-1], b[:-1])
    return h_phi_1, B_h, rho


class UniPCMultistepScheduler(MultistepSolver):
    """UniPC-bh2, data prediction, ``solver_order`` 1–3 (2 is the usual), ``lower_order_final``,
    ``disable_corrector`` (step indices whose correction is skipped). σ schedules: the model's,
    Karras, exponential (``sigma_min``/``sigma_max`` bound the latter two when set).

    The corrector recomputes the previous step from the *previous* sample and x̂₀. It moves the
    sample it is given by the correction it makes to its own prediction (x_c − x_p), so a change a
    caller makes to the latent between steps (DemoFusion's skip residual) is kept; a caller that
    passes back what ``step_at`` returned gets UniC's x_c exactly (docs/components.md, "Stateful samplers").
    """

    _defaults = sdxl_defaults(SOLVER_COMMON, _UNIPC_EXTRA)
    _diffusers_defaults = dict(SOLVER_COMMON, **_UNIPC_EXTRA)

    def __init__(self, **config):
        super().__init__(**config)
        name = type(self).__name__
        check_choice(name, "solver_type", self.config["solver_type"], ("bh2",))
        check_only(self, {"predict_x0": True, "solver_p": None, "use_flow_sigmas": False})

    def _reset_history(self):
        super()._reset_history()
        self._last_sample = None  # the sample the previous step predicted from (after its correction)
        self._last_order = None
        self._last_out = None  # what the previous step returned (its UniP prediction x_p)

    def _sigma_range(self):
        smin, smax = super()._sigma_range()
        c = self.config
        return (c["sigma_min"] if c["sigma_min"] is not None else smin,
                c["sigma_max"] if c["sigma_max"] is not None else smax)

    def _final_sigma(self, sig):
        # with Karras/exponential σ, diffusers' UniPC ends at the last σ of that schedule
        return sig[-1].item() if self.config["use_karras_sigmas"] or self.config["use_exponential_sigmas"] \
            else super()._final_sigma(sig)

    def _rks(self, now: int, order: int, h, first: int) -> list:
        lam0 = half_log_snr(self.sigmas[now])
        return [(half_log_snr(self.sigmas[first - k]) - lam0) / h for k in range(1, order)]

    def _update(self, x, m, now, nxt, order, first, corrector_out=None):
        """UniP (corrector_out None) or UniC from ``sigmas[now]`` to ``sigmas[nxt]``; ``m`` the x̂₀
        history newest last (m[-1] at ``now``), ``first`` the index the older entries count back from."""
        alpha_t, sigma_t = alpha_sigma(self.sigmas[nxt])
        _, sigma_s = alpha_sigma(self.sigmas[now])
        h = half_log_snr(self.sigmas[nxt]) - half_log_snr(self.sigmas[now])
        rks = self._rks(now, order, h, first)
        h_phi_1, B_h, rho = unipc_coefficients(rks, h, corrector_out is not None)
        m0 = m[-1]
        D = [(m[-(k + 1)] - m0) / rk for k, rk in enumerate(rks, start=1)]
        res = sum((rho[k] * d for k, d in enumerate(D)), torch.zeros_like(x))
        if corrector_out is not None:
            res = res + rho[-1] * (corrector_out - m0)
        return sigma_t / sigma_s * x - alpha_t * h_phi_1 * m0 - alpha_t * B_h * res

    def step_at(self, model_output, step_index: int, sample, generator=None, noise=None) -> torch.Tensor:
        """Correct ``sample`` (from the previous step's, when step_index − 1 was the previous call),
        then predict ``sigmas[i+1]``. Deterministic. Computed in float32."""
        self._require_schedule("step_at")
        i, x = step_index, sample.float()
        x0 = self._data_prediction(x, model_output.float(), i)
        consecutive = self._last_index is not None and i == self._last_index + 1
        if consecutive and (i - 1) not in self.config["disable_corrector"] and self._last_sample is not None:
            x_c = self._update(self._last_sample, self._history, i - 1, i, self._last_order, i - 1, corrector_out=x0)
            x = x_c + (x - self._last_out.float())  # the caller's change since x_p kept (0 if none: exactly x_c)
        earlier = self._remember(i, x0)
        n = len(self.sigmas) - 1
        order = min(self.config["solver_order"], n - i) if self.config["lower_order_final"] \
            else self.config["solver_order"]
        order = min(order, earlier + 1)
        self._last_sample, self._last_order = x, order
        out = self._update(x, self._history, i, i + 1, order, i).to(sample.dtype)
        self._last_out = out.clone()  # a copy: a caller changing ``out`` in place still counts as a change
        return out
