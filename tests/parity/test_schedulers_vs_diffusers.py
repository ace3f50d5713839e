"""DDIM, Euler and Euler-ancestral vs diffusers: schedules, add_noise, input scaling, full trajectories,
per-view stepping, config handling and errors. Everything fp32 on the CPU; ~10 s."""

import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

import demofusion.schedulers as S  # noqa: E402
from tests.helpers.toy import rel, standin_model  # noqa: E402
from demofusion.schedulers import (DDIMScheduler, EulerAncestralDiscreteScheduler,  # noqa: E402
                                   EulerDiscreteScheduler)

CONFIGS = {"base": S.SDXL_BASE_CONFIG, "turbo": S.SDXL_TURBO_CONFIG}
CLASSES = ("DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler")
SPACINGS = ("leading", "trailing", "linspace")
NS = (1, 2, 4, 10, 25, 50, 999)
TOL = 1e-5  # trajectories: max|Δ| ≤ TOL·max|ref| at every step


def pair(name, cfg, **over):
    """(ours, diffusers') scheduler of class ``name`` from the same config dict."""
    c = dict(cfg, **over)
    return S.SCHEDULERS[name].from_config(c), getattr(diffusers, name).from_config(c)


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_sigmas_init_noise_sigma_identical(cfg, name, spacing):
    ours, ref = pair(name, CONFIGS[cfg], timestep_spacing=spacing)
    assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma)  # before set_timesteps too
    for n in NS:
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert ours.timesteps.dtype == ref.timesteps.dtype, n
        assert torch.equal(ours.timesteps, ref.timesteps), (n, ours.timesteps[:8], ref.timesteps[:8])
        if name != "DDIMScheduler":  # diffusers' DDIM has no sigmas
            assert ours.sigmas.dtype == ref.sigmas.dtype == torch.float32
            assert torch.equal(ours.sigmas, ref.sigmas), n
        assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma), n
        assert ours.timesteps.device.type == "cpu"


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_timesteps_every_n(name, spacing):
    """All n = 1..1000. Where diffusers' trailing spacing yields n+1 points ending at t = −1 (a
    float-arange artefact) ours has the first n; leading + steps_offset 1 at n = 1000 is refused."""
    ours, ref = pair(name, S.SDXL_BASE_CONFIG, timestep_spacing=spacing)
    extra = []
    for n in range(1, 1001):
        ref.set_timesteps(n)
        if spacing == "leading" and n == 1000:
            with pytest.raises(ValueError, match="outside the trained range"):
                ours.set_timesteps(n)
            continue
        ours.set_timesteps(n)
        assert len(ours.timesteps) == n
        k = len(ref.timesteps)
        if k == n + 1:
            assert spacing == "trailing" and ref.timesteps[-1] == -1
            extra.append(n)
        assert torch.equal(ours.timesteps, ref.timesteps[:n]), n
        if name != "DDIMScheduler":
            assert torch.equal(ours.sigmas[:n], ref.sigmas[:n]), n
    if spacing == "trailing":
        assert 61 in extra and 999 not in extra  # the quirk exists, and spares the n we care about
    else:
        assert extra == []


def test_timesteps_on_device_and_dtypes():
    for cls, dt in ((DDIMScheduler, torch.int64), (EulerDiscreteScheduler, torch.float32),
                    (EulerAncestralDiscreteScheduler, torch.float32)):
        s = cls()
        s.set_timesteps(4, device="meta")
        assert s.timesteps.device.type == "meta" and s.timesteps.dtype == dt
        assert s.sigmas.device.type == "cpu" and s.sigmas.dtype == torch.float32 and len(s.sigmas) == 5


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_betas_and_alphas_cumprod_identical(schedule):
    ours, ref = pair("DDIMScheduler", {"beta_schedule": schedule, "beta_start": 0.00085, "beta_end": 0.012})
    assert torch.equal(ours.betas, ref.betas)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)


def test_karras_and_final_sigma_min():
    for over in ({"use_karras_sigmas": True}, {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0},
                 {"final_sigmas_type": "sigma_min"}):
        ours, ref = pair("EulerDiscreteScheduler", S.SDXL_BASE_CONFIG, **over)
        for n in (1, 2, 10, 50):
            ours.set_timesteps(n)
            ref.set_timesteps(n)
            assert rel(ours.sigmas, ref.sigmas) <= 1e-6, (over, n)
            assert (ours.timesteps - ref.timesteps).abs().max() <= 1e-3, (over, n)


# ----------------------------------------------------------------------------- add_noise, scale_model_input
@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("name", CLASSES)
def test_add_noise_and_scale_model_input_equal(cfg, name):
    ours, ref = pair(name, CONFIGS[cfg])
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    for n in (1, 4, 50):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        ts = ref.timesteps
        per_sample = ts[torch.tensor([0, len(ts) // 2, len(ts) - 1])]
        assert torch.equal(ours.add_noise(x0, eps, per_sample), ref.add_noise(x0, eps, per_sample))
        for t in ts:
            want = ref.add_noise(x0, eps, t.reshape(1).expand(3))
            for tt in (t, t.item(), t.reshape(1)):
                assert torch.equal(ours.add_noise(x0, eps, tt), want)
            ref._step_index = None  # diffusers caches the index; make it look t up again
            want = ref.scale_model_input(x0, t)
            for tt in (t, t.item()):
                assert torch.equal(ours.scale_model_input(x0, tt), want)
        assert torch.equal(ours.scale_model_input(x0, per_sample)[1],
                           ours.scale_model_input(x0[1:2], per_sample[1])[0])


# ----------------------------------------------------------------------------- trajectories
def run(sched, model, x, step_kwargs=lambda i, t: {}):
    """The diffusers sampling loop; returns the sample after every step (and the model inputs)."""
    xs = []
    for i, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(x, t)
        out = sched.step(model(inp, t), t, x, **step_kwargs(i, t))
        x = out if isinstance(out, torch.Tensor) else out.prev_sample
        xs.append((inp, x))
    return xs


def compare(ours_xs, ref_xs, what):
    assert len(ours_xs) == len(ref_xs)
    worst = 0.0
    for i, ((a_in, a), (b_in, b)) in enumerate(zip(ours_xs, ref_xs)):
        e = max(rel(a_in, b_in), rel(a, b))
        assert e <= TOL, f"{what}: step {i}: rel err {e:.2e}"
        worst = max(worst, e)
    return worst


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_trajectories_match_diffusers(cfg, name, spacing, monkeypatch):
    """Full sampling loops on a random conv net; Euler-ancestral fed the same noise both ways
    (diffusers' randn_tensor patched to return ours), and also from equal-seeded generators."""
    model = standin_model()
    ours, ref = pair(name, CONFIGS[cfg], timestep_spacing=spacing)
    ns = (1, 2, 4, 10, 25, 50) + ((999,) if spacing == "trailing" else ())
    for n in ns:
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        g = torch.Generator().manual_seed(n)
        x = torch.randn(1, 4, 8, 8, generator=g)
        noises = torch.randn(n, 1, 4, 8, 8, generator=g)
        if name == "EulerAncestralDiscreteScheduler":
            it = iter(noises)
            monkeypatch.setattr("diffusers.schedulers.scheduling_euler_ancestral_discrete.randn_tensor",
                                lambda *a, **k: next(it))
            ref_xs = run(ref, model, x * ref.init_noise_sigma)
            monkeypatch.undo()
            ours_xs = run(ours, model, x * ours.init_noise_sigma, lambda i, t: {"noise": noises[i]})
            compare(ours_xs, ref_xs, f"{name} {spacing} n={n} noise=")
            if n <= 50:  # same draws from equal-seeded generators
                g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
                ref.set_timesteps(n)  # diffusers counts steps; restart it
                ref_xs = run(ref, model, x * ref.init_noise_sigma, lambda i, t: {"generator": g2})
                ours_xs = run(ours, model, x * ours.init_noise_sigma, lambda i, t: {"generator": g1})
                compare(ours_xs, ref_xs, f"{name} {spacing} n={n} generator")
        else:
            compare(run(ours, model, x * ours.init_noise_sigma), run(ref, model, x * ref.init_noise_sigma),
                    f"{name} {spacing} n={n}")


@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_eta_trajectories_match(spacing):
    model = standin_model(1)
    ours, ref = pair("DDIMScheduler", S.SDXL_BASE_CONFIG, timestep_spacing=spacing)
    for n, eta in ((4, 1.0), (25, 0.5), (50, 0.3)):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        g = torch.Generator().manual_seed(n)
        x = torch.randn(2, 4, 8, 8, generator=g)
        noises = torch.randn(n, 2, 4, 8, 8, generator=g)
        compare(run(ours, model, x, lambda i, t: {"noise": noises[i], "eta": eta}),
                run(ref, model, x, lambda i, t: {"variance_noise": noises[i], "eta": eta}), f"eta={eta} n={n}")
        g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
        ref.set_timesteps(n)
        compare(run(ours, model, x, lambda i, t: {"generator": g1, "eta": eta}),
                run(ref, model, x, lambda i, t: {"generator": g2, "eta": eta}), f"eta={eta} n={n} generator")


@pytest.mark.parametrize("name", CLASSES)
def test_v_prediction_and_clip_sample_trajectories(name):
    model = standin_model(2)
    overs = [{"prediction_type": "v_prediction"}]
    if name == "DDIMScheduler":
        overs += [{"clip_sample": True, "clip_sample_range": 1.5}]
    if name == "EulerDiscreteScheduler":
        overs += [{"use_karras_sigmas": True}]
    for over in overs:
        ours, ref = pair(name, S.SDXL_BASE_CONFIG, **over)
        for n in (4, 25):
            ours.set_timesteps(n)
            ref.set_timesteps(n)
            x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(n))
            g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
            kw1 = (lambda i, t: {"generator": g1}) if "Ancestral" in name else (lambda i, t: {})
            kw2 = (lambda i, t: {"generator": g2}) if "Ancestral" in name else (lambda i, t: {})
            compare(run(ours, model, x * ours.init_noise_sigma, kw1),
                    run(ref, model, x * ref.init_noise_sigma, kw2), f"{name} {over} n={n}")


# ----------------------------------------------------------------------------- per-view stepping
VIEWS = [(slice(0, 8), slice(0, 8)), (slice(4, 12), slice(2, 10)), (slice(8, 16), slice(8, 16)),
         (slice(0, 16), slice(6, 14))]


@pytest.mark.parametrize("name", CLASSES)
def test_per_view_steps_equal_whole_tensor_step(name):
    """step() once per (overlapping) view at the same t, in any order, equals the whole-tensor step."""
    sched = S.SCHEDULERS[name](eta=0.7) if name == "DDIMScheduler" else S.SCHEDULERS[name]()
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g) * 3
    out = torch.randn(2, 4, 16, 16, generator=g)
    z = torch.randn(2, 4, 16, 16, generator=g)
    kw = {} if name == "EulerDiscreteScheduler" else {"noise": z}
    ts = sched.timesteps
    for t in (ts[3], ts[0], ts[-1], ts[3]):  # out of order and repeated: no hidden state
        whole = sched.step(out, t, x, **kw)
        for h, w in VIEWS + VIEWS[::-1]:
            vkw = {k: v[:, :, h, w] for k, v in kw.items()}
            view = sched.step(out[:, :, h, w], t, x[:, :, h, w], **vkw)
            assert torch.equal(view, whole[:, :, h, w])
        # views batched along dim 0, as the pipeline does
        stack = lambda a: torch.cat([a[:, :, h, w][:, :, :8, :8] for h, w in VIEWS])  # noqa: E731
        batched = sched.step(stack(out), t, stack(x), **{k: stack(v) for k, v in kw.items()})
        assert torch.equal(batched, stack(whole))


def test_timestep_forms_give_the_same_step():
    for sched in (DDIMScheduler(), EulerDiscreteScheduler(), EulerAncestralDiscreteScheduler(),
                  EulerDiscreteScheduler(timestep_spacing="linspace")):
        sched.set_timesteps(7)
        x, out, z = torch.randn(3, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
        t = sched.timesteps[2]
        kw = {"noise": z} if isinstance(sched, EulerAncestralDiscreteScheduler) else {}
        want = sched.step(out, t, x, **kw)
        forms = [t.item(), float(t), t.reshape(1), t.double(), t.float()]
        if float(t).is_integer():
            forms.append(int(t))
        for tt in forms:
            assert torch.equal(sched.step(out, tt, x, **kw), want), (type(sched).__name__, tt)


def test_ancestral_generator_draw_is_documented_randn():
    """Without noise=, the step draws torch.randn(model_output.shape, dtype, generator) — replayable."""
    s = EulerAncestralDiscreteScheduler()
    s.set_timesteps(4)
    x, out = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = s.timesteps[1]
    a = s.step(out, t, x, generator=torch.Generator().manual_seed(9))
    z = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    assert torch.equal(a, s.step(out, t, x, noise=z))
    assert not torch.equal(a, s.step(out, t, x, noise=torch.zeros_like(z)))


def test_generator_draws_match_diffusers_randn_tensor():
    from diffusers.utils.torch_utils import randn_tensor

    out = torch.zeros(3, 4, 8, 8)
    for make in (lambda: torch.Generator().manual_seed(4), lambda: [torch.Generator().manual_seed(i) for i in range(3)]):
        ref = randn_tensor(out.shape, generator=make(), device=out.device, dtype=out.dtype)
        assert torch.equal(S.Scheduler._draw_noise(out, make()), ref)


def test_scale_model_input_at_index():
    """For the reference pipeline's stale scaling: σ by position, index n (σ = 0) leaves x unscaled."""
    s = EulerDiscreteScheduler()
    s.set_timesteps(5)
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    for i, t in enumerate(s.timesteps):
        assert torch.equal(s.scale_model_input_at(x, i), s.scale_model_input(x, t))
    assert torch.equal(s.scale_model_input_at(x, 5), x)
    d = DDIMScheduler()
    d.set_timesteps(5)
    assert d.scale_model_input_at(x, 2) is x


def test_half_precision_inputs_keep_sample_dtype():
    s = EulerDiscreteScheduler()
    s.set_timesteps(4)
    x, out = torch.randn(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = s.timesteps[0]
    y = s.step(out.half(), t, x.half())
    assert y.dtype == torch.float16
    assert rel(y, s.step(out.half().float(), t, x.half().float())) < 1e-3


# ----------------------------------------------------------------------------- configs
def test_sdxl_configs_resolve_like_diffusers(tmp_path):
    for cfg, cls in ((S.SDXL_BASE_CONFIG, EulerDiscreteScheduler), (S.SDXL_TURBO_CONFIG, EulerAncestralDiscreteScheduler)):
        ours = S.from_config(cfg)
        assert type(ours) is cls and ours.config["_class_name"] == cfg["_class_name"]
        ref = getattr(diffusers, cfg["_class_name"]).from_config(cfg)
        for k, v in ours.config.items():
            if k in ref.config:
                assert ref.config[k] == v, k
        # constructor defaults are the shipped model's scheduler
        assert cls().config == ours.config
        # from a file and from a model folder with scheduler/
        folder = tmp_path / cfg["_class_name"] / "scheduler"
        folder.mkdir(parents=True)
        (folder / "scheduler_config.json").write_text(json.dumps(cfg))
        for src in (folder / "scheduler_config.json", folder, folder.parent, str(folder)):
            assert S.from_config(src).config == ours.config
    assert S.SDXL_BASE_CONFIG["timestep_spacing"] == "leading" and S.SDXL_BASE_CONFIG["steps_offset"] == 1
    assert S.SDXL_TURBO_CONFIG["timestep_spacing"] == "trailing"


@pytest.mark.parametrize("name", CLASSES)
def test_partial_config_takes_diffusers_defaults(name):
    ours, ref = pair(name, {})
    for n in (3, 50):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert torch.equal(ours.timesteps, ref.timesteps)
        assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    if name == "DDIMScheduler":
        assert ours.config["clip_sample"] is True and ours.config["set_alpha_to_one"] is True


def test_harmless_unknown_keys_ignored():
    cfg = dict(S.SDXL_BASE_CONFIG, skip_prk_steps=True, sample_max_value=1.0, some_future_key=3,
               _use_default_values=["x"], thresholding=False, rescale_betas_zero_snr=False, timestep_type="discrete")
    s = S.from_config(cfg)
    assert s.ignored_config["some_future_key"] == 3 and "_use_default_values" not in s.config
    # SDXL base's (Euler) config drives DDIM and Euler-ancestral too, as diffusers allows
    for cls in (DDIMScheduler, EulerAncestralDiscreteScheduler):
        cls.from_config(S.SDXL_BASE_CONFIG).set_timesteps(10)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("name", CLASSES)
def test_bad_input_errors(name):
    cls = S.SCHEDULERS[name]
    s = cls()
    with pytest.raises(RuntimeError, match="set_timesteps"):
        s.step(torch.zeros(1, 4, 2, 2), 999, torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"num_inference_steps=0 .*1 ≤ n ≤ num_train_timesteps \(1000\)"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps=1001"):
        s.set_timesteps(1001)
    with pytest.raises(TypeError, match="must be an int"):
        s.set_timesteps(2.5)
    with pytest.raises(ValueError, match="outside the trained range"):
        cls(timestep_spacing="leading", steps_offset=1).set_timesteps(1000)
    s.set_timesteps(10)
    x = torch.zeros(1, 4, 2, 2)
    for bad_t in (500, 998.5, torch.tensor(3)):
        with pytest.raises(ValueError, match="not in this scheduler's schedule.*pass one of scheduler.timesteps"):
            s.step(x, bad_t, x)
    with pytest.raises(ValueError, match="expected one timestep"):
        s.step(x, s.timesteps[:2], x)
    with pytest.raises(TypeError, match="timestep must be a number or a tensor"):
        s.step(x, "999", x)
    with pytest.raises(ValueError, match="beta_schedule='cosine' is not supported"):
        cls(beta_schedule="cosine")
    with pytest.raises(ValueError, match="timestep_spacing='middle' is not supported"):
        cls(timestep_spacing="middle")
    with pytest.raises(ValueError, match="prediction_type='sample' is not supported"):
        cls(prediction_type="sample")
    for key, val in (("thresholding", True), ("rescale_betas_zero_snr", True), ("timestep_type", "continuous"),
                     ("interpolation_type", "log_linear")):
        with pytest.raises(ValueError, match=f"{key}={val!r} is not supported"):
            cls.from_config(dict(S.SDXL_BASE_CONFIG, **{key: val}))
    if name != "EulerDiscreteScheduler":  # Euler takes Karras and exponential σ (tests/parity/test_samplers_vs_diffusers.py)
        for key in ("use_karras_sigmas", "use_exponential_sigmas"):
            with pytest.raises(ValueError, match=f"{key}=True is not supported"):
                cls.from_config(dict(S.SDXL_BASE_CONFIG, **{key: True}))
    if name != "EulerDiscreteScheduler":
        with pytest.raises(ValueError, match="either noise= or generator="):
            kw = {"eta": 1.0} if name == "DDIMScheduler" else {}
            s.step(x, s.timesteps[0], x, noise=x, generator=torch.Generator(), **kw)


def test_module_from_config_errors(tmp_path):
    with pytest.raises(ValueError, match="no '_class_name'"):
        S.from_config({"beta_schedule": "linear"})
    with pytest.raises(ValueError, match="unsupported scheduler 'LMSDiscreteScheduler'"):
        S.from_config({"_class_name": "LMSDiscreteScheduler"})
    assert type(S.from_config(S.SDXL_BASE_CONFIG, _class_name="DDIMScheduler")) is DDIMScheduler
    with pytest.raises(FileNotFoundError, match="no scheduler_config.json"):
        S.from_config(tmp_path)
    with pytest.raises(ValueError, match="eta must be ≥ 0"):
        DDIMScheduler(eta=-1)
    with pytest.raises(ValueError, match="not a training timestep"):
        DDIMScheduler().add_noise(torch.zeros(1), torch.zeros(1), 1000)
    e = EulerDiscreteScheduler()
    e.set_timesteps(4)
    with pytest.raises(ValueError, match="got 2 timesteps for a batch of 3"):
        e.add_noise(torch.zeros(3, 4), torch.zeros(3, 4), e.timesteps[:2])
