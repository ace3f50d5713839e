"""ControlNets in the DemoFusion pipeline.

* one phase (target = base size) equals diffusers' StableDiffusionXLControlNetPipeline on the same
  tiny components, noise and Euler scheduler: one and two ControlNets, guess mode, scale and window;
* several phases equal the loop transcription of the default mode (tests/helpers/pipeline.py):
  square and 1:2, one and two ControlNets, guess mode, a guidance window;
* every test's ControlNets have non-zero projections and a conditioning embedding drawn at
  std 2/√fan_in, and each comparison checks that a control image moved by one pixel would fail it.
"""

from __future__ import annotations

import pytest
import torch

import demofusion as df
from demofusion.controlnet import ControlNet, ControlNetConfig
from demofusion.errors import InputError
from tests.helpers import max_rel_err, seeded_init_
from tests.helpers.pipeline import record_steps, small_pipeline, transcription


def tiny_controlnet(unet_config, seed: int) -> ControlNet:
    net = seeded_init_(ControlNet(ControlNetConfig(unet_config, 3, (4, 8, 8, 16))), seed).eval()
    seeded_init_(net.controlnet_cond_embedding, seed + 100, scale=2.0)  # the control image matters
    return net.requires_grad_(False)


def control_images(n: int, height: int, width: int, seed: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, height, width, generator=g) for _ in range(n)]


# ---- one phase equals diffusers' SDXL ControlNet pipeline -------------------------
@pytest.fixture(scope="module")
def diffusers_setup(tmp_path_factory):
    pytest.importorskip("diffusers")
    from diffusers import ControlNetModel

    from tests.helpers import reference as R

    folder = tmp_path_factory.mktemp("tiny_sdxl_cn")
    comps = R.tiny_components(seed=0)
    R.save_folder(comps, folder)
    nets = []
    for k in range(2):
        net = ControlNetModel.from_unet(comps["unet"])
        seeded_init_(net, 10 + k)
        seeded_init_(net.controlnet_cond_embedding, 20 + k, scale=2.0)
        net.eval().requires_grad_(False).save_pretrained(folder / f"controlnet{k}", safe_serialization=True)
        nets.append(net)
    return dict(folder=folder, comps=comps, nets=nets)


def _diffusers_run(setup, nets, images, latents, steps, **kw):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLControlNetPipeline

    from tests.helpers import reference as R

    c = setup["comps"]
    tok1, tok2 = R.hf_tokenizers(setup["folder"])
    sched = EulerDiscreteScheduler.from_config(c["scheduler"].config)
    pipe = StableDiffusionXLControlNetPipeline(
        vae=c["vae"], text_encoder=c["text_encoder"], text_encoder_2=c["text_encoder_2"], tokenizer=tok1,
        tokenizer_2=tok2, unet=c["unet"], controlnet=nets if len(nets) > 1 else nets[0], scheduler=sched,
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe(prompt="a cat", image=images if len(nets) > 1 else images[0], height=R.BASE, width=R.BASE,
         num_inference_steps=steps, guidance_scale=7.5, latents=latents.clone(), output_type="latent",
         callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"].clone()) or {}, **kw)
    return seen


ONE_PHASE = {
    "one": (1, {}),
    "scale 0.5, window": (1, dict(controlnet_conditioning_scale=0.5, control_guidance_start=0.25,
                                  control_guidance_end=0.75)),
    "guess mode": (1, dict(guess_mode=True)),
    "two": (2, dict(controlnet_conditioning_scale=[0.7, 1.2])),
    "two, guess mode, windows": (2, dict(guess_mode=True, control_guidance_start=[0.0, 0.5],
                                         control_guidance_end=[0.5, 1.0])),
}


@pytest.mark.parity
@pytest.mark.parametrize("case", ONE_PHASE)
def test_one_phase_equals_diffusers_controlnet_pipeline(diffusers_setup, case):
    from tests.helpers import reference as R

    n, kw = ONE_PHASE[case]
    steps = 4
    folder = diffusers_setup["folder"]
    images = control_images(n, R.BASE, R.BASE)
    latents = torch.randn(1, 4, R.BASE // 8, R.BASE // 8, generator=torch.Generator().manual_seed(3))
    want = _diffusers_run(diffusers_setup, diffusers_setup["nets"][:n], images, latents, steps, **kw)
    pipe = df.DemoFusionPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32,
                                                 controlnet=[folder / f"controlnet{k}" for k in range(n)])
    run = dict(prompt="a cat", height=R.BASE, width=R.BASE, num_inference_steps=steps, guidance_scale=7.5,
               latents=latents, output_type="latent", **kw)
    _, got = record_steps(pipe, control_image=images if n > 1 else images[0], **run)
    errs = [max_rel_err(got[(1, i)], want[i]) for i in range(steps)]
    assert max(errs) <= 1e-4, f"per-step max rel err {errs}"
    # the control image matters: moved by one pixel, the same comparison fails
    moved = [im.roll(1, dims=-1) for im in images]
    _, off = record_steps(pipe, control_image=moved if n > 1 else moved[0], **run)
    assert max_rel_err(off[(1, steps - 1)], want[-1]) > 20 * max(max(errs), 1e-6)


# ---- several phases equal the loop transcription of the default mode ------------
MULTI = {
    "square, one": (256, 256, 1, dict(), 7.5),
    "1:2, one, guess": (128, 256, 1, dict(guess=True), 7.5),
    "square, two, window": (256, 256, 2, dict(scales=[0.8, 1.3], starts=[0.0, 0.34], ends=[0.67, 1.0]), 7.5),
    "1:2, two, guess, window, no CFG": (256, 128, 2, dict(guess=True, starts=[0.34, 0.0], ends=[1.0, 0.67]), 1.0),
    "2:3, three phases (dilated padding)": (256, 384, 1, dict(scales=[0.7]), 7.5),
}


@pytest.fixture(scope="module")
def small():
    pipe = small_pipeline()
    nets = [tiny_controlnet(pipe.unet.config, 40 + k) for k in range(2)]
    return pipe, nets


@pytest.mark.parity
@pytest.mark.parametrize("case", MULTI)
def test_per_step_latents_equal_loop_transcription(small, case):
    base, nets = small
    h, w, n, opts, guidance = MULTI[case]
    steps = 3
    images = control_images(n, h * 3 // 2, w * 3 // 2 + 8)  # any size: resized to every phase
    control = dict(nets=nets[:n], images=images, scales=opts.get("scales", [1.0] * n),
                   starts=opts.get("starts", [0.0] * n), ends=opts.get("ends", [1.0] * n),
                   guess=opts.get("guess", False))
    pipe = df.DemoFusionPipeline(base.unet, base.vae, base.text, base.scheduler, controlnet=nets[:n])
    kw = dict(prompt="a red fox", height=h, width=w, num_inference_steps=steps, guidance_scale=guidance, seed=3,
              stride=8, view_jitter=False, output_type="latent", view_batch_size=3,
              control_image=images if n > 1 else images[0], controlnet_conditioning_scale=control["scales"],
              control_guidance_start=control["starts"], control_guidance_end=control["ends"],
              guess_mode=control["guess"])
    _, ours = record_steps(pipe, **kw)
    ref = transcription(base, "a red fox", h, w, steps, guidance, seed=3, stride=8, control=control)
    assert sorted(ours) == sorted(ref) and {k[0] for k in ref} == set(range(1, max(h, w) // 128 + 1))
    worst = max(max_rel_err(ours[k], ref[k]) for k in ref)
    assert worst <= 1e-5, f"max rel err {worst:.2e}"
    # a control image moved by one pixel (one ControlNet's) fails the same comparison
    moved = [images[0].roll(1, dims=-1)] + images[1:]
    _, off = record_steps(pipe, **{**kw, "control_image": moved if n > 1 else moved[0]})
    assert max_rel_err(off[(2, steps - 1)], ref[(2, steps - 1)]) > 100 * max(worst, 1e-7)


@pytest.mark.parametrize("reference", [False, True])
def test_window_images_follow_the_jittered_windows(reference):
    """With jitter the windows reach into the padding: each window's control image is the crop at
    its own (jittered) corner of the image padded like the latent — edge-replicated by default,
    zeros in reference_compat. Checked on an image that is the latent itself, 8× enlarged."""
    import torch.nn.functional as F

    from demofusion.ops import local_views
    from demofusion.pipeline import DEFAULT, PRIS_CV, PathLayout
    from demofusion.pipeline.mechanisms import multidiffusion_views

    z = torch.randn(1, 3, 21, 30, generator=torch.Generator().manual_seed(0))
    starts = tuple(map(tuple, local_views(21, 30, (16, 16), 8).tolist()))
    J = (16 - 8) // 4
    views = multidiffusion_views(z, PathLayout("local", len(starts), (16, 16), starts, J), True,
                                 torch.Generator().manual_seed(1))
    image = z.repeat_interleave(8, -2).repeat_interleave(8, -1)
    padded = F.pad(z, (J,) * 4, mode="constant" if reference else "replicate")
    cut = views.pixels(image, PRIS_CV if reference else DEFAULT)
    corners = (views.crops // 8).tolist()
    assert len(cut) == len(corners) and len({tuple(c) for c in corners}) > 1
    assert any(min(c) < J for c in corners), "jitter should move a window into the padding"
    for got, (y, x) in zip(cut, corners):
        got = got[None]
        assert got.shape == (1, 3, 128, 128)
        assert torch.equal(got[:, :, ::8, ::8], padded[:, :, y : y + 16, x : x + 16])
        assert torch.equal(got[:, :, 7::8, 7::8], padded[:, :, y : y + 16, x : x + 16])
    # a slice of the views cuts the same images
    assert torch.equal(views.pixels(image, DEFAULT, 2, 3), views.pixels(image, DEFAULT)[2:5])


def test_without_controlnet_the_pipeline_is_unchanged(small):
    """A pipeline with a ControlNet whose window is empty of steps... is the plain pipeline; and the
    plain pipeline's result is untouched by the ControlNet code paths (no residual arguments)."""
    base, nets = small
    pipe = df.DemoFusionPipeline(base.unet, base.vae, base.text, base.scheduler, controlnet=nets[0])
    kw = dict(prompt="a fox", height=256, width=256, num_inference_steps=3, seed=1, stride=8,
              output_type="latent")
    plain = base(**kw).latents[-1]
    scale0 = pipe(control_image=control_images(1, 64, 64)[0], controlnet_conditioning_scale=0.0, **kw).latents[-1]
    assert torch.equal(plain, scale0)


def test_offload_policies_do_not_change_a_controlnet_run(small):
    base, nets = small
    pipe = df.DemoFusionPipeline(base.unet, base.vae, base.text, base.scheduler, controlnet=nets[:2])
    kw = dict(prompt="a fox", height=256, width=256, num_inference_steps=2, seed=1, stride=8, output_type="latent",
              control_image=control_images(2, 96, 96))
    want = pipe(**kw).latents[-1]
    for policy in ("model", "sequential"):
        assert torch.equal(pipe(offload=policy, **kw).latents[-1], want), policy


def test_reference_compat_runs_with_controlnets(small):
    """reference_compat's own choices (bicubic chain, zero padding, point samples, one dilated batch)
    change the result against the default mode, and stay finite."""
    base, nets = small
    pipe = df.DemoFusionPipeline(base.unet, base.vae, base.text, base.scheduler, controlnet=nets[0])
    kw = dict(prompt="a fox", height=256, width=256, num_inference_steps=2, seed=1, stride=8, output_type="latent",
              control_image=control_images(1, 128, 128)[0], view_jitter=False)
    a = pipe(reference_compat=True, **kw).latents[-1]
    b = pipe(**kw).latents[-1]
    assert torch.isfinite(a).all() and max_rel_err(a, b) > 1e-3


# ---- bad input, one line each ------------------------------------------------------
def _one_line(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_bad_control_inputs_are_one_line_errors(small):
    base, nets = small
    two = df.DemoFusionPipeline(base.unet, base.vae, base.text, base.scheduler, controlnet=nets[:2])
    one = df.DemoFusionPipeline(base.unet, base.vae, base.text, base.scheduler, controlnet=nets[0])
    img = control_images(1, 64, 64)[0]
    kw = dict(prompt="a fox", height=256, width=256)
    cases = [
        (two, dict(control_image=img), ("1 image(s) for 2 ControlNets",)),
        (two, dict(control_image=[img, img, img]), ("3 image(s) for 2 ControlNets",)),
        (two, dict(control_image=[img, img], controlnet_conditioning_scale=[1.0, 1.0, 1.0]),
         ("controlnet_conditioning_scale has 3 entries for 2",)),
        (one, dict(control_image=img, control_guidance_start=0.6, control_guidance_end=0.4),
         ("control_guidance_start=0.6 must be below control_guidance_end=0.4",)),
        (two, dict(control_image=[img, img], control_guidance_start=[0.0, 0.5], control_guidance_end=0.5),
         ("ControlNet 1",)),
        (one, dict(), ("pass control_image=",)),
        (base, dict(control_image=img), ("has no ControlNet",)),
        (one, dict(control_image=img * 255), ("[0, 1]", "divide 8-bit values by 255")),
        (one, dict(control_image=torch.cat([img] * 3)), ("batch of 3", "prompt has 1")),
        (one, dict(control_image="/nonexistent/edges.png"), ("edges.png",)),
    ]
    for pipe, args, words in cases:
        with pytest.raises(InputError) as e:
            pipe.validate(**kw, **args)
        _one_line(e, *words)


def test_a_controlnet_that_does_not_fit_the_unet_is_a_one_line_error(small):
    import dataclasses

    base, _ = small
    cfg = dataclasses.replace(base.unet.config, cross_attention_dim=base.unet.config.cross_attention_dim * 2)
    wrong = ControlNet(ControlNetConfig(cfg, 3, (4, 8, 8, 16)))
    with pytest.raises(InputError) as e:
        df.DemoFusionPipeline(base.unet, base.vae, base.text, base.scheduler, controlnet=[tiny_controlnet(
            base.unet.config, 1), wrong])
    _one_line(e, "controlnet[1] does not fit this UNet", "cross_attention_dim")


@pytest.mark.parametrize("switch", ["local_paths", "dilated_sampling", "dilated_blur"])
def test_ablation_switches_keep_working_with_controlnets(small, switch):
    base, nets = small
    pipe = df.DemoFusionPipeline(base.unet, base.vae, base.text, base.scheduler, controlnet=nets[0])
    kw = dict(prompt="a fox", height=256, width=256, num_inference_steps=2, seed=1, stride=8, output_type="latent",
              control_image=control_images(1, 96, 96)[0])
    full, off = pipe(**kw).latents[-1], pipe(**kw, **{switch: False}).latents[-1]
    assert torch.isfinite(off).all() and max_rel_err(off, full) > 1e-3
