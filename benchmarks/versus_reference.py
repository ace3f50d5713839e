"""Ours against the PRIS-CV reference pipeline on the CPU proxy: denoising time, same settings.

    python benchmarks/pipeline.py --reference /path/to/pipeline_demofusion_sdxl.py
    python benchmarks/versus_reference.py /path/to/pipeline_demofusion_sdxl.py --size 768 --steps 10 --repeats 5

The reference file lives outside this repository (docs/parity.md says how to fetch it); it is
imported as-is by tests/helpers/reference.py, which also builds the diffusers components. Both
pipelines load the same seeded random weights from one diffusers folder — the ``tiny`` preset's
shapes (256-px base, so 768² is three phases) — and run the same job: same prompt, steps, CFG,
stride, view batch, noise, no view jitter (the reference's ``random`` is stubbed to 0; ours
``view_jitter=False``), one process, fp32, runs alternating ours/reference so load on the machine
hits both alike.

Denoising time = whole call − text encoding − VAE decoding, each timed by forward hooks on the
modules (text encoders; the VAE's ``post_quant_conv`` and ``decoder``), so the two pipelines'
very different decoders (tiled reference-style vs ours) do not enter the ratio. ``UNet`` is the
time inside the UNet's forward; ``rest`` = denoising − UNet is the algorithm's own overhead
(views, merges, scheduler, skip residual, dilated sampling).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.helpers (the reference's runtime)

from tests.helpers.reference import build_reference_pipeline, load_reference, run_reference, save_folder  # noqa: E402


def tiny_preset_components(seed: int = 0) -> dict:
    """diffusers/transformers modules in the shapes of our ``tiny`` preset (seeded random weights)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from demofusion.schedulers.config import SDXL_BASE_CONFIG
    from tests.helpers import seeded_init_

    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, transformer_layers_per_block=(1, 1),
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=64,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=256,
        scaling_factor=0.13025,
    )
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
                  max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=1)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", projection_dim=32, **common))
    mods = dict(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2)
    for i, m in enumerate(mods.values()):
        seeded_init_(m, seed=seed + i)
        m.eval().requires_grad_(False)
    mods["scheduler"] = EulerDiscreteScheduler.from_config(SDXL_BASE_CONFIG)
    return mods


CLOCK = [time.perf_counter]  # --clock cpu: time.process_time (this process's CPU seconds; robust to other load)


class Stopwatch:
    """Seconds spent inside the forwards of some modules (pre/post hooks; nested calls not double-counted)."""

    def __init__(self, modules):
        self.seconds, self.samples, self._depth, self._t0 = 0.0, 0, 0, 0.0
        self._hooks = [h for m in modules for h in (m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post))]

    def _pre(self, module, args):
        if self._depth == 0:
            self._t0 = CLOCK[0]()
            self.samples += args[0].shape[0] if args and torch.is_tensor(args[0]) else 0
        self._depth += 1

    def _post(self, *_):
        self._depth -= 1
        if self._depth == 0:
            self.seconds += CLOCK[0]() - self._t0

    def take(self) -> float:
        s, self.seconds, self.samples = self.seconds, 0.0, 0
        return s


def watches(unet, vae, text_encoders) -> dict:
    return dict(unet=Stopwatch([unet]), decode=Stopwatch([vae.post_quant_conv, vae.decoder]), text=Stopwatch(text_encoders))


def timed(run, w) -> dict:
    for s in w.values():
        s.take()
    t0 = CLOCK[0]()
    run()
    total = CLOCK[0]() - t0
    evaluations = w["unet"].samples  # single-sample UNet evaluations: both must do the same work
    got = {k: s.take() for k, s in w.items()}
    denoise = total - got["decode"] - got["text"]
    return dict(total=total, denoise=denoise, unet=got["unet"], rest=denoise - got["unet"], decode=got["decode"],
                evaluations=evaluations)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", help="path to the reference's pipeline_demofusion_sdxl.py")
    ap.add_argument("--size", type=int, default=768, help="square output side in px (tiny base 256: 768 = 3 phases)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--stride", type=int, default=16, help="latent px between windows (window 32 latent px)")
    ap.add_argument("--view-batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: count this process's CPU seconds (with --threads 1, robust to other jobs on the machine)")
    a = ap.parse_args(argv)
    CLOCK[0] = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.threads:
        torch.set_num_threads(a.threads)

    import demofusion as df

    with tempfile.TemporaryDirectory() as tmp:
        comps = tiny_preset_components()
        save_folder(comps, tmp)
        ref = build_reference_pipeline(load_reference(a.reference), comps, tmp)
        mod = sys.modules["_demofusion_reference_pipeline"]
        ours = df.DemoFusionPipeline.from_pretrained(tmp, device="cpu", dtype=torch.float32)
        g = torch.Generator().manual_seed(1)
        n = a.size // 256
        lat = torch.randn(1, 4, a.size // n // 8, a.size // n // 8, generator=g)
        ups = [torch.randn(1, 4, a.size * s // n // 8, a.size * s // n // 8, generator=g) for s in range(2, n + 1)]
        job = dict(prompt="a lighthouse at dawn", height=a.size, width=a.size, num_inference_steps=a.steps,
                   guidance_scale=a.guidance, stride=a.stride, view_batch_size=a.view_batch_size,
                   cosine_scale_1=3.0, cosine_scale_2=1.0, cosine_scale_3=1.0, sigma=0.8, multi_decoder=True)

        def run_ref():
            run_reference(mod, ref, latents=lat, upscale_noise=ups, **job)

        def run_ours():
            ours(latents=lat.clone(), upscale_noise=[u.clone() for u in ups], view_jitter=False, **job)

        w_ref = watches(ref.unet, ref.vae, [ref.text_encoder, ref.text_encoder_2])
        w_ours = watches(ours.unet, ours.vae, [ours.text.text_encoder, ours.text.text_encoder_2])
        run_ref(), run_ours()  # warm-up: first-call allocations and lazy imports
        rows = {"reference": [], "ours": []}
        for _ in range(a.repeats):
            rows["reference"].append(timed(run_ref, w_ref))
            rows["ours"].append(timed(run_ours, w_ours))

    med = {who: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for who, runs in rows.items()}
    print(f"tiny preset shapes, fp32 CPU, {torch.get_num_threads()} threads, {a.size}² px ({n} phases), {a.steps} steps, "
          f"CFG {a.guidance}, stride {a.stride}, view_batch_size {a.view_batch_size}, no jitter; "
          f"median of {a.repeats} alternating runs after one warm-up, {a.clock} seconds")
    print("| pipeline | UNet evaluations | denoising | UNet | rest of denoising | decoding | whole call |")
    print("|---|---|---|---|---|---|---|")
    for who, m in med.items():
        print(f"| {who} | {m['evaluations']:.0f} | {m['denoise']:.3f} | {m['unet']:.3f} | {m['rest']:.3f} | {m['decode']:.3f} "
              f"| {m['total']:.3f} |")
    ratios = [o["denoise"] / r["denoise"] for o, r in zip(rows["ours"], rows["reference"])]
    print(f"denoising ours/reference: {med['ours']['denoise'] / med['reference']['denoise']:.3f} "
          f"(per pair: {', '.join(f'{x:.3f}' for x in ratios)})")


if __name__ == "__main__":
    main()
