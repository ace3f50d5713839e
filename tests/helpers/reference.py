"""Run the PRIS-CV reference DemoFusion pipeline (never vendored) on tiny diffusers components.

The reference file ``pipeline_demofusion_sdxl.py`` lives *outside* this repository; its path is
given by the ``DEMOFUSION_REFERENCE`` environment variable (see docs/parity.md). It is
imported as-is from that path; only the runtime is adapted, without editing the file:

- ``matplotlib`` (imported at module level, used only by ``show_image=True``) is stubbed if absent;
- its module-level ``random`` is replaced by a stub whose ``randint`` returns 0 (no view jitter;
  every call is recorded and its bounds checked);
- its module-level ``torch`` is a proxy whose ``randn_like`` returns the given upscale noises in
  call order (one per upscaling phase); everything else is the real torch;
- its DemoFusion-specific size check (long side a multiple of 1024) is relaxed to multiples of the
  tiny base size, since the tiny UNet's native size is ``sample_size·8`` px, not 1024.

Per-step latents come from the reference's own ``callback`` argument, the renormalised phase
latents from a wrapper around the instance's ``tiled_decode``/``vae.decode`` inputs, and decoded
images (floats in [-1, 1]) from a wrapper around the instance's ``image_processor.postprocess``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import torch

from demofusion.schedulers.config import SDXL_BASE_CONFIG
from tests.helpers import max_rel_err, seeded_init_

ENV = "DEMOFUSION_REFERENCE"

SAMPLE_SIZE = 16  # tiny UNet native latent side -> base 128 px
BASE = SAMPLE_SIZE * 8
TEXT_HIDDEN = 32
VOCAB = 1000
BOS, EOS = 512, 513


def reference_path(env: str = ENV) -> Path | None:
    """The reference file named by $DEMOFUSION_REFERENCE (or ``env``), or None when unset."""
    p = os.environ.get(env)
    if not p:
        return None
    p = Path(p).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"${env}={p} is not a file; see docs/parity.md "
                                "to fetch it")
    return p


# ---------------------------------------------------------------- importing the reference ----
class _Randint:
    """Stand-in for the reference's ``random``: randint(a, b) -> 0, bounds checked and logged."""

    def __init__(self):
        self.calls = []

    def randint(self, a, b):
        assert a <= 0 <= b, f"reference asked randint({a}, {b}); 0 is out of range"
        self.calls.append((a, b))
        return 0


class _TorchProxy(types.ModuleType):
    """The real torch, except ``randn_like`` pops the next queued noise tensor."""

    def __init__(self):
        super().__init__("torch")
        self.queue = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def randn_like(self, x, *args, **kwargs):
        assert self.queue, "reference drew more randn_like noises than were given"
        noise = self.queue.pop(0)
        assert noise.shape == x.shape, f"given noise {tuple(noise.shape)} != reference's {tuple(x.shape)}"
        return noise.to(device=x.device, dtype=x.dtype).clone()


def load_reference(path: str | Path, name: str = "_demofusion_reference_pipeline"):
    """Import the reference file as a private module, adapted at runtime (file left untouched).
    Its ``diffusers.pipelines.controlnet.multicontrolnet`` import (moved in later diffusers) is
    answered by where diffusers keeps ``MultiControlNetModel`` now."""
    path = Path(path)
    if name in sys.modules:
        return sys.modules[name]
    old = "diffusers.pipelines.controlnet.multicontrolnet"
    try:
        importlib.import_module(old)
    except ImportError:
        sys.modules[old] = importlib.import_module("diffusers.models.controlnets.multicontrolnet")
    # Import what the reference imports first, so the libraries see the real environment.
    for dep in ("transformers", "diffusers", "diffusers.loaders", "diffusers.image_processor",
                "diffusers.pipelines.stable_diffusion_xl", "diffusers.pipelines.pipeline_utils"):
        importlib.import_module(dep)
    stubbed = []
    for missing in ("matplotlib", "matplotlib.pyplot"):
        try:
            importlib.import_module(missing)
        except ImportError:
            sys.modules[missing] = types.ModuleType(missing)
            sys.modules[missing].__spec__ = importlib.machinery.ModuleSpec(missing, None)
            stubbed.append(missing)
    if stubbed:
        sys.modules["matplotlib"].pyplot = sys.modules["matplotlib.pyplot"]
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        for missing in stubbed:
            sys.modules.pop(missing, None)
    mod.random = _Randint()
    mod.torch = _TorchProxy()
    sys.modules[name] = mod
    return mod


# ---------------------------------------------------------------- tiny components -------------
def tiny_components(seed: int = 0, preset: bool = False) -> dict:
    """Tiny SDXL-like diffusers/transformers components with seeded random weights (fp32, eval).
    ``preset=True``: in the shapes of our ``tiny`` preset instead (256-px base; the CPU proxy of
    benchmarks/versus_reference.py)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    size, layers, depth = (32, 1, (1, 1)) if preset else (SAMPLE_SIZE, 2, (1, 2))
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=layers, transformer_layers_per_block=depth,
        attention_head_dim=(2, 4), use_linear_projection=True, cross_attention_dim=2 * TEXT_HIDDEN,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=TEXT_HIDDEN + 6 * 8, norm_num_groups=8 if preset else 32,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
        sample_size=size * 8, scaling_factor=0.13025,
    )
    common = dict(hidden_size=TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=77,
                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=1)
    te1 = CLIPTextModel(CLIPTextConfig(hidden_act="quick_gelu", **common))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_act="gelu", projection_dim=32, **common))
    mods = dict(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2)
    for i, m in enumerate(mods.values()):
        seeded_init_(m, seed=seed + i)
        m.eval().requires_grad_(False)
    # SDXL's VAE config asks for fp32 decoding; the reference honours it only in fp16.
    mods["scheduler"] = EulerDiscreteScheduler.from_config(SDXL_BASE_CONFIG)
    return mods


def save_folder(components: dict, folder: str | Path) -> Path:
    """Write the components as a diffusers model folder (safetensors), with byte-level tokenizers."""
    from tests.helpers.text import write_byte_vocab

    folder = Path(folder)
    for key in ("unet", "vae", "text_encoder", "text_encoder_2"):
        components[key].save_pretrained(folder / key, safe_serialization=True)
    components["scheduler"].save_config(folder / "scheduler")
    # SDXL: tokenizer pads with <|endoftext|>, tokenizer_2 with "!" (id 0 here as in the real vocab).
    for key, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        write_byte_vocab(folder / key, pad_token=pad)
        (folder / key / "tokenizer_config.json").write_text(json.dumps(
            {"model_max_length": 77, "pad_token": pad, "bos_token": "<|startoftext|>",
             "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
             "tokenizer_class": "CLIPTokenizer"}))
    index = {
        "_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def hf_tokenizers(folder: str | Path):
    """transformers' CLIPTokenizers read back from the saved folder (what SDXL pipelines use)."""
    from transformers import CLIPTokenizer

    folder = Path(folder)
    return tuple(CLIPTokenizer.from_pretrained(str(folder / k)) for k in ("tokenizer", "tokenizer_2"))


# ---------------------------------------------------------------- running it -------------------
def build_reference_pipeline(mod, components: dict, folder: str | Path):
    """The reference ``DemoFusionSDXLPipeline`` around the given components (fp32, CPU)."""
    tok1, tok2 = hf_tokenizers(folder)
    pipe = mod.DemoFusionSDXLPipeline(
        vae=components["vae"], text_encoder=components["text_encoder"],
        text_encoder_2=components["text_encoder_2"], tokenizer=tok1, tokenizer_2=tok2,
        unet=components["unet"], scheduler=components["scheduler"],
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    base = pipe.default_sample_size * pipe.vae_scale_factor
    original_check = type(pipe).check_inputs

    def check_inputs(self, prompt, prompt_2, height, width, *args, **kwargs):
        # The reference insists on multiples of 1024 (SDXL's base); scale to the tiny base.
        assert max(height, width) % base == 0, (height, width, base)
        return original_check(self, prompt, prompt_2, height * 1024 // base, width * 1024 // base,
                              *args, **kwargs)

    pipe.check_inputs = types.MethodType(check_inputs, pipe)
    return pipe


def noises(height: int, width: int, seed: int = 1):
    """Phase-1 latents and one upscale noise per phase (square targets), unit variance."""
    g = torch.Generator().manual_seed(seed)
    scale = max(height, width) // BASE
    lat = torch.randn(1, 4, height // scale // 8, width // scale // 8, generator=g)
    ups = [torch.randn(1, 4, height * s // scale // 8, width * s // scale // 8, generator=g)
           for s in range(2, scale + 1)]
    return lat, ups


def run_reference(mod, pipe, *, prompt, height, width, num_inference_steps, guidance_scale,
                  latents, upscale_noise, fixed_scaling=False, **kwargs) -> dict:
    """Run the reference with no jitter and the given noise; return what it computed.

    ``fixed_scaling=True`` corrects its one bug (docs/algorithm.md, reference quirk 1) from outside: the scheduler's
    step index is re-seated from ``t`` before every ``scale_model_input`` call.

    Returns ``steps`` (per phase, a list of per-step latents), ``latents`` (per phase, the
    renormalised latents the phase decodes), ``images`` (per phase, float images in [-1, 1] as
    decoded, before post-processing), ``pil`` (the reference's returned PIL images) and
    ``randint_calls``.
    """
    mod.torch.queue = [n.clone() for n in upscale_noise]
    mod.random.calls = []
    seen, decoded, images = [], [], []

    def callback(step, t, z):
        seen.append(z.detach().clone())

    tiled = pipe.tiled_decode

    def tiled_decode(z, h, w):
        decoded.append(z.detach().clone())
        return tiled(z, h, w)

    post = pipe.image_processor.postprocess

    def postprocess(image, *a, **k):
        images.append(image.detach().clone())
        return post(image, *a, **k)

    sched = pipe.scheduler
    scale = sched.scale_model_input

    def scale_model_input(sample, t):
        sched._init_step_index(t)  # the σ of the step being taken, not the stale index
        return scale(sample, t)

    pipe.tiled_decode = tiled_decode
    pipe.image_processor.postprocess = postprocess
    if fixed_scaling:
        sched.scale_model_input = scale_model_input
    try:
        pil = pipe(prompt, height=height, width=width, num_inference_steps=num_inference_steps,
                   guidance_scale=guidance_scale, latents=latents.clone(), callback=callback,
                   callback_steps=1, **kwargs)
    finally:
        del pipe.tiled_decode
        pipe.image_processor.postprocess = post
        sched.__dict__.pop("scale_model_input", None)
    assert not mod.torch.queue, f"{len(mod.torch.queue)} upscale noises were not used"
    n = num_inference_steps
    steps = [seen[i : i + n] for i in range(0, len(seen), n)]
    phase_latents = [steps[0][-1]] + decoded if kwargs.get("multi_decoder", True) else None
    return dict(steps=steps, latents=phase_latents, images=images, pil=pil,
                randint_calls=list(mod.random.calls))


# ---------------------------------------------------------------- ours, and comparing ------------
_OURS = {}


def run_ours(folder, *, prompt, height, width, num_inference_steps, guidance_scale, latents,
             upscale_noise, **kwargs) -> dict:
    """Our pipeline from the saved folder, no jitter, same noise; per-step latents captured."""
    import demofusion as df

    key = str(folder)
    if key not in _OURS:
        _OURS[key] = df.DemoFusionPipeline.from_pretrained(key, device="cpu", dtype=torch.float32)
    pipe = _OURS[key]
    seen = {}

    def callback(phase, step, t, z):
        seen.setdefault(phase, []).append(z.detach().clone())

    out = pipe(prompt, height=height, width=width, num_inference_steps=num_inference_steps,
               guidance_scale=guidance_scale, latents=latents.clone(),
               upscale_noise=[n.clone() for n in upscale_noise], view_jitter=False,
               callback=callback, **kwargs)
    steps = [seen[p] for p in sorted(seen)]
    return dict(steps=steps, latents=list(out.latents), pil=list(out.images))


def pil_max_diff(a, b, crop: bool = False) -> int:
    """Largest per-pixel difference (0..255) between two PIL images of the same size
    (``crop=True``: over the top-left region both have)."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.int16), np.asarray(b, dtype=np.int16)
    if crop:
        h, w = min(a.shape[0], b.shape[0]), min(a.shape[1], b.shape[1])
        a, b = a[:h, :w], b[:h, :w]
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a - b).max())


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖₂ / ‖b‖₂ (RMS of the difference relative to the RMS of b)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- diagnosis -----------------------
class UNetCalls:
    """Record every UNet call (input sample, timestep, time_ids, output) of a module, in order.

    Works on diffusers' ``UNet2DConditionModel`` (``added_cond_kwargs``) and on ours (``time_ids=``);
    used to find the first call where two pipelines part ways (``first_divergence``).
    """

    def __init__(self, unet):
        self.unet, self.calls, self._hooks = unet, [], []

    def __enter__(self):
        def pre(mod, args, kwargs):
            names = ("sample", "timestep", "encoder_hidden_states")
            rec = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
            extra = kwargs.get("added_cond_kwargs") or kwargs
            rec["time_ids"] = extra.get("time_ids")
            rec = {k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in rec.items()}
            self.calls.append(rec)

        def post(mod, args, kwargs, out):
            out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
            self.calls[-1]["out"] = out.detach().clone()

        self._hooks = [self.unet.register_forward_pre_hook(pre, with_kwargs=True),
                       self.unet.register_forward_hook(post, with_kwargs=True)]
        return self

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()


def first_divergence(got: list, want: list, tol: float = 1e-4):
    """(call index, field, rel err, shapes) of the first differing UNet call, or None."""
    for i, (g, w) in enumerate(zip(got, want)):
        for k in ("sample", "time_ids", "out"):
            a, b = g.get(k), w.get(k)
            if a is None or b is None:
                continue
            if a.shape != b.shape:
                return i, k, float("inf"), (tuple(a.shape), tuple(b.shape))
            err = max_rel_err(a, b)
            if err > tol:
                return i, k, err, tuple(a.shape)
    if len(got) != len(want):
        return min(len(got), len(want)), "count", float("inf"), (len(got), len(want))
    return None


# ---------------------------------------------------------------- report ------------------------
def report(height: int = 3 * BASE, width: int = 3 * BASE, steps: int = 4) -> None:
    """Print the per-phase errors docs/parity.md quotes.

    ``DEMOFUSION_REFERENCE=/path/to/pipeline_demofusion_sdxl.py python -m tests.helpers.reference``
    """
    import tempfile

    path = reference_path()
    if path is None:
        raise SystemExit(f"set ${ENV} to the reference file (docs/parity.md)")
    cfg = dict(prompt="a cat", height=height, width=width, num_inference_steps=steps,
               guidance_scale=7.5, stride=8, sigma=0.8, cosine_scale_1=3.0, cosine_scale_2=1.0,
               cosine_scale_3=1.0, multi_decoder=True)
    with tempfile.TemporaryDirectory() as tmp:
        comps = tiny_components(seed=0)
        save_folder(comps, tmp)
        mod = load_reference(path)
        ref = build_reference_pipeline(mod, comps, tmp)
        lat, ups = noises(height, width, seed=1)
        run = dict(latents=lat, upscale_noise=ups)

        def phase_errs(got, want):
            return ["%.1e" % max(max_rel_err(g, w) for g, w in zip(gp, wp))
                    if gp[0].shape == wp[0].shape else f"shapes {tuple(gp[0].shape)} vs {tuple(wp[0].shape)}"
                    for gp, wp in zip(got["steps"], want["steps"])]

        def image_diffs(got, want):
            return [pil_max_diff(g, w) if g.size == w.size else f"sizes {g.size} vs {w.size}"
                    for g, w in zip(got["pil"], want["pil"])]

        print(f"tiny SDXL-like components, fp32 CPU, {height}x{width} px, {steps} steps, CFG 7.5")
        print("max over steps of max|ours - ref| / max|ref|, per phase:")
        want = {}
        for vb in (4, 16):
            want[vb] = run_reference(mod, ref, view_batch_size=vb, **run, **cfg)
            got = run_ours(tmp, view_batch_size=vb, reference_compat=True, **run, **cfg)
            print(f"  reference_compat=True, view_batch_size={vb:2d}: {phase_errs(got, want[vb])}"
                  f"  images max diff (/255): {image_diffs(got, want[vb])}")
        print(f"  reference vb=4 vs vb=16 (its batch dependence): {phase_errs(want[4], want[16])}")
        if height != width:
            print("  (default mode has its own phase sizes for non-square targets: not comparable)")
            return
        fixed = run_reference(mod, ref, view_batch_size=4, fixed_scaling=True, **run, **cfg)
        got = run_ours(tmp, view_batch_size=4, reference_compat=False, **run, **cfg)
        print(f"  default mode vs reference with corrected scaling: {phase_errs(got, fixed)}")
        print(f"  default mode vs reference as is (vb=4): {phase_errs(got, want[4])}")
        rms = ["%.3f" % rel_rms(g[-1], w[-1]) for g, w in zip(got["steps"], want[4]["steps"])]
        print(f"  ... as relative RMS of each phase's last latents: {rms}")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=report.__doc__.splitlines()[0])
    ap.add_argument("--height", type=int, default=3 * BASE)
    ap.add_argument("--width", type=int, default=3 * BASE)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    report(a.height, a.width, a.steps)
