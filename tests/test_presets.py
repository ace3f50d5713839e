"""Fewer evaluations per phase and run presets:

* ``upscale_strength=1`` is the paper's run; 0.5 runs half the steps of every phase after the first
  (counted UNet calls) and equals a loop transcription written here: the fused prediction formed
  for the whole latent, stepped by diffusers' scheduler from the upsampled latent noised to the
  phase's first step; ``steps_per_phase`` gives each phase its own schedule;
* every preset runs end to end on the tiny model, explicit arguments override it, and at 4096² on
  SDXL `fast` runs ≥ 2.5× and the few-step presets ≥ 10× fewer UNet evaluations than the paper's
  default;
* SDXL-Lightning / Hyper-SDXL UNet files in their published layouts load by shape and name, and an
  LCM-LoRA in lcm-lora-sdxl's key layout fuses through ``pipe.load_lora``;
* the A1111 sampler name goes into the PNG, reads back with the independent A1111 parser, replays,
  and a resume refuses another sampler.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from demofusion.cli import main
from demofusion.errors import InputError
from demofusion.pipeline.settings import validate
from demofusion.pipeline.steps import run_scheduler
from demofusion.run_presets import PRESETS
from demofusion.schedulers import SDXL_BASE_CONFIG, parse_sampler
from demofusion.schedulers.names import FAMILY_CONFIG
from tests.helpers import max_rel_err, save_tensors
from tests.helpers.pipeline import _blur2d, _guided_eps, _starts, record_steps, small_pipeline

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

# 2 phases of the 128-px tiny UNet (128×64, 256×128 px: 3 windows and 2×2 sub-latents); jitter off,
# no guidance; per step one UNet call a path (view_batch_size covers every view)
RUN = dict(prompt="a castle", height=256, width=128, num_inference_steps=4, guidance_scale=0.0, seed=5, stride=8,
           view_jitter=False, output_type="latent", view_batch_size=64)


@pytest.fixture(scope="module")
def pipe():
    return small_pipeline("sdxl")


# ---- upscale_strength and steps_per_phase ------------------------------------------
def diffusers_sampler(name: str):
    """diffusers' scheduler of sampler ``name`` from SDXL base's config (the family's values)."""
    from demofusion.schedulers import SAMPLERS

    cls, options, _ = SAMPLERS[name]
    return getattr(diffusers, cls).from_config({**FAMILY_CONFIG, **SDXL_BASE_CONFIG, **options})


def whole_latent_transcription(pipe, ref, steps: list, strength: float, prompt, height, width, seed, stride,
                               a1=3.0, a2=1.0, a3=1.0, sigma=0.8) -> dict:
    """{(phase, step): z} of docs/algorithm.md, jitter off and no guidance: per step of an upscaling
    phase the skip residual, then ONE prediction for the whole latent — window predictions averaged
    where they overlap, sub-latent predictions of the blurred latent interleaved, the two fused by
    c^α2 — stepped by diffusers' scheduler ``ref``. Phase k has ``steps[k]`` steps; an upscaling
    phase of n starts at step n − ⌊n·strength + ½⌋ from the upsampled latent noised to it."""
    base = pipe.unet.config.sample_size * 8
    win, S = base // 8, len(steps)
    sizes = [(round(height * s / S / 8) * 8, round(width * s / S / 8) * 8) for s in range(1, S)] + [(height, width)]
    root = torch.Generator().manual_seed(seed)
    gens = [torch.Generator().manual_seed(int(v)) for v in torch.randint(2**62, (S,), generator=root)]
    e, pooled = pipe.text.encode(prompt)
    cond = ((e, pooled), (torch.zeros_like(e), torch.zeros_like(pooled)), (height, width))
    eps_of = lambda x, t, crop: _guided_eps(pipe, ref.scale_model_input(x, t), t, cond, crop, 0.0)  # noqa: E731
    rec = {}
    ref.set_timesteps(steps[0])
    z = torch.randn((1, 4, sizes[0][0] // 8, sizes[0][1] // 8), generator=gens[0]) * ref.init_noise_sigma
    for i, t in enumerate(ref.timesteps):
        z = ref.step(eps_of(z, t, (0, 0)), t, z).prev_sample
        rec[(1, i)] = z.clone()
    mean1, std1 = z.mean(), z.std()
    for k in range(1, S):
        s, n = k + 1, steps[k]
        first = n - max(1, min(n, int(n * strength + 0.5)))
        h, w = sizes[k][0] // 8, sizes[k][1] // 8
        ref.set_timesteps(n)
        ts = ref.timesteps
        z_up = F.interpolate(z, size=(h, w), mode="bicubic")
        noise = torch.randn(z_up.shape, generator=gens[k])
        z = ref.add_noise(z_up, noise, ts[first : first + 1])
        for i in range(first, n):
            t = ts[i]
            c = 0.5 * (1 + math.cos(math.pi * (1000 - float(t)) / 1000))
            z = (1 - c**a1) * z + c**a1 * ref.add_noise(z_up, noise, ts[i : i + 1])
            J, (wh, ww) = (win - stride) // 4, (min(win, h), min(win, w))
            total, count = torch.zeros_like(z), torch.zeros_like(z)
            for a in _starts(h, wh, stride):
                for b in _starts(w, ww, stride):
                    total[:, :, a : a + wh, b : b + ww] += eps_of(z[:, :, a : a + wh, b : b + ww], t,
                                                                  ((a + J) * 8, (b + J) * 8))
                    count[:, :, a : a + wh, b : b + ww] += 1
            ph, pw = (-h) % s, (-w) % s
            zg = F.pad(z, (pw, 0, ph, 0))
            blurred = _blur2d(zg, 2 * s - 1, sigma * (0.99 * c**a3 + 0.01))
            bv, valid = blurred[:, :, ph:, pw:], zg[:, :, ph:, pw:]
            blurred = (blurred - bv.mean()) / bv.std() * valid.std() + valid.mean()
            eps_g = torch.zeros_like(zg)
            for a in range(s):
                for b in range(s):
                    eps_g[:, :, a::s, b::s] = eps_of(blurred[:, :, a::s, b::s], t, (0, 0))
            eps = (1 - c**a2) * (total / count) + c**a2 * eps_g[:, :, ph:, pw:]
            z = ref.step(eps, t, z).prev_sample
            rec[(s, i)] = z.clone()
        z = (z - z.mean()) / z.std() * std1 + mean1
    return rec


def test_upscale_strength_one_is_the_paper(pipe):
    """The default (every phase all its steps from pure noise) and upscale_strength=1 with
    steps_per_phase = the run's steps give the same bits and the same UNet calls."""
    kw = {**RUN, "num_inference_steps": 2}
    ref = pipe(**kw)
    got = pipe(**kw, upscale_strength=1.0, steps_per_phase=[2, 2])
    assert all(torch.equal(a, b) for a, b in zip(got.latents, ref.latents)) and len(ref.latents) == 2
    assert ref.unet_calls == got.unet_calls == [2, 2 * 2]  # phase 2: the windows' call and the sub-latents'



@pytest.mark.parity
@pytest.mark.parametrize("sampler,steps", [("euler", [4, 4]), ("dpm++2m", [3, 5])])
def test_half_strength_runs_half_the_steps_and_equals_the_transcription(pipe, sampler, steps):
    """upscale_strength=0.5: phase 2 runs the last ⌊n/2 + ½⌋ of its n steps (two UNet calls a step
    here, against 2n at strength 1), and every step equals the whole-latent transcription ≤ 1e-5
    (the multistep sampler's history starts afresh at the phase's first step, as diffusers' does)."""
    kw = {**RUN, "upscale_strength": 0.5, "sampler": sampler}
    if steps != [4, 4]:
        kw["steps_per_phase"] = steps
    out, ours = record_steps(pipe, **kw)
    assert out.unet_calls == ([4, 2 * 2] if sampler == "euler" else [3, 2 * 3])
    ref = whole_latent_transcription(pipe, diffusers_sampler(sampler), steps, 0.5, RUN["prompt"], RUN["height"],
                                     RUN["width"], RUN["seed"], RUN["stride"])
    assert sorted(ours) == sorted(ref)
    worst = max(max_rel_err(ours[k], ref[k]) for k in ref)
    assert worst <= 1e-5, f"max rel err {worst:.2e}"


def test_strength_and_steps_per_phase_are_checked_and_counted():
    """One-line errors; the work line, the memory planner's steps and the run id count them."""
    from demofusion.frontend.runs import run_id
    from demofusion.frontend.runs import defaults

    kw = dict(prompt="x", height=2048, width=2048, num_inference_steps=10, guidance_scale=7.5)
    for bad, message in [(dict(upscale_strength=0.0), r"upscale_strength must be in \(0\.0, 1\.0\], got 0\.0"),
                         (dict(steps_per_phase=[10]), "steps_per_phase has 1 entries but the run has 2 phases"),
                         (dict(steps_per_phase=[10, 0]), r"steps_per_phase\[1\] must be 1\.\.1000, got 0"),
                         (dict(upscale_strength=0.5, reference_compat=True), "cannot be combined with reference")]:
        with pytest.raises(InputError, match=message):
            validate(1024, **kw, **bad)
    s = validate(1024, **kw, upscale_strength=0.3, steps_per_phase=[10, 20])
    assert [s.phase_steps(k) for k in range(2)] == [(10, 0), (20, 14)]  # 6 of 20 steps: ⌊20·0.3 + ½⌋
    views = [1, 9 + 4]  # phase 2 at 2048²: 3×3 windows of 128 at stride 64, 2×2 sub-latents
    assert s.unet_evaluations() == [2 * 10 * views[0], 2 * 6 * views[1]]
    heun = validate(1024, **kw, upscale_strength=0.3, steps_per_phase=[10, 20], sampler="heun")
    assert heun.unet_evaluations() == [2 * 19 * views[0], 2 * 11 * views[1]]  # 2 a step, less the last corrector
    params = defaults()
    assert run_id(params) == run_id({**params, "upscale_strength": 1.0, "steps_per_phase": None})  # older ids stay
    assert run_id({**params, "upscale_strength": 0.5}) != run_id(params)


# ---- presets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_runs_end_to_end(pipe, name):
    """Each preset's sampler, spacing, guidance and knobs drive a 2-phase tiny run (2 steps: an explicit
    argument overrides the preset's: 1 step); the pipeline's own sampler is left as it was."""
    p, before = PRESETS[name], pipe.scheduler
    kw = dict(prompt="a castle", height=256, width=128, preset=name, num_inference_steps=1, seed=1,
              output_type="latent", view_batch_size=64)
    s = pipe.validate(**kw)
    sched = run_scheduler(pipe.scheduler, s)
    assert (s.sampler, s.sigmas, s.num_inference_steps) == (p.sampler, p.sigmas, 1)
    assert s.guidance_scale == (7.5 if p.guidance is None else p.guidance)
    assert s.upscale_strength == p.knobs.get("upscale_strength", 1.0)
    assert (p.timestep_spacing is None) or sched.config["timestep_spacing"] == p.timestep_spacing
    assert sched.config.get("use_karras_sigmas", False) == (p.sigmas == "karras")
    out = pipe(**kw)
    assert len(out.latents) == 2 and all(torch.isfinite(z).all() for z in out.latents)
    assert out.unet_calls == [1, 2]
    assert pipe.scheduler is before


def test_explicit_arguments_override_a_preset():
    s = validate(1024, prompt="x", height=2048, width=2048, preset="fast")
    assert (s.sampler, s.sigmas, s.num_inference_steps, s.guidance_scale, s.upscale_strength) == \
        ("dpm++2m", "karras", 20, 7.5, 0.8)
    s = validate(1024, prompt="x", height=2048, width=2048, preset="fast", sampler="UniPC", num_inference_steps=7,
                 upscale_strength=1.0, guidance_scale=5.0)
    assert (s.sampler, s.sigmas, s.num_inference_steps, s.guidance_scale, s.upscale_strength) == \
        ("unipc", None, 7, 5.0, 1.0)
    from demofusion.cli.sampling import with_preset

    assert with_preset({"preset": "lightning-4step", "num_inference_steps": 6}) == {
        "preset": "lightning-4step", "scheduler": "euler", "timestep_spacing": "trailing", "num_inference_steps": 6,
        "guidance_scale": 0.0}
    with pytest.raises(InputError, match="preset 'rapid': unknown; use one of fast, lightning-2step"):
        validate(1024, prompt="x", height=2048, width=2048, preset="rapid")


def test_preset_work_at_4096_meets_the_targets(capsys):
    """fast ≥ 2.5× and the few-step presets ≥ 10× fewer UNet evaluations than the paper's default at
    4096² on SDXL; the dry run's work line says so, with FLOPs."""
    from demofusion.cli.common import report_work

    paper = validate(1024, prompt="x", height=4096, width=4096)
    work = lambda s: sum(s.unet_evaluations())  # noqa: E731
    assert work(paper) == 11_300
    for name in PRESETS:
        s = validate(1024, prompt="x", height=4096, width=4096, preset=name)
        assert work(paper) / work(s) >= (2.5 if name == "fast" else 10), name
    report_work(validate(1024, prompt="x", height=4096, width=4096, preset="fast"), "cuda", "sdxl-base", paper=paper)
    out = capsys.readouterr().out
    assert "work of preset fast: 3,624 UNet evaluations ≈ 2.45e+16 FLOPs" in out
    assert "the paper's default (50 steps, guidance 7.5, every phase from pure noise): 11,300 ≈ 7.64e+16" in out


def test_dry_run_prints_the_preset_beside_the_paper(tmp_path, capsys):
    assert main(["generate", "--dry-run", "--preset", "lcm", "--height", "512", "--width", "512",
                 "--out", str(tmp_path / "x")]) == 0
    out = capsys.readouterr().out
    assert "work of preset lcm: 56 UNet evaluations; the paper's default" in out and ": 1,400 — 25.0× fewer" in out


# ---- Lightning / Hyper UNet files, LCM-LoRA -------------------------------------------
# a small SDXL-shaped UNet: SDXL's 64-dim heads, norm groups and micro-conditioning, which a file cannot state
UNET = {"block_out_channels": [64, 128], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "attention_head_dim": [1, 2],
        "transformer_layers_per_block": [1, 1], "layers_per_block": 1, "cross_attention_dim": 96,
        "projection_class_embeddings_input_dim": 32 + 6 * 256}


def test_lightning_and_hyper_unet_files_load_by_shape_and_name(tmp_path):
    """The published layouts, random values: the UNet alone under diffusers' names
    (sdxl_lightning_4step_unet.safetensors, Hyper-SDXL-1step-Unet.safetensors), the UNet under the
    original names in a whole checkpoint (sdxl_lightning_4step.safetensors, fp16
    Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors), and a diffusers folder; each equals diffusers'
    UNet of the same weights (fp16-rounded): the same tensors from every layout, as an SDXL base (not
    Turbo) UNet, computing diffusers' forward ≤ 1e-5 (the head count comes from the shapes)."""
    from demofusion.unet import load_unet
    from tests.helpers.unet import SDXL_BASE_CONFIG as UNET_BASE, diffusers_forward, diffusers_unet, to_sgm, \
        unet_inputs, write_diffusers

    cfg = {**UNET_BASE, **UNET}
    src = diffusers_unet(cfg, seed=4)
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(p.half().float())
    sd = src.state_dict()
    others = {"first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3),
              "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(8)}
    files = [save_tensors(tmp_path / "sdxl_lightning_4step_unet.safetensors", sd),
             save_tensors(tmp_path / "Hyper-SDXL-1step-Unet.safetensors", sd),
             save_tensors(tmp_path / "sdxl_lightning_4step.safetensors", {**to_sgm(sd, cfg), **others}),
             save_tensors(tmp_path / "Hyper-SDXL-1step-Unet-Comfyui.fp16.safetensors",
                          {k: v.half() for k, v in {**to_sgm(sd, cfg), **others}.items()}),
             write_diffusers(tmp_path / "sdxl-lightning-4step", src)]
    loaded = [load_unet(f, dtype=torch.float32) for f in files]
    for f, unet in zip(files, loaded):  # the same UNet from every layout, an SDXL base (not Turbo) one
        assert unet.config == loaded[0].config, f.name
        assert unet.config.sample_size == 128, f.name
        got = unet.state_dict()
        assert got.keys() == sd.keys() and all(torch.equal(got[k], sd[k]) for k in sd), f.name
    inputs = unet_inputs(cfg, batch=1, h=16, w=16)  # and it computes what diffusers' UNet does (heads by shape)
    with torch.no_grad():
        assert max_rel_err(loaded[0](*inputs), diffusers_forward(src, inputs)) <= 1e-5


# lcm-lora-sdxl's targets (the LCM-LoRA training script's list), saved in kohya's layout with
# diffusers module paths: lora_unet_<path with "_">.lora_down.weight / .lora_up.weight / .alpha
LCM_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                    "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")


def test_lcm_lora_keys_fuse_through_load_lora(pipe, tmp_path):
    """Every LCM-LoRA target of the UNet gets W + α/r·(up @ down) (computed here), and unloading
    restores the weights bit for bit."""
    rank, alpha, g = 4, 8.0, torch.Generator().manual_seed(2)
    tensors, factors = {}, {}
    for name, m in pipe.unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or not any(
                name == t or name.endswith("." + t) for t in LCM_LORA_TARGETS):
            continue
        w = m.weight
        down = torch.randn(rank, *w.shape[1:], generator=g) * 0.1
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=g) * 0.1
        key = "lora_unet_" + name.replace(".", "_")
        tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
        factors[name] = (w.detach().clone(), (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(w.shape))
    kinds = {n.rsplit(".", 1)[-1] for n in factors} | {n.split(".")[-2] for n in factors}
    assert {"to_q", "proj_in", "conv1", "time_emb_proj", "conv_shortcut"} <= kinds and len(factors) > 20
    path = save_tensors(tmp_path / "pytorch_lora_weights.safetensors", tensors)
    modules = dict(pipe.unet.named_modules())
    pipe.load_lora(path)
    try:
        for name, (w0, delta) in factors.items():
            got = modules[name].weight - w0
            assert (got - delta).abs().max() <= 1e-6 * max(delta.abs().max().item(), 1.0), name
    finally:
        pipe.unload_lora()
    assert all(torch.equal(modules[n].weight, w0) for n, (w0, _) in factors.items())


# ---- the A1111 sampler name and the sampler on the command line ------------------------------------
def test_a1111_sampler_name_round_trips_through_the_png_and_replays(tmp_path, capsys):
    """--scheduler in A1111's spelling: recorded as our name + σ schedule, written as "DPM++ 2M SDE
    Karras" in the PNG's parameters (read back by the independent A1111 parser), replayed by
    --from-image; --resume refuses another sampler, and a model whose scheduler changed."""
    from demofusion.cli.args import build_parser
    from demofusion.frontend.loading import load_pipeline
    from demofusion.cli.generate import settle_params
    from demofusion.schedulers import a1111_name
    from PIL import Image
    from tests.test_outputs import parse_a1111

    out = tmp_path / "run"
    assert main(["generate", "--model", "tiny", "--height", "512", "--width", "512", "--steps", "1", "--no-progress",
                 "--scheduler", "DPM++ 2M SDE Karras", "--stop-after-phase", "1", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert (run["scheduler"], run["sigmas"], run["sampler"]) == ("dpm++2m-sde", "karras", "DPM++ 2M SDE Karras")
    parsed = parse_a1111(Image.open(out / "phase_1.png").text["parameters"])
    assert parsed["Sampler"] == "DPM++ 2M SDE Karras" and parse_sampler(parsed["Sampler"]) == ("dpm++2m-sde", "karras")
    params, _, _ = settle_params(build_parser().parse_args(["generate", "--from-image", str(out / "phase_1.png")]))
    assert a1111_name(load_pipeline({**params, "device": "cpu", "dtype": "float32"}).scheduler) == "DPM++ 2M SDE Karras"
    capsys.readouterr()
    assert main(["generate", "--resume", str(out), "--scheduler", "Euler"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--scheduler euler conflicts with the run being resumed (scheduler 'dpm++2m-sde')" in err
    (out / "run.json").write_text(json.dumps({**run, "sampler": "Euler a"}))  # as if the model's config had changed
    assert main(["generate", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "the run sampled with 'Euler a'" in err


@pytest.mark.parametrize("flags,message", [
    (["--scheduler", "dpm++4m"], "--scheduler 'dpm++4m': unknown; use one of ddim, euler"),
    (["--scheduler", "ddim", "--sigmas", "karras"], "--scheduler 'ddim' takes no σ schedule"),
    (["--scheduler", "DPM++ 2M Karras", "--sigmas", "exponential"], "says karras sigmas but sigmas='exponential'"),
    (["--upscale-strength", "1.5"], r"argument --upscale-strength: must be in (0.0, 1.0], got 1.5"),
    (["--steps-per-phase", "4"], "--steps-per-phase has 1 entries but the run has 2 phases"),
])
def test_sampler_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    assert main(["generate", "--dry-run", "--height", "512", "--width", "512", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
