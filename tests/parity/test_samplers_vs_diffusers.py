"""Heun, DPM-Solver++ (2M, 3M, SDE), UniPC, LCM, TCD vs diffusers: whole
trajectories of a deterministic toy model ε(x, t), every sampler × σ schedule × spacing, 3 step
counts, both through diffusers' own loop (``step`` with its counter) and through the index-addressed
``*_at`` methods the pipeline uses; stochastic samplers fed the same noise both ways."""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

import demofusion.schedulers as S  # noqa: E402
from tests.helpers.toy import rel, standin_model as toy_model  # noqa: E402

TOL = 1e-5  # max|Δ| ≤ TOL·max|ref| at every step
SPACINGS = ("leading", "trailing", "linspace")
SIGMAS = (None, "karras", "exponential")
NS = (4, 10, 25)  # fewer and more than 15 steps (DPM's lower_order_final threshold)
SIGMA_KEYS = {"karras": "use_karras_sigmas", "exponential": "use_exponential_sigmas"}


def pair(cls, sigmas=None, **over):
    cfg = dict(S.SDXL_BASE_CONFIG, **over)
    if sigmas:
        cfg[SIGMA_KEYS[sigmas]] = True
    return S.SCHEDULERS[cls].from_config(cfg), getattr(diffusers, cls).from_config(cfg)


def loop_ref(sched, model, x, kw=lambda i: {}):
    """diffusers' own loop; the sample after every evaluation."""
    xs = []
    for i, t in enumerate(sched.timesteps):
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, **kw(i)).prev_sample
        xs.append(x)
    return xs


def loop_step(sched, model, x, kw=lambda i: {}):
    """Ours through the diffusers-style ``step`` (counter)."""
    xs = []
    for i, t in enumerate(sched.timesteps):
        x = sched.step(model(sched.scale_model_input(x, t), t), t, x, **kw(i))
        xs.append(x)
    return xs


def loop_at(sched, model, x, kw=lambda i: {}):
    """Ours through the pipeline's index-addressed interface."""
    xs = []
    for i in range(len(sched.timesteps_cpu)):
        t = sched.timesteps_cpu[i]
        x = sched.step_at(model(sched.scale_model_input_at(x, i), t), i, x, **kw(i))
        xs.append(x)
    return xs


def check(ours, ref, what):
    assert len(ours) == len(ref), f"{what}: {len(ours)} vs {len(ref)} evaluations"
    for i, (a, b) in enumerate(zip(ours, ref)):
        e = rel(a, b)
        assert e <= TOL, f"{what}: evaluation {i}: rel err {e:.2e}"


def same_schedule(ours, ref, n):
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    if ours.timesteps.is_floating_point():  # fractional (Karras/exponential σ → t): within float32 rounding
        assert torch.allclose(ours.timesteps, ref.timesteps.float(), rtol=1e-6, atol=0), (ours.timesteps, ref.timesteps)
    else:
        assert torch.equal(ours.timesteps, ref.timesteps), (ours.timesteps, ref.timesteps)
    if hasattr(ref, "sigmas"):  # LCM/TCD have none
        assert torch.allclose(ours.sigmas, ref.sigmas.float(), rtol=1e-6, atol=0)
    assert abs(float(ours.init_noise_sigma) - float(ref.init_noise_sigma)) <= 1e-6 * float(ref.init_noise_sigma)


def start(n, sched):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(n)) * float(sched.init_noise_sigma)


DETERMINISTIC = {
    "heun": ("HeunDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {}),
    "dpm++2m-heun": ("DPMSolverMultistepScheduler", {"solver_type": "heun"}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"solver_order": 3}),
    "dpm++2m-euler-final": ("DPMSolverMultistepScheduler", {"euler_at_final": True, "lower_order_final": False}),
    "dpm++2m-sigma-min": ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "unipc-3": ("UniPCMultistepScheduler", {"solver_order": 3}),
}


@pytest.mark.parametrize("sigmas", SIGMAS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_trajectories_match_diffusers(name, spacing, sigmas):
    cls, over = DETERMINISTIC[name]
    model = toy_model()
    ours, ref = pair(cls, sigmas, timestep_spacing=spacing, **over)
    for n in NS:
        same_schedule(ours, ref, n)
        x = start(n, ref)
        want = loop_ref(ref, model, x)
        check(loop_at(ours, model, x), want, f"{name} {spacing} {sigmas} n={n} step_at")
        ours.set_timesteps(n)
        check(loop_step(ours, model, x), want, f"{name} {spacing} {sigmas} n={n} step")


SDE = {"dpm++2m-sde": {"algorithm_type": "sde-dpmsolver++"},
       "dpm++3m-sde": {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
       "dpm++2m-sde-heun": {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun"}}


@pytest.mark.parametrize("sigmas", SIGMAS)
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("name", SDE)
def test_sde_trajectories_match_diffusers(name, spacing, sigmas):
    """Same noise fed to both (noise= / variance_noise=), and equal-seeded generators."""
    model = toy_model(1)
    ours, ref = pair("DPMSolverMultistepScheduler", sigmas, timestep_spacing=spacing, **SDE[name])
    for n in NS:
        same_schedule(ours, ref, n)
        x = start(n, ref)
        z = torch.randn(n, 1, 4, 8, 8, generator=torch.Generator().manual_seed(100 + n))
        want = loop_ref(ref, model, x, lambda i: {"variance_noise": z[i]})
        check(loop_at(ours, model, x, lambda i: {"noise": z[i]}), want, f"{name} {spacing} {sigmas} n={n}")
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        ref.set_timesteps(n)
        ours.set_timesteps(n)
        check(loop_step(ours, model, x, lambda i: {"generator": g1}),
              loop_ref(ref, model, x, lambda i: {"generator": g2}), f"{name} {spacing} {sigmas} n={n} generator")


@pytest.mark.parametrize("cls,over", [("LCMScheduler", {}), ("TCDScheduler", {"gamma": 0.0}),
                                      ("TCDScheduler", {"gamma": 0.3}), ("TCDScheduler", {"gamma": 1.0})])
def test_consistency_trajectories_match_diffusers(cls, over, monkeypatch):
    """LCM and TCD (γ) with the same noise both ways, from the SDXL base and Turbo configs."""
    model = toy_model(2)
    gamma = over.get("gamma")
    for cfg in (S.SDXL_BASE_CONFIG, S.SDXL_TURBO_CONFIG):
        ours = S.SCHEDULERS[cls].from_config(dict(cfg, **over))
        ref = getattr(diffusers, cls).from_config(cfg)
        ref_kw = (lambda i: {"eta": gamma}) if gamma is not None else (lambda i: {})
        for n in (1, 4, 8):
            same_schedule(ours, ref, n)
            x = start(n, ref)
            z = iter(torch.randn(n, 1, 4, 8, 8, generator=torch.Generator().manual_seed(n)))
            module = "scheduling_lcm" if cls == "LCMScheduler" else "scheduling_tcd"
            monkeypatch.setattr(f"diffusers.schedulers.{module}.randn_tensor", lambda *a, **k: next(z))
            want = loop_ref(ref, model, x, ref_kw)
            monkeypatch.undo()
            zs = torch.randn(n, 1, 4, 8, 8, generator=torch.Generator().manual_seed(n))
            check(loop_at(ours, model, x, lambda i: {"noise": zs[i]}), want, f"{cls} {over} n={n}")
            g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
            ref.set_timesteps(n)
            ours.set_timesteps(n)
            check(loop_step(ours, model, x, lambda i: {"generator": g1}),
                  loop_ref(ref, model, x, lambda i: {"generator": g2, **ref_kw(i)}), f"{cls} {over} n={n} gen")


@pytest.mark.parametrize("name", ["heun", "dpm++2m", "unipc", "lcm"])
def test_v_prediction_matches_diffusers(name):
    cls = {"heun": "HeunDiscreteScheduler", "dpm++2m": "DPMSolverMultistepScheduler",
           "unipc": "UniPCMultistepScheduler", "lcm": "LCMScheduler"}[name]
    model = toy_model(3)
    ours, ref = pair(cls, prediction_type="v_prediction")
    n = 6
    same_schedule(ours, ref, n)
    x = start(n, ref)
    z = torch.zeros(n, 1, 4, 8, 8)
    kw = (lambda i: {"noise": z[i]}) if name == "lcm" else (lambda i: {})
    if name == "lcm":  # zero noise both ways
        import diffusers.schedulers.scheduling_lcm as m
        orig, m.randn_tensor = m.randn_tensor, lambda shape, **k: torch.zeros(shape)
        try:
            want = loop_ref(ref, model, x)
        finally:
            m.randn_tensor = orig
    else:
        want = loop_ref(ref, model, x)
    check(loop_at(ours, model, x, kw), want, f"{name} v_prediction")


def test_history_restarts_with_set_timesteps_and_on_a_jump():
    """Multistep history is the scheduler's: a second run after set_timesteps equals the first, and
    starting mid-schedule (SDEdit) equals diffusers started there (first order, no stale history)."""
    model = toy_model(4)
    ours, ref = pair("DPMSolverMultistepScheduler")
    ours.set_timesteps(10)
    x = start(10, ours)
    first = loop_at(ours, model, x)
    ours.set_timesteps(10)
    assert torch.equal(loop_at(ours, model, x)[-1], first[-1])
    ref.set_timesteps(10)
    ref.set_begin_index(4)
    y, want = x.clone(), []
    for t in ref.timesteps[4:]:
        y = ref.step(model(y, t), t, y).prev_sample
        want.append(y)
    got, y = [], x.clone()
    for i in range(4, 10):  # ours continues from the full run above: the jump to 4 restarts history
        y = ours.step_at(model(y, ours.timesteps_cpu[i]), i, y)
        got.append(y)
    check(got, want, "dpm++2m from step 4")


def test_heun_evaluation_count_and_errors():
    s = S.HeunDiscreteScheduler()
    s.set_timesteps(5)
    assert len(s.timesteps) == 9 and [s.is_corrector(i) for i in range(3)] == [False, True, False]
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(RuntimeError, match="predictor step 2 first"):
        s.step_at(x, 3, x)
