"""Sampler names and switching samplers on the model's config: every pair of samplers keeps the
model's configuration; DDIM from SDXL's config equals diffusers' DDIMScheduler.from_config of it;
A1111/ComfyUI spellings; the A1111 name written back."""

import types

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

import demofusion.schedulers as S  # noqa: E402
from demofusion.errors import InputError  # noqa: E402

# a config file carrying only some keys (an unknown one among them)
PARTIAL = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
           "timestep_spacing": "trailing", "some_future_key": 3}
CONFIGS = {"base": S.SDXL_BASE_CONFIG, "turbo": S.SDXL_TURBO_CONFIG, "partial": PARTIAL}
# our keys that diffusers' class of the same name does not have
OURS_ONLY = {"gamma", "eta"}


def diffusers_of(name, cfg):
    """diffusers' scheduler for sampler ``name`` from the model config ``cfg`` (+ the family's values)."""
    cls, options, _ = S.SAMPLERS[name]
    full = {**S.names.FAMILY_CONFIG, **cfg, **options}
    return getattr(diffusers, cls).from_config(full)


@pytest.mark.parity
@pytest.mark.parametrize("cfg", CONFIGS)
def test_every_pair_of_samplers_keeps_the_model_config(cfg):
    model = CONFIGS[cfg]
    for a in S.SAMPLER_NAMES:
        first = S.by_name(a, model)
        assert first.model_config == {k: v for k, v in model.items()}
        for b in S.SAMPLER_NAMES:
            switched = S.by_name(b, first)
            direct = S.by_name(b, model)
            assert type(switched) is type(direct) and switched.config == direct.config, (a, b)
            assert switched.model_config == first.model_config  # unknown keys travel on
    for b in S.SAMPLER_NAMES:  # and each equals diffusers' class of that name from the model's config
        direct, ref = S.by_name(b, model), diffusers_of(b, model)
        for k, v in direct.config.items():
            if k not in OURS_ONLY and not k.startswith("_"):
                assert ref.config[k] == v, (cfg, b, k, v, ref.config[k])
        if "clip_sample" in direct.config:
            assert direct.config["clip_sample"] is False
        if b not in ("lcm", "tcd"):  # LCM/TCD pick timesteps from the distillation schedule
            assert direct.config["timestep_spacing"] == model.get("timestep_spacing", "leading")
        direct.set_timesteps(4)
        ref.set_timesteps(4)
        assert torch.allclose(direct.timesteps.double(), ref.timesteps.double()), b


@pytest.mark.parity
def test_ddim_from_sdxl_base_config_equals_diffusers():
    """DDIM from SDXL's config (no clip_sample, no set_alpha_to_one) takes diffusers' DDIMScheduler's
    timesteps and steps at 4, 10 and 25 steps: by name, also after another sampler and via the
    pipeline's set_scheduler."""
    ref = diffusers.DDIMScheduler.from_config(S.SDXL_BASE_CONFIG)
    assert ref.config.clip_sample is False
    pipe = types.SimpleNamespace(scheduler=S.from_config(S.SDXL_BASE_CONFIG))
    from demofusion.pipeline.pipeline import DemoFusionPipeline

    for sched in (S.by_name("ddim", S.SDXL_BASE_CONFIG), S.by_name("ddim", S.by_name("dpm++2m-sde", S.SDXL_BASE_CONFIG)),
                  DemoFusionPipeline.set_scheduler(DemoFusionPipeline.set_scheduler(pipe, "euler-a"), "ddim").scheduler):
        assert sched.config["clip_sample"] is False and sched.config["set_alpha_to_one"] is False
        g = torch.Generator().manual_seed(0)
        w = torch.randn(4, 4, 1, 1, generator=g) / 4
        for n in (4, 10, 25):
            sched.set_timesteps(n)
            ref.set_timesteps(n)
            assert torch.equal(sched.timesteps, ref.timesteps)
            x = y = torch.randn(1, 4, 8, 8, generator=g) * 3  # well outside [−1, 1]: clipping would show
            for t in ref.timesteps:
                eps = torch.nn.functional.conv2d(torch.tanh(x), w) + float(t) / 1000
                x = sched.step(eps, t, x)
                y = ref.step(eps, t, y).prev_sample
                assert ((x - y).abs().max() / y.abs().max()).item() <= 1e-6


@pytest.mark.parametrize("spelling,want", [
    ("dpm++2m", ("dpm++2m", None)), ("DPM++ 2M Karras", ("dpm++2m", "karras")),
    ("DPM++ 2M SDE Karras", ("dpm++2m-sde", "karras")), ("DPM++ 3M SDE Exponential", ("dpm++3m-sde", "exponential")),
    ("Euler a", ("euler-a", None)), ("euler_ancestral", ("euler-a", None)), ("UniPC", ("unipc", None)),
    ("uni_pc_bh2", ("unipc", None)), ("LCM", ("lcm", None)), ("dpmpp_2m_sde", ("dpm++2m-sde", None)),
    ("Heun", ("heun", None)), ("TCD", ("tcd", None)), ("DDIM", ("ddim", None)),
])
def test_spellings(spelling, want):
    assert S.parse_sampler(spelling) == want


def test_comfyui_name_and_scheduler():
    assert S.parse_sampler("dpmpp_2m", "karras") == ("dpm++2m", "karras")
    assert S.parse_sampler("dpmpp_2m", "normal") == ("dpm++2m", None)
    sched = S.by_name("dpmpp_2m", S.SDXL_BASE_CONFIG, sigmas="karras")
    assert sched.config["use_karras_sigmas"] is True and S.a1111_name(sched) == "DPM++ 2M Karras"


@pytest.mark.parametrize("args,match", [
    (("dpm++4m",), "unknown; use one of ddim, euler"), (("DPM++ 2M Karras", "exponential"), "give one of them"),
    (("ddim", "karras"), "takes no σ schedule"), (("euler", "polyexponential"), "sigmas 'polyexponential'"),
])
def test_bad_names_are_one_clear_error(args, match):
    with pytest.raises(InputError, match=match):
        S.by_name(args[0], S.SDXL_BASE_CONFIG, sigmas=args[1] if len(args) > 1 else None)
    with pytest.raises(InputError, match="timestep_spacing 'middle'"):
        S.by_name("euler", S.SDXL_BASE_CONFIG, timestep_spacing="middle")


def test_a1111_names_round_trip():
    for name in S.SAMPLER_NAMES:
        kinds = (None, "karras", "exponential") if S.SAMPLERS[name][0] in S.names.SIGMA_SCHEDULE_CLASSES else (None,)
        for kind in kinds:
            sched = S.by_name(name, S.SDXL_BASE_CONFIG, sigmas=kind)
            assert S.sampler_key(sched) == name
            assert S.parse_sampler(S.a1111_name(sched)) == (name, kind)
    assert S.a1111_name(S.by_name("euler-a", S.SDXL_TURBO_CONFIG)) == "Euler a"


def test_model_sigma_choice_follows_unless_asked():
    karras_model = dict(S.SDXL_BASE_CONFIG, use_karras_sigmas=True)
    assert S.by_name("dpm++2m", karras_model).config["use_karras_sigmas"] is True
    assert S.by_name("dpm++2m", karras_model, sigmas="exponential").config["use_exponential_sigmas"] is True
    assert S.by_name("dpm++2m", karras_model, sigmas="exponential").config["use_karras_sigmas"] is False
    S.by_name("ddim", karras_model).set_timesteps(4)  # the model's σ choice means nothing to DDIM


def test_a1111_names_round_trip_through_the_png_text():
    """A sampler's A1111 name (with Karras / exponential σ) written in the PNG ``parameters`` text
    reads back, through the independent A1111 parser, as that sampler and σ schedule."""
    from tests.test_outputs import BASE, parse_a1111

    from demofusion.outputs import a1111_parameters

    for name, kind in (("dpm++2m", "karras"), ("dpm++2m-sde", "karras"), ("dpm++3m-sde", "exponential"),
                       ("euler-a", None), ("unipc", None), ("lcm", None), ("heun", "karras")):
        sampler = S.a1111_name(S.by_name(name, S.SDXL_BASE_CONFIG, sigmas=kind))
        parsed = parse_a1111(a1111_parameters({**BASE, "sampler": sampler}))
        assert parsed["Sampler"] == sampler and S.parse_sampler(parsed["Sampler"]) == (name, kind)
    assert S.a1111_name(S.by_name("DPM++ 2M Karras", S.SDXL_BASE_CONFIG)) == "DPM++ 2M Karras"


def test_stochastic_and_stateful_flags():
    """What a loop must know: which samplers add noise, which remember earlier steps."""
    cfg = S.SDXL_BASE_CONFIG
    noisy = {n for n in S.SAMPLER_NAMES if S.by_name(n, cfg).stochastic}
    assert noisy == {"euler-a", "dpm++2m-sde", "dpm++3m-sde", "lcm", "tcd"}
    assert S.DDIMScheduler(eta=0.5).stochastic and not S.TCDScheduler(gamma=0).stochastic
    assert {n for n in S.SAMPLER_NAMES if S.by_name(n, cfg).stateful} == {"heun", "dpm++2m", "dpm++2m-sde",
                                                                          "dpm++3m-sde", "unipc"}
