"""The VAE's part of a run: encoding the start image (img2img) and decoding each phase, whole or
in tiles (the memory plan's tile size and tiles per call; the reference's tiles under
``reference_compat``)."""

from __future__ import annotations

import torch

from .. import parallel
from ..images import image_to_tensor, tensor_to_pil, tensor_to_unit
from ..memory.plan import MemoryPlan
from ..vae import decode_tiled, decode_tiled_reference, encode_tiled
from .guards import check_image, likely_cause
from .settings import Settings


def to_pil(image: torch.Tensor):
    """[B,3,H,W] in [-1,1] → PIL images (uint8, rounded)."""
    return tensor_to_pil(image)


def from_pil(image, size: tuple[int, int]) -> torch.Tensor:
    """PIL image, image file or tensor ([B,3,H,W] / [3,H,W] in [-1,1]) → [B,3,h,w] in [-1,1] at ``size``."""
    return image_to_tensor(image, size)


def tile_latents(vae, plan: MemoryPlan) -> int:
    """VAE tile side in latents: the plan's, else the VAE's native size (128 for SDXL)."""
    return plan.decode_tile or vae.config.sample_size // vae.scale_factor


def encode_image(vae, x, plan: MemoryPlan, s: Settings):
    """The posterior of image ``x`` ([B,3,H,W] in [-1, 1]), in tiles when larger than one (shared
    by the ranks of a process group, as the denoising is)."""
    if max(x.shape[-2:]) > 8 * tile_latents(vae, plan):
        return encode_tiled(vae, x.to(vae.dtype), tile_size=plan.decode_tile, batch_size=plan.decode_batch,
                            runner=parallel.runner(s.distributed))
    return vae.encode(x.to(vae.dtype))


def decode_latents(vae, z, phase_index: int, s: Settings, plan: MemoryPlan):
    """Unscaled latents of phase ``phase_index`` (0-based) → image in [-1, 1]."""
    if s.reference_compat:
        if s.multi_decoder and phase_index > 0:
            return decode_tiled_reference(vae, z, sample_size=s.window)
        return vae.decode(z)
    if s.multi_decoder and max(z.shape[-2:]) > tile_latents(vae, plan):
        return decode_tiled(vae, z, tile_size=plan.decode_tile, batch_size=plan.decode_batch,
                            runner=parallel.runner(s.distributed))
    return vae.decode(z)


def as_output(x: torch.Tensor, s: Settings, k: int):
    """A decoded phase-``k+1`` image [B,3,H,W] in [-1, 1] as ``output_type`` asks (PIL images or a
    tensor in [0, 1]); writes ``preview_dir/phase_<k+1>.png`` when asked."""
    if s.output_type == "pt":
        return tensor_to_unit(x)
    img = to_pil(x)
    if s.preview_dir is not None:
        s.preview_dir.mkdir(parents=True, exist_ok=True)
        img[0].save(s.preview_dir / f"phase_{k + 1}.png")
    return img[0] if len(img) == 1 else img


def phase_output(vae, z: torch.Tensor, k: int, s: Settings, plan: MemoryPlan):
    """Phase k+1's latents decoded (the plan's tiles), checked finite, as ``output_type`` asks."""
    x = decode_latents(vae, z / vae.scaling_factor, k, s, plan)
    return as_output(check_image(x, k + 1, likely_cause(vae.dtype)), s, k)
