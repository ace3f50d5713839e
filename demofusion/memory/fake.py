"""Our modules at real shapes on fake CUDA (built once), and the peak of one call of each."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..controlnet import ControlNet
from ..fp8 import to_fp8_
from ..text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, TextEncoders
from ..tensors import weight_bytes
from ..unet import UNet, UNetConfig
from ..vae import AutoencoderKL, VAEConfig
from .measure import fake_input, fake_mode, on_fake_cuda, track


def _key(config) -> object:
    """A hashable key for a preset name or a config dataclass (VAEConfig is not frozen)."""
    return config if isinstance(config, str) else (type(config).__name__, repr(config))


_BUILT: dict = {}


def _once(key, build):
    if key not in _BUILT:
        _BUILT[key] = build()
    return _BUILT[key]


def fake_unet(config="sdxl-base", dtype=torch.float16, fp8: bool = False):
    """Our UNet (a preset name or a UNetConfig), fake CUDA, built once per (config, dtype, fp8);
    ``fp8``: its Linear/Conv weights stored as float8_e4m3fn (:func:`demofusion.fp8.to_fp8_`)."""
    def build():
        with torch.device("meta"):
            unet = on_fake_cuda(UNet(UNetConfig.preset(config) if isinstance(config, str) else config), dtype)
        if fp8:
            with fake_mode():
                to_fp8_(unet)
        return unet

    return _once(("unet", _key(config), dtype, fp8), build)


def fake_controlnet(config, dtype=torch.float16):
    """Our ControlNet (a ControlNetConfig), fake CUDA, built once per (config, dtype)."""
    def build():
        with torch.device("meta"):
            return on_fake_cuda(ControlNet(config), dtype)

    return _once(("controlnet", _key(config), dtype), build)


def fake_vae(config="sdxl", dtype=torch.float16):
    """Our VAE (a preset name or a VAEConfig), fake CUDA, built once per (config, dtype)."""
    def build():
        with torch.device("meta"):
            return on_fake_cuda(AutoencoderKL(VAEConfig.preset(config) if isinstance(config, str) else config), dtype)

    return _once(("vae", _key(config), dtype), build)


def fake_text(dtype=torch.float16, configs=("clip-l", "bigg")):
    """Two text encoders (default SDXL's: CLIP ViT-L, OpenCLIP bigG; presets or CLIPTextConfigs)
    with byte-level tokenizers."""
    def build():
        with torch.device("meta"):
            enc = [on_fake_cuda(CLIPTextModel(CLIPTextConfig.preset(c) if isinstance(c, str) else c), dtype)
                   for c in configs]
        return TextEncoders(CLIPTokenizer.byte_level(), enc[0], CLIPTokenizer.byte_level(pad_token="!"), enc[1])

    return _once(("text", tuple(_key(c) for c in configs), dtype), build)


# ---- one call of each module ------------------------------------------------------------------
@dataclass(frozen=True)
class StagePeak:
    """A module call: its weights, and the peak above them (inputs, outputs, temporaries)."""

    weights_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.activation_bytes


def _peak(fn, *args, modules, flash=True) -> StagePeak:
    w = weight_bytes(*modules)
    _, tr = track(fn, *args, resident=modules, flash=flash)
    return StagePeak(w, tr.peak - w)


@functools.lru_cache(maxsize=None)
def unet_call_peak(config_or_kind="sdxl-base", dtype=torch.float16, latent=(128, 128), batch=2,
                   flash=True, fp8: bool = False) -> StagePeak:
    """One UNet forward on ``batch`` latents of ``latent`` (batch 2 = one view with CFG)."""
    unet = fake_unet(config_or_kind, dtype, fp8)
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    args = [fake_input(batch, *shape, dtype=dtype) for shape in
            ((c.in_channels, *latent), (77, c.cross_attention_dim), (pooled,), (6,))]
    return _peak(lambda x, *a: unet(x, 999.0, *a), *args, modules=(unet,), flash=flash)


@functools.lru_cache(maxsize=None)
def controlnet_call_peak(config, dtype=torch.float16, latent=(128, 128), batch=2) -> tuple[StagePeak, int]:
    """One ControlNet forward on ``batch`` latents of ``latent`` and their control images; and the
    bytes of its residuals (alive while the UNet call that adds them runs)."""
    net = fake_controlnet(config, dtype)
    c = config.unet
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    args = [fake_input(batch, *shape, dtype=dtype) for shape in
            ((c.in_channels, *latent), (77, c.cross_attention_dim), (pooled,), (6,),
             (config.conditioning_channels, 8 * latent[0], 8 * latent[1]))]
    w = weight_bytes(net)
    (down, mid), tr = track(lambda x, *a: net(x, 999.0, *a), *args, resident=(net,))
    return StagePeak(w, tr.peak - w), sum(t.untyped_storage().nbytes() for t in (*down, mid))


def vae_decode_tile_peak(tile_latent=(128, 128), dtype=torch.float16, batch=2, config="sdxl") -> StagePeak:
    """One ``vae.decode`` of ``batch`` tiles of ``tile_latent`` (decode_tiled's default: 2 tiles
    of ≤ 128² latents, i.e. 1024 px)."""
    vae = fake_vae(config, dtype)
    return _once(("decode", tuple(tile_latent), dtype, batch, _key(config)),
                 lambda: _peak(vae.decode, fake_input(batch, 4, *tile_latent, dtype=dtype), modules=(vae,)))


def vae_encode_tile_peak(tile_px=(1024, 1024), dtype=torch.float16, batch=2, config="sdxl") -> StagePeak:
    """One ``vae.encode`` of ``batch`` image tiles of ``tile_px`` (encode_tiled's default)."""
    vae = fake_vae(config, dtype)
    return _once(("encode", tuple(tile_px), dtype, batch, _key(config)), lambda: _peak(
        lambda x: vae.encode(x).mean, fake_input(batch, 3, *tile_px, dtype=dtype), modules=(vae,)))


@functools.lru_cache(maxsize=None)
def text_encode_peak(dtype=torch.float16, batch=1, cfg=True, configs=("clip-l", "bigg")) -> StagePeak:
    """``TextEncoders.encode_with_negative`` of ``batch`` prompts (zeros for the negative, SDXL's default)."""
    text = fake_text(dtype, configs)
    fn = lambda p: text.encode_with_negative(p, guidance=cfg)
    return _peak(fn, ["a prompt"] * batch, modules=(text.text_encoder, text.text_encoder_2))


