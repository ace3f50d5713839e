"""Run the PRIS-CV reference DemoFusion ControlNet pipeline (never vendored) on tiny components.

``pipeline_demofusion_sdxl_controlnet.py`` lives outside this repository; ``DEMOFUSION_REFERENCE_CONTROLNET``
names it (docs/parity.md). It is imported and adapted at runtime exactly as the plain reference
(tests/helpers/reference.py: no jitter, given upscale noises, the tiny base's size check).

``python -m tests.helpers.reference_controlnet`` prints the per-phase errors docs/parity.md quotes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers import reference as R
from tests.helpers import seeded_init_

ENV = "DEMOFUSION_REFERENCE_CONTROLNET"


def reference_path() -> Path | None:
    return R.reference_path(ENV)


def tiny_controlnets(unet, n: int = 1) -> list:
    """diffusers ControlNetModels from the tiny UNet: every weight non-zero, the conditioning
    embedding drawn at std 2/√fan_in (so the control image matters)."""
    from diffusers import ControlNetModel

    nets = []
    for k in range(n):
        net = ControlNetModel.from_unet(unet)
        seeded_init_(net, 10 + k)
        seeded_init_(net.controlnet_cond_embedding, 20 + k, scale=2.0)
        nets.append(net.eval().requires_grad_(False))
    return nets


def build(mod, components: dict, nets: list, folder):
    tok1, tok2 = R.hf_tokenizers(folder)
    pipe = mod.DemoFusionSDXLControlNetPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"],
        text_encoder_2=components["text_encoder_2"], tokenizer=tok1, tokenizer_2=tok2, unet=components["unet"],
        controlnet=nets if len(nets) > 1 else nets[0], scheduler=components["scheduler"],
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_reference(mod, pipe, *, control_image, height, width, steps, latents, upscale_noise, **kw) -> list:
    """Per phase, the reference's per-step latents (no jitter, the given noises)."""
    mod.torch.queue = [n.clone() for n in upscale_noise]
    mod.random.calls = []
    seen = []
    pipe(prompt="a cat", condition_image=control_image, height=height, width=width, num_inference_steps=steps,
         guidance_scale=7.5, latents=latents.clone(), stride=8, view_batch_size=4, sigma=0.8,  # ("latent" fails)
         callback=lambda i, t, z: seen.append(z.detach().clone()), callback_steps=1, **kw)
    assert not mod.torch.queue, "upscale noises left unused"
    return [seen[i : i + steps] for i in range(0, len(seen), steps)]


def run_ours(folder, nets_folders, *, control_image, height, width, steps, latents, upscale_noise, **kw) -> list:
    import demofusion as df

    pipe = df.DemoFusionPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32,
                                                 controlnet=nets_folders)
    seen = {}
    pipe("a cat", control_image=control_image, height=height, width=width, num_inference_steps=steps,
         guidance_scale=7.5, latents=latents.clone(), upscale_noise=[n.clone() for n in upscale_noise],
         output_type="latent", stride=8, view_batch_size=4, view_jitter=False, reference_compat=True,
         callback=lambda p, i, t, z: seen.setdefault(p, []).append(z.detach().clone()), **kw)
    return [seen[p] for p in sorted(seen)]


def setup(folder, n: int = 1):
    """(reference module, reference pipelines with 1 … n ControlNets, ControlNet folders) on tiny
    components saved to ``folder``."""
    comps = R.tiny_components(seed=0)
    R.save_folder(comps, folder)
    nets = tiny_controlnets(comps["unet"], n)
    paths = []
    for k, net in enumerate(nets):
        net.save_pretrained(Path(folder) / f"controlnet{k}", safe_serialization=True)
        paths.append(Path(folder) / f"controlnet{k}")
    mod = R.load_reference(reference_path(), "_demofusion_reference_controlnet")
    return mod, [build(mod, comps, nets[:k], folder) for k in range(1, n + 1)], paths


def phase_errors(got: list, want: list) -> list[float]:
    from tests.helpers import max_rel_err

    assert [len(p) for p in got] == [len(p) for p in want], ([len(p) for p in got], [len(p) for p in want])
    return [max(max_rel_err(g, w) for g, w in zip(gp, wp)) for gp, wp in zip(got, want)]


def report(size: int = 3 * R.BASE, steps: int = 4) -> None:
    import tempfile

    if reference_path() is None:
        raise SystemExit(f"set ${ENV} to the reference ControlNet pipeline file (docs/parity.md)")
    with tempfile.TemporaryDirectory() as tmp:
        mod, (pipe,), paths = setup(tmp, 1)
        lat, ups = R.noises(size, size, seed=1)
        g = torch.Generator().manual_seed(5)
        h1 = size // (size // R.BASE)
        image = torch.rand(1, 3, h1, h1, generator=g)
        run = dict(control_image=image, height=size, width=size, steps=steps, latents=lat, upscale_noise=ups)
        for label, kw in (("scale 1", {}), ("scale 0.5, window [0.25, 0.75)",
                                            dict(controlnet_conditioning_scale=0.5, control_guidance_start=0.25,
                                                 control_guidance_end=0.75))):
            errs = phase_errors(run_ours(tmp, paths, **run, **kw), run_reference(mod, pipe, **run, **kw))
            print(f"{size}x{size}, {steps} steps, {label}: per phase max|Δ|/max|ref| = "
                  f"{', '.join('%.1e' % e for e in errs)}")


if __name__ == "__main__":
    report()
