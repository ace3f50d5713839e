"""Noise-schedule maths shared by the samplers: small pure functions (k-diffusion style).

Notation: T training steps, β_t the betas, ᾱ_t = ∏_{s≤t}(1 − β_s), and the variance-exploding
noise level σ_t = √((1 − ᾱ_t)/ᾱ_t), so that x_t/√ᾱ_t = x_0 + σ_t·ε.

Tables are float32 like the released models' schedulers; timestep spacings are computed with
numpy in float64 exactly as diffusers does, so rounding ties (e.g. 62.5 → 62) land identically.
"""

from __future__ import annotations

import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing", "linspace")


# ---------------------------------------------------------------- training schedule
def make_betas(schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float,
               trained_betas=None) -> torch.Tensor:
    """β_0..β_{T−1} (float32)."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    T = num_train_timesteps
    if schedule == "linear":  # β_t = β_start + (β_end − β_start)·t/(T−1)
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if schedule == "scaled_linear":  # β_t = (√β_start + (√β_end − √β_start)·t/(T−1))²
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if schedule == "squaredcos_cap_v2":  # β_t = min(1 − ᾱ((t+1)/T)/ᾱ(t/T), 0.999), ᾱ(s) = cos²((s+0.008)/1.008·π/2)
        abar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)],
                            dtype=torch.float32)
    raise ValueError(f"unknown beta_schedule {schedule!r}; supported: {', '.join(BETA_SCHEDULES)}")


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 − β_s)."""
    return torch.cumprod(1.0 - betas, dim=0)


def sigmas_from_alphas_cumprod(ac: torch.Tensor) -> torch.Tensor:
    """σ_t = √((1 − ᾱ_t)/ᾱ_t), indexed by training timestep t (increasing)."""
    return ((1 - ac) / ac) ** 0.5


# ---------------------------------------------------------------- inference timesteps
def spaced_timesteps(spacing: str, n: int, num_train_timesteps: int, steps_offset: int = 0,
                     integer: bool = True) -> np.ndarray:
    """Descending timesteps t_0 > … > t_{n−1} (float64; whole numbers unless linspace and not integer).

    leading:  t_i = (n−1−i)·⌊T/n⌋ + steps_offset
    trailing: t_i = round(T − i·T/n) − 1
    linspace: t_i = (T−1)·(n−1−i)/(n−1)   (rounded when ``integer``, as DDIM does)
    """
    T = num_train_timesteps
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        # numpy's float arange yields one extra point (→ t = −1) for some n (61, 103, …, 998), and
        # diffusers keeps it; we keep exactly n.
        return np.arange(T, 0, -T / n)[:n].round() - 1
    if spacing == "linspace":
        if integer:
            return np.linspace(0, T - 1, n).round()[::-1].copy()
        return np.linspace(0, T - 1, n, dtype=np.float32)[::-1].astype(np.float64)
    raise ValueError(f"unknown timestep_spacing {spacing!r}; supported: {', '.join(SPACINGS)}")


def solver_timesteps(spacing: str, n: int, num_train_timesteps: int, steps_offset: int = 0) -> np.ndarray:
    """The multistep solvers' (DPM-Solver, UniPC) spacing: n of n+1 points, the last (t = 0) dropped
    (integers, float64, descending).

    leading:  t_i = (n−i)·⌊T/(n+1)⌋ + steps_offset
    trailing: t_i = round(T − i·T/n) − 1
    linspace: t_i = round((T−1)·(n−i)/n)
    """
    T = num_train_timesteps
    if spacing == "leading":
        return (np.arange(0, n + 1) * (T // (n + 1))).round()[::-1][:-1].astype(np.float64) + steps_offset
    if spacing == "trailing":
        return spaced_timesteps(spacing, n, T)
    if spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy()
    raise ValueError(f"unknown timestep_spacing {spacing!r}; supported: {', '.join(SPACINGS)}")


def interp_sigmas(timesteps: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """σ(t) by linear interpolation in the table: σ(t) = σ_⌊t⌋ + (t − ⌊t⌋)·(σ_⌊t⌋+1 − σ_⌊t⌋) (float64)."""
    table = train_sigmas.double()
    t = timesteps.double().clamp(0, len(table) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(table) - 1)
    return table[lo] + (t - lo) * (table[hi] - table[lo])


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ (float64)."""
    ramp = torch.from_numpy(np.linspace(0, 1, n))
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> torch.Tensor:
    """σ_i evenly spaced in log σ from σ_max down to σ_min (n points, float64)."""
    return torch.from_numpy(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


SIGMA_SCHEDULES = {"karras": karras_sigmas, "exponential": exponential_sigmas}


def sigma_to_t(sigmas: torch.Tensor, train_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep of each σ: linear interpolation of log σ in the training table (float64)."""
    log_table = train_sigmas.float().log()  # float32 table, as diffusers keeps it
    log_s = sigmas.double().clamp_min(1e-10).log()
    # index of the last table entry with log σ_t ≤ log σ (the table increases with t)
    lo = (log_s[None, :] - log_table[:, None] >= 0).long().cumsum(0).argmax(0).clamp(max=len(log_table) - 2)
    w = ((log_table[lo].double() - log_s) / (log_table[lo] - log_table[lo + 1]).double()).clamp(0, 1)
    return (1 - w) * lo + w * (lo + 1)


# ---------------------------------------------------------------- per-step maths (σ form)
def denoised_from_eps(x, sigma, eps):
    """x̂_0 = x − σ·ε   (x in the σ-scaled, variance-exploding parametrisation)."""
    return x - sigma * eps


def denoised_from_v(x, sigma, v):
    """x̂_0 = x/(σ²+1) − σ·v/√(σ²+1)."""
    return v * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)


def to_d(x, sigma, denoised):
    """ODE derivative dx/dσ = (x − x̂_0)/σ."""
    return (x - denoised) / sigma


def ancestral_split(sigma_from, sigma_to):
    """σ_up = √(σ_to²(σ_from² − σ_to²)/σ_from²),  σ_down = √(σ_to² − σ_up²)  (η = 1)."""
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


# ---------------------------------------------------------------- per-step maths (ᾱ form, DDIM)
def ddim_x0_eps(x, a_t, out, prediction_type):
    """(x̂_0, ε̂) from the model output; ε: x̂_0 = (x − √(1−ᾱ)ε)/√ᾱ; v: x̂_0 = √ᾱx − √(1−ᾱ)v, ε̂ = √ᾱv + √(1−ᾱ)x."""
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        return (x - b_t**0.5 * out) / a_t**0.5, out
    return a_t**0.5 * x - b_t**0.5 * out, a_t**0.5 * out + b_t**0.5 * x


def ddim_sigma(a_t, a_prev, eta):
    """σ_t(η) = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev))   (DDIM paper eq. 16)."""
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5


def ddim_prev(x0, eps, a_prev, std):
    """x_prev = √ᾱ_prev·x̂_0 + √(1 − ᾱ_prev − σ²)·ε̂   (+ σ·z added by the caller)."""
    return a_prev**0.5 * x0 + (1 - a_prev - std**2) ** 0.5 * eps
