"""Random-weight components built offline: the ``tiny`` preset, and real-shaped ones for benchmarks.

Everything about it is real code (UNet, VAE, text encoders, byte-level CLIP tokenizer, Euler
scheduler); only the weights are seeded noise, so its images are noise too.
"""

from __future__ import annotations

import contextlib

import torch

from .controlnet import ControlNet, ControlNetConfig
from .schedulers import SDXL_BASE_CONFIG, SDXL_TURBO_CONFIG, from_config
from .text import TextEncoders
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

# random_init_ lives below the component packages (text builds its presets with it); still
# importable from here.
from .weights.seeded import random_init_


def tiny_components(seed: int = 0, device="cpu", dtype=torch.float32):
    """(unet, vae, text, scheduler) of the ``tiny`` preset (UNet sample_size 32 → 256-px base)."""
    return random_components("tiny", seed, device, dtype)


def tiny_controlnet_config(unet_config):
    """The ``tiny`` ControlNet's config for a UNet of ``unet_config``: a small conditioning
    embedding (16, 32, 32, 32) instead of SDXL's (16, 32, 96, 256)."""
    return ControlNetConfig(unet_config, 3, (16, 32, 32, 32))


def tiny_controlnet(unet_config, seed: int = 1, device="cpu", dtype=torch.float32):
    """A ControlNet that fits a UNet of ``unet_config``, every weight seeded random — its zero
    projections too, so it acts — and a small conditioning embedding (16, 32, 32, 32) drawn at
    2/√fan_in so the control map shows. Untrained: for demos and tests, like ``tiny``."""
    net = random_init_(ControlNet(tiny_controlnet_config(unet_config)), seed)
    random_init_(net.controlnet_cond_embedding, seed + 1, scale=2.0)
    return net.to(device=device, dtype=dtype).eval().requires_grad_(False)


# kind -> (UNet preset, VAE preset, text preset)
_KINDS = {
    "tiny": ("tiny", "tiny", "tiny"),
    "sdxl-base": ("sdxl-base", "sdxl", "sdxl"),
    "sdxl-turbo": ("sdxl-turbo", "sdxl", "sdxl"),
}
PRESETS = tuple(_KINDS)  # the names --model takes without a path


def base_size(kind: str) -> int:
    """The native size in px of preset ``kind`` (its UNet's sample size × the VAE's scale factor):
    256 for ``tiny``, 1024 for ``sdxl-base``, 512 for ``sdxl-turbo``."""
    unet_name, vae_name, _ = _KINDS[kind]
    return UNetConfig.preset(unet_name).sample_size * VAEConfig.preset(vae_name).scale_factor


def random_components(kind: str = "tiny", seed: int = 0, device="cpu", dtype=torch.float32):
    """(unet, vae, text, scheduler) with seeded random weights in the shapes of ``kind``.

    ``tiny`` is the offline demo; ``sdxl-base`` / ``sdxl-turbo`` are the real networks (2.57 B
    UNet parameters) for benchmarks where only the shapes matter. Tokenizers are byte-level.
    ``device="meta"``: the networks without weights (no memory, no initialisation), e.g. to swap
    in fake tensors for a shape-only run (tests/pipeline/test_fake_cuda.py).
    """
    if kind not in _KINDS:
        raise ValueError(f"unknown random preset {kind!r}; choose one of {sorted(_KINDS)}")
    unet_name, vae_name, text_name = _KINDS[kind]

    def build(module, k):  # initialise in fp32 one module at a time, then cast and move
        return random_init_(module, seed + k).eval().requires_grad_(False).to(device, dtype)

    with torch.device("meta") if torch.device(device).type == "meta" else contextlib.nullcontext():
        unet = build(UNet(UNetConfig.preset(unet_name)), 0)
        vae = build(AutoencoderKL(VAEConfig.preset(vae_name)), 1)
        text = TextEncoders.preset(text_name, seed=seed + 2, dtype=dtype, device=device)
    return unet, vae, text, from_config(SDXL_TURBO_CONFIG if kind == "sdxl-turbo" else SDXL_BASE_CONFIG)
