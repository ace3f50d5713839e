"""Bring your own SDXL: another sampler on the model's schedule (--scheduler,
--timestep-spacing, round-tripped through the PNG metadata) and a swapped VAE (--vae: a diffusers
folder, one file in diffusers or LDM names; a VAE that does not fit is a one-line error)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import demofusion as df
from demofusion.cli import main
from demofusion.errors import InputError
from demofusion.presets import random_init_
from demofusion.vae import AutoencoderKL, VAEConfig, save_vae
from tests.helpers.vae import to_ldm

RUN = ["--height", "512", "--width", "512", "--steps", "3", "--no-progress", "--seed", "2"]


def _meta(path):
    return json.loads(Image.open(path).text["demofusion"])


def _px(path):
    return np.asarray(Image.open(path)).astype(int)


# ---- samplers -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name, cls", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler"),
                                       ("euler-a", "EulerAncestralDiscreteScheduler")])
def test_scheduler_flag_round_trips_through_the_png(tmp_path, name, cls):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["generate", *RUN, "--scheduler", name, "--timestep-spacing", "trailing", "--out", str(a)]) == 0
    meta = _meta(a / "phase_2.png")
    assert (meta["scheduler"], meta["timestep_spacing"]) == (name, "trailing")
    assert meta["sampler"] == {"ddim": "DDIM", "euler": "Euler", "euler-a": "Euler a"}[name]
    assert main(["generate", "--from-image", str(a / "phase_2.png"), "--no-progress", "--out", str(b)]) == 0
    assert np.array_equal(_px(a / "phase_2.png"), _px(b / "phase_2.png"))
    pipe = df.DemoFusionPipeline.from_pretrained("tiny", device="cpu").set_scheduler(name, "trailing")
    assert type(pipe.scheduler).__name__ == cls and pipe.scheduler.config["timestep_spacing"] == "trailing"


def test_set_scheduler_keeps_the_models_schedule_and_equals_a_config_swap():
    from demofusion.schedulers import SDXL_TURBO_CONFIG, from_config

    pipe = df.DemoFusionPipeline.from_pretrained("tiny", device="cpu")
    base = pipe.scheduler.config
    pipe.set_scheduler("ddim")
    assert {k: pipe.scheduler.config[k] for k in ("beta_start", "beta_end", "beta_schedule", "timestep_spacing")} == \
        {k: base[k] for k in ("beta_start", "beta_end", "beta_schedule", "timestep_spacing")}
    turbo = from_config(SDXL_TURBO_CONFIG)
    pipe.scheduler = turbo
    pipe.set_scheduler("euler")  # Turbo's trailing spacing kept unless asked otherwise
    assert pipe.scheduler.config["timestep_spacing"] == "trailing"
    with pytest.raises(InputError, match="unknown; use one of ddim, euler, euler-a"):
        pipe.set_scheduler("dpm++")


def test_samplers_give_different_pictures(tmp_path):
    outs = []
    for name in ("ddim", "euler-a"):
        assert main(["generate", *RUN, "--scheduler", name, "--out", str(tmp_path / name)]) == 0
        outs.append(_px(tmp_path / name / "phase_2.png"))
    assert np.abs(outs[0] - outs[1]).mean() > 1


# ---- VAE swap -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_vae(tmp_path_factory):
    """The tiny preset's VAE architecture with other weights: a diffusers folder, and one file in
    diffusers names and one in LDM names."""
    d = tmp_path_factory.mktemp("vae")
    vae = random_init_(AutoencoderKL(VAEConfig.preset("tiny")), 123).eval()
    save_vae(vae, d / "folder")
    sd = {k: v.contiguous() for k, v in vae.state_dict().items()}
    save_file(sd, str(d / "diffusers.safetensors"))
    save_file({k: v.contiguous() for k, v in to_ldm(sd, len(vae.config.block_out_channels)).items()},
              str(d / "ldm.safetensors"))
    return d, vae


@pytest.mark.parametrize("source", ["folder", "diffusers.safetensors", "ldm.safetensors"])
def test_vae_swap_loads_every_layout(other_vae, source):
    d, vae = other_vae
    pipe = df.DemoFusionPipeline.from_pretrained("tiny", device="cpu", vae=d / source)
    assert all(torch.equal(a, b) for a, b in zip(pipe.vae.state_dict().values(), vae.state_dict().values()))
    plain = df.DemoFusionPipeline.from_pretrained("tiny", device="cpu")
    kw = dict(prompt="a cat", height=256, width=256, num_inference_steps=2, output_type="pt")
    a, b = pipe(**kw).images[0], plain(**kw).images[0]
    assert (a - b).abs().mean() > 1e-3  # the swapped decoder decodes


def test_vae_flag_is_recorded(tmp_path, other_vae):
    d, _ = other_vae
    out = tmp_path / "v"
    assert main(["generate", *RUN, "--vae", str(d / "ldm.safetensors"), "--out", str(out)]) == 0
    meta = _meta(out / "phase_2.png")
    assert meta["vae"] == str(d / "ldm.safetensors") and meta["vae_hash"]


def test_a_vae_that_does_not_fit_is_one_line(tmp_path, capsys):
    import dataclasses

    cfg = dataclasses.replace(VAEConfig.preset("tiny"), latent_channels=16)
    save_vae(random_init_(AutoencoderKL(cfg), 1), tmp_path / "flux_like")
    with pytest.raises(InputError, match="16 channels, the UNet takes 4"):
        df.DemoFusionPipeline.from_pretrained("tiny", device="cpu", vae=tmp_path / "flux_like")
    assert main(["generate", *RUN, "--vae", str(tmp_path / "flux_like"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "16 channels" in err, err


# ---- long and weighted prompts through the pipeline and the CLI (the encoding: tests/text/test_prompts.py) ----
def test_long_and_weighted_prompts_reach_the_unet(tmp_path):
    pipe = df.DemoFusionPipeline.from_pretrained("tiny", device="cpu")
    kw = dict(height=256, width=256, num_inference_steps=2, output_type="latent", guidance_scale=5.0)
    run = lambda p, **k: pipe(p, **kw, **k).latents[-1]
    long = "a lighthouse on a cliff, " * 20 + "at dawn"  # ~140 tokens: two chunks
    assert not torch.equal(run(long), run(long, truncate_prompts=True))  # the second chunk counts
    assert torch.equal(run("a lighthouse"), run("a lighthouse", truncate_prompts=True))  # short, plain: unchanged
    assert not torch.equal(run("a (lighthouse:1.5)"), run("a lighthouse"))
    assert torch.equal(run("a (lighthouse:1.5)", truncate_prompts=True),
                       run("a (lighthouse:1.5)", truncate_prompts=True))
    out = tmp_path / "t"
    assert main(["generate", *RUN, "--prompt", long, "--truncate-prompts", "--out", str(out)]) == 0
    assert _meta(out / "phase_2.png")["truncate_prompts"] is True


# ---- LoRAs through the pipeline and the CLI (the fusing itself: tests/lora/test_load_fuse_unload.py) ----------------------
@pytest.fixture(scope="module")
def tiny_loras(tmp_path_factory):
    from tests.lora.test_load_fuse_unload import lora_targets, random_factors, write_kohya

    pipe = df.DemoFusionPipeline.from_pretrained("tiny", device="cpu")
    targets = lora_targets(pipe._lora_targets())
    d = tmp_path_factory.mktemp("loras")
    return [write_kohya(d / f"style{k}.safetensors", random_factors(targets, seed=k)) for k in range(2)]


def test_pipeline_loras_fuse_stack_and_unload_exactly(tiny_loras):
    pipe = df.DemoFusionPipeline.from_pretrained("tiny", device="cpu")
    kw = dict(prompt="a cat", height=256, width=256, num_inference_steps=2, output_type="latent")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    plain = pipe(**kw).latents[-1]
    a = pipe.load_lora(tiny_loras[0], scale=0.7)
    one = pipe(**kw).latents[-1]
    assert (one - plain).abs().max() > 1e-2 * plain.abs().max()
    b = pipe.load_lora(tiny_loras[1])
    assert pipe.loras.loaded == {a: 0.7, b: 1.0}
    pipe.unload_lora(a)
    only_b = df.DemoFusionPipeline.from_pretrained("tiny", device="cpu", lora=[(tiny_loras[1], 1.0)])
    assert all(torch.equal(x, y) for x, y in zip(pipe.unet.state_dict().values(), only_b.unet.state_dict().values()))
    pipe.unload_lora()
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    assert torch.equal(pipe(**kw).latents[-1], plain)


def test_lora_flag_is_recorded_replayed_and_kept_on_resume(tmp_path, tiny_loras, capsys):
    out, again = tmp_path / "l", tmp_path / "m"
    spec = f"{tiny_loras[0]}:0.6"
    assert main(["generate", *RUN, "--lora", spec, "--out", str(out), "--stop-after-phase", "1"]) == 0
    assert main(["generate", "--resume", str(out), "--lora", f"{tiny_loras[1]}:0.6"]) == 2
    assert "--lora" in capsys.readouterr().err
    assert main(["generate", "--resume", str(out), "--no-progress"]) == 0
    meta = _meta(out / "phase_2.png")
    assert meta["lora"] == [spec] and len(meta["lora_hash"]) == 1
    assert main(["generate", "--from-image", str(out / "phase_2.png"), "--no-progress", "--out", str(again)]) == 0
    assert np.array_equal(_px(out / "phase_2.png"), _px(again / "phase_2.png"))
    assert main(["generate", *RUN, "--lora", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing.safetensors" in err, err


def test_lora_on_fp8_weights_is_refused_and_from_pretrained_fuses_first(tiny_loras):
    from demofusion.errors import InputError

    pipe = df.DemoFusionPipeline.from_pretrained("tiny", device="cpu", fp8=True, lora=[(tiny_loras[0], 1.0)])
    assert pipe.loras.loaded  # fused before the fp8 storage
    with pytest.raises(InputError) as e:
        pipe.load_lora(tiny_loras[1])
    assert "\n" not in str(e.value) and "fp8" in str(e.value)
