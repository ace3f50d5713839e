"""SDXL's VAE (AutoencoderKL), its loader, and tiled decode/encode for large images."""

from .config import VAEConfig
from .loading import load_vae, save_vae
from .model import AutoencoderKL, DiagonalGaussian, FP16OverflowError
from .tiled import decode_tiled, decode_tiled_reference, encode_tiled, redundancy, tile_layout, tile_starts

__all__ = [
    "AutoencoderKL",
    "DiagonalGaussian",
    "FP16OverflowError",
    "VAEConfig",
    "decode_tiled",
    "decode_tiled_reference",
    "encode_tiled",
    "load_vae",
    "redundancy",
    "save_vae",
    "tile_layout",
    "tile_starts",
]
