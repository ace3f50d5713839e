"""max_memory plans and offload policies.

* Placement never changes a value: for every policy the run's latents and images equal the
  unbudgeted run's bit for bit (tiny model, CPU; the device copies are real clones there).
* A budget picks the cheapest plan that fits; an impossible or malformed one is a one-line error.
* On fake CUDA, a whole SDXL-shaped run under an 8 GiB plan is *measured* stage by stage (live CUDA
  storages, the pipeline's own placement moving the weights) and fits, at 4096² and 2048×4096.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from torch import nn

from demofusion import memory as M
from demofusion.cli import main
from demofusion.errors import InputError
from demofusion.memory.plan import parse_budget
from demofusion.pipeline import DemoFusionPipeline
from demofusion.placement import POLICIES
from demofusion.presets import random_components
from tests.helpers.pipeline import small_pipeline

KW = dict(prompt="a castle", height=384, width=384, num_inference_steps=2, guidance_scale=7.5, seed=5, stride=8)


@pytest.fixture(scope="module")
def pipe():
    return small_pipeline("sdxl")


# ---- budgets as written ------------------------------------------------------------------------
@pytest.mark.parametrize("text, n", [("8GB", 8 * 10**9), ("8GiB", 8 * 2**30), ("7.5 GiB", int(7.5 * 2**30)),
                                     ("8000MB", 8 * 10**9), ("512mib", 512 * 2**20), (12345, 12345)])
def test_budget_sizes(text, n):
    assert parse_budget(text) == n


@pytest.mark.parametrize("bad", ["eight", "8", "8 GB of RAM", "-1GB", "0GB", 0, -5, 2.5, True, [8]])
def test_malformed_budget_is_one_line(pipe, bad):
    with pytest.raises(InputError) as e:
        pipe(**KW, max_memory=bad)
    assert "max_memory" in str(e.value) and "\n" not in str(e.value)


def test_impossible_budget_names_the_smallest_that_works(pipe):
    with pytest.raises(InputError) as e:
        pipe(**KW, max_memory="1MB")  # under what even a CPU run (no CUDA context) needs
    msg = str(e.value)
    assert "\n" not in msg and "too small" in msg and "smaller height/width" in msg
    needed = float(re.search(r"at least ([\d.]+) MiB", msg).group(1)) * 2**20
    plan = pipe.memory_plan(**KW, max_memory=int(needed + 2**20))  # the named size (rounded up) works
    assert plan.peak_bytes <= needed + 2**20
    with pytest.raises(InputError):
        pipe.memory_plan(**KW, max_memory=int(needed - 2**20))


def test_cli_budget_errors_are_one_line(capsys):
    for flag, words in (("eight", "not a memory size"), ("1MB", "too small")):
        code = main(["generate", "--height", "512", "--width", "512", "--steps", "1", "--dry-run", "--max-memory", flag])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0 and "--max-memory" in err and words in err, err


def test_cli_dry_run_prints_the_plan(capsys):
    assert main(["generate", "--height", "512", "--width", "512", "--steps", "1", "--dry-run",
                 "--max-memory", "950MB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: offload=" in out and "of 906.0 MiB" in out  # 950 MB = 906.0 MiB
    assert re.search(r"phase 2 unet .*batch \d+", out) and "phase 0 text" in out and "phase 2 decode" in out


def test_cli_fp8_is_part_of_the_run(tmp_path, capsys):
    import json

    args = ["generate", "--height", "256", "--width", "256", "--steps", "1", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--fp8", "--max-memory", "4GiB", "--out", str(tmp_path / "b")]) == 0
    a, b = (json.loads((tmp_path / x / "run.json").read_text()) for x in "ab")
    assert (a["fp8"], b["fp8"], b["max_memory"]) == (False, True, "4GiB") and a["run_id"] != b["run_id"]
    capsys.readouterr()
    assert main(["generate", "--resume", str(tmp_path / "a"), "--fp8"]) == 2  # it changes the pixels
    assert "--fp8" in capsys.readouterr().err


# ---- placement never changes a value -----------------------------------------------------------
def _run(pipe, **kw):
    seen = []  # (phase, UNet at home, VAE at home, text at home) during every step
    home = pipe.placement.at_home
    cb = lambda k, i, t, z: seen.append((k, home(pipe.unet), home(pipe.vae), home(pipe.text.text_encoder_2)))
    return pipe(**{**KW, **kw}, callback=cb), seen


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_gives_identical_results(pipe, policy):
    ref, _ = _run(pipe, view_batch_size=4, output_type="pt")
    out, seen = _run(pipe, view_batch_size=4, output_type="pt", offload=policy)
    assert all(torch.equal(a, b) for a, b in zip(out.latents + out.images, ref.latents + ref.images))
    if policy == "none":  # the device (the CPU) is home: nothing moves
        assert all(s[1:] == (False, False, False) for s in seen)
    elif policy == "model":  # only the UNet is "on the device" (a clone) while denoising
        assert all(s[1:] == (False, True, True) for s in seen)
    else:  # between UNet calls even the UNet is at home: its units stream in and out
        assert all(s[1:] == (True, True, True) for s in seen)
    for module in (pipe.unet, pipe.vae, pipe.text.text_encoder):
        assert pipe.placement.at_home(module) or policy == "none"


def test_budget_picks_each_policy_and_keeps_a_given_batch(pipe):
    """With view_batch_size given, the budget moves weights only: every plan is exact, bit for bit."""
    kw = dict(view_batch_size=4, output_type="latent")
    peaks = {p: pipe.memory_plan(**KW, **kw, offload=p).peak_bytes for p in POLICIES}
    assert peaks["none"] > peaks["model"] > peaks["sequential"]
    ref, _ = _run(pipe, **kw)
    for policy, budget in peaks.items():
        plan = pipe.memory_plan(**KW, **kw, max_memory=budget)
        assert plan.offload == policy and plan.view_batch_size == 4 and plan.exact and plan.peak_bytes <= budget
        out, _ = _run(pipe, **kw, max_memory=budget)
        assert all(torch.equal(a, b) for a, b in zip(out.latents, ref.latents)), policy


def test_budget_lowers_the_default_batch_with_equal_results(pipe):
    """No view_batch_size given: the budget may run fewer views per call, then the CFG halves apart;
    the sums are the same, in other kernels (equal to float rounding, as for any view_batch_size)."""
    from demofusion.memory.plan import Choice, Model, estimate

    kw = dict(output_type="latent")
    full = pipe.memory_plan(**KW, **kw, offload="model")
    smallest = max(st.total for st in estimate(Model.of(pipe), pipe.validate(**KW, **kw), Choice("model", 1, True),
                                              gpu=False))  # the pipeline is on the CPU
    apart = pipe.memory_plan(**KW, **kw, offload="model", max_memory=smallest)
    assert full.view_batch_size == 16 and apart.view_batch_size == 1 and apart.cfg_apart and not apart.exact
    ref, _ = _run(pipe, **kw)
    for budget in (full.peak_bytes - 1, apart.budget):
        plan = pipe.memory_plan(**KW, **kw, max_memory=budget)
        assert plan.view_batch_size < 16 and plan.peak_bytes <= budget
        out, _ = _run(pipe, **kw, max_memory=budget)
        assert out.unet_calls[-1] > ref.unet_calls[-1]  # really batched differently
        for a, b in zip(out.latents, ref.latents):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max()


def test_from_pretrained_components_wait_at_home():
    p = DemoFusionPipeline.from_pretrained("tiny", device="cpu", max_memory="2GiB", offload="model", fp8=True)
    assert p.max_memory == 2 * 2**30 and p.offload == "model" and "fp8" in p.name
    assert p.unet.down_blocks[1].attentions[0].proj_in.weight.dtype == torch.float8_e4m3fn
    out = p("a castle", height=512, width=512, num_inference_steps=1, output_type="latent")
    assert len(out.latents) == 2 and all(p.placement.at_home(m) for m in (p.unet, p.vae))


# ---- fake CUDA: a whole SDXL run measured under an 8 GiB plan -----------------------------------
def home_pipeline(kind: str = "sdxl-base", controlnet: bool = False) -> DemoFusionPipeline:
    """SDXL-shaped components waiting in (fake) CPU memory; the work runs on (fake) CUDA. The VAE is
    float32, as the released SDXL VAE is run (fp16 overflows). ``controlnet``: with the released
    canny ControlNet's shapes."""
    from demofusion.controlnet import ControlNet, ControlNetConfig
    from demofusion.unet import UNetConfig

    unet, vae, text, sched = random_components(kind, device="meta", dtype=torch.float16)
    with torch.device("meta"):
        nets = [ControlNet(ControlNetConfig(UNetConfig.preset(kind)))] if controlnet else []
    with M.fake_mode():
        for module, dt in ((unet, torch.float16), (vae, torch.float32), (text.text_encoder, torch.float16),
                           (text.text_encoder_2, torch.float16), *((n, torch.float16) for n in nets)):
            for m in module.modules():
                for table in (m._parameters, m._buffers):
                    for n, t in list(table.items()):
                        if t is not None:
                            f = torch.empty(t.shape, dtype=dt if t.is_floating_point() else t.dtype, device="cpu")
                            table[n] = nn.Parameter(f, requires_grad=False) if table is m._parameters else f
    return DemoFusionPipeline(unet, vae, text, sched, device="cuda", controlnet=nets or None)


@pytest.fixture(scope="module")
def sdxl_home():
    return home_pipeline()


@pytest.mark.parametrize("height, width, controlnet", [(4096, 4096, False), (2048, 4096, False), (2048, 2048, True)])
def test_whole_sdxl_run_fits_8_gib_on_fake_cuda(sdxl_home, height, width, controlnet):
    pipe, budget = home_pipeline(controlnet=True) if controlnet else sdxl_home, 8 * 2**30
    kw = dict(height=height, width=width, num_inference_steps=1, max_memory="8GiB", output_type="pt", seed=1)
    if controlnet:  # the canny ControlNet's 2.3 GiB come and go with the UNet's 4.8
        kw["control_image"] = torch.rand(1, 3, 1024, 1024)
    plan = pipe.memory_plan(**kw)  # measures every stage (and fills the caches the run's planning reads)
    assert plan.peak_bytes <= budget and (plan.offload != "sequential") != controlnet  # streaming only with it

    tracker, measured = M.Tracker(), []
    stage = pipe.placement.stage

    @contextlib.contextmanager
    def spy(name, *a):  # the peak of live CUDA storages in every stage of the run
        with stage(name, *a):
            tracker.peak = tracker.now
            yield
            measured.append((name, tracker.peak))

    pipe.placement.stage = spy
    try:
        with M.fake_mode(), tracker, M.SDPARouter():
            out = pipe("a lighthouse", **kw)
    finally:
        del pipe.placement.stage
    assert [tuple(x.shape[-2:]) for x in out.images][-1] == (height, width)
    assert {n for n, _ in measured} == {"text", "unet", "vae"}
    estimate = max(st.weights + st.activations + st.latents for st in plan.stages)
    weights = {"vae" if st.name == "decode" else st.name: st.weights for st in plan.stages}  # resident in a stage
    for name, peak in measured:  # plus the stated reserve (docs/big-images.md): fragmentation is 10 % of what is not weights
        assert peak + M.reserve(peak - weights[name]) <= budget, (name, peak / 2**30)
    top = max(p for _, p in measured)
    # the plan's model is the measured run, to 3 %; streamed weights (offload "sequential") are a
    # bound — the two largest units, where the activations peak with smaller ones resident
    streamed = weights["unet"] if plan.offload == "sequential" else 0
    assert 0.97 * (estimate - streamed) <= top <= 1.03 * estimate
    assert all(pipe.placement.at_home(m) for m in (pipe.unet, pipe.vae, pipe.text.text_encoder))


def test_to_moves_everything_and_forgets_homes(pipe):
    ref, _ = _run(pipe, view_batch_size=4, output_type="latent")
    _run(pipe, view_batch_size=4, output_type="latent", offload="model")  # homes recorded
    assert pipe.placement._home
    assert pipe.to("cpu") is pipe and pipe.device == torch.device("cpu") and not pipe.placement._home
    out, _ = _run(pipe, view_batch_size=4, output_type="latent")
    assert all(torch.equal(a, b) for a, b in zip(out.latents, ref.latents))
