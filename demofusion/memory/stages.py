"""Every stage of a DemoFusion run — prompt encoding, the UNet calls and the decode of each phase —
with what is resident on the GPU meanwhile."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..images import tensor_to_unit
# the pipeline's algorithm, checks and view batching sit below the planner; its class above it
# (demofusion/pipeline/__init__.py)
from ..pipeline.algorithm import view_layout
from ..pipeline.guards import check_image
from ..pipeline.reference import policy_for
from ..pipeline.settings import validate
from ..tensors import weight_bytes
from ..unet import UNetConfig
from ..vae import decode_tiled, decode_tiled_reference
from .fake import fake_text, fake_unet, fake_vae, text_encode_peak, unet_call_peak
from .measure import _Enough, fake_input, measure, reserve, track

# Latent working set of an upscaling step besides the UNet call (fp32, counted, not measured):
# ~8 latents (z, z_up, ε_k, ẑ_t, padded/blurred copies, the merged predictions, the noise canvas)
# and ~4 copies of every view (model_in, its scaled chunk, ε, the gathered predictions).
LATENT_COPIES, VIEW_COPIES = 8, 4


# ---- whole runs: every stage of every phase ------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One stage of a run (phase 0: prompt encoding). weights: every module on the GPU meanwhile;
    activations: the measured peak above them; latents: the run's latent working set (counted)."""

    phase: int
    name: str  # "text", "unet", "decode"
    detail: str
    weights: int
    activations: int
    latents: int = 0
    batch: int = 0  # UNet stages: the UNet batch (views × prompts × 2 with CFG)
    gpu: bool = True  # False on the CPU: no CUDA context in the reserve

    @property
    def reserve(self) -> int:
        return reserve(self.activations, self.gpu)

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.latents + self.reserve


def view_paths(s, k: int, layout=None) -> list[tuple[str, int, tuple[int, int], int | None]]:
    """(paths, views, latent size, views per call or None: view_batch_size) of every stack of views
    phase ``k`` (0-based) denoises: the phase's view layout (``layout``: a pipeline's
    ``mechanisms.view_layout``, default :func:`~demofusion.pipeline.algorithm.view_layout`) batched
    as the run's policy batches it (:meth:`~demofusion.pipeline.reference.Policy.batches`: paths of
    one shape together, unless ``reference_compat``)."""
    paths = (layout or view_layout)(s, k)
    groups = policy_for(s.reference_compat).batches(paths, getattr(s, "control", None) is not None)
    return [("+".join(paths[n].path for n in members), sum(paths[n].count for n in members), paths[members[0]].shape,
             per) for members, per in groups]


def _step_chunks(s, k: int, layout=None) -> tuple[list, list]:
    """(paths, [(members, chunks)]) of a step of phase ``k``, cut as the denoiser cuts them
    (:meth:`~demofusion.pipeline.reference.Policy.step_chunks`: balanced, split for ``s.view_ranks``)."""
    paths = (layout or view_layout)(s, k)
    return paths, policy_for(s.reference_compat).step_chunks(paths, s.view_batch_size, getattr(s, "view_ranks", 1),
                                                             s.cfg, getattr(s, "control", None) is not None)


def unet_calls(s, k: int, layout=None) -> list[tuple[str, int, tuple[int, int]]]:
    """The largest UNet call of each stack: (paths, views of its largest chunk, latent size);
    the UNet batch is views × prompts × 2 with CFG (1 for :func:`lone_halves`)."""
    paths, stacks = _step_chunks(s, k, layout)
    return [("+".join(paths[n].path for n in members), max(c.views for c in cut), paths[members[0]].shape)
            for members, cut in stacks]


def lone_halves(s, k: int, layout=None) -> bool:
    """Every UNet call of phase ``k`` is one CFG half alone (a lone view on 2+ ranks): one row a view."""
    return all(c.half is not None for _, cut in _step_chunks(s, k, layout)[1] for c in cut)


class _FirstBatch:
    """A VAE whose decode ends the run (:class:`_Enough`) at its second call (every batch of tiles
    has the first one's shapes, the last may be smaller) and records the first call's shape."""

    def __init__(self, vae):
        self.vae, self.shape = vae, None

    def __getattr__(self, name):
        return getattr(self.vae, name)

    def decode(self, z):
        if self.shape is not None:
            raise _Enough
        self.shape = tuple(z.shape)
        return self.vae.decode(z)


def decode_peak(s, k: int, vae, tile: int | None = None, tile_batch: int = 2) -> tuple[int, str]:
    """(activation bytes, detail) of decoding phase ``k`` as the pipeline does (``_decode``: tiles
    of at most ``tile`` latents, default the VAE's native size, ``tile_batch`` at a time), and of
    turning the image into output (``check_image``, ``tensor_to_unit``: same-size temporaries)."""
    B, (h, w) = s.batch, (s.sizes[k][0] // 8, s.sizes[k][1] // 8)
    proxy, z = _FirstBatch(vae), fake_input(B, 4, h, w, dtype=torch.float32)
    if s.reference_compat and s.multi_decoder and k > 0:
        how, fn = "16×-redundant tiles", lambda z: decode_tiled_reference(proxy, z, sample_size=s.window)
    elif not s.reference_compat and s.multi_decoder and max(h, w) > (tile or vae.config.sample_size // vae.scale_factor):
        how, fn = "tiles", lambda z: decode_tiled(proxy, z, tile_size=tile, batch_size=tile_batch)
    else:
        how, fn = "whole", proxy.decode
    _, tr = track(fn, z, resident=(vae,))
    image = fake_input(B, 3, 8 * h, 8 * w, dtype=vae.dtype if how == "whole" else torch.float32)
    _, post = measure(lambda x: tensor_to_unit(check_image(x, k + 1, "")), image)
    n, _, th, tw = proxy.shape
    return max(tr.peak - weight_bytes(vae), post), f"{how}: {n} × {th}×{tw} latents, {str(vae.dtype)[6:]}"


def _latent_bytes(s, k: int, steps: int, stage: str, layout=None) -> int:
    """Latent working set of phase ``k`` besides the module call (fp32; the reference keeps all
    ``steps`` noised copies of the upsampled latent too, in fp16), and what earlier phases left on
    the device: their latents, and their images when ``output_type="pt"``."""
    h, w = s.sizes[k][0] // 8, s.sizes[k][1] // 8
    latent = s.batch * 4 * h * w * 4
    kept = sum(s.batch * 4 * (a // 8) * (b // 8) * 4 for a, b in s.sizes[:k])
    if getattr(s, "output_type", "pil") == "pt":
        kept += sum(s.batch * 3 * a * b * 4 for a, b in s.sizes[:k])
    noised = steps * latent // 2 if s.reference_compat and k >= s.first_upscale else 0
    if stage == "decode":
        return 2 * latent + noised + kept  # z and z / scaling_factor
    views = sum(n for _, n, _, _ in view_paths(s, k, layout)) if k >= s.first_upscale else 0
    return LATENT_COPIES * latent + VIEW_COPIES * views * s.batch * 4 * s.window**2 * 4 + noised + kept


def stage_table(height: int, width: int, view_batch_size: int = 16, cfg: bool = True, dtype=torch.float16, *,
                batch: int = 1, kind: str = "sdxl-base", reference: bool = False, vae_dtype=None,
                steps: int = 50) -> list[Stage]:
    """Every stage of a ``height × width`` run (prompt encoding; per phase its largest UNet calls
    and its decode), each with what is resident on the GPU meanwhile. Ours: the text encoders
    visit the GPU only to encode; the UNet and VAE stay (``vae_dtype``, default ``dtype``: float32
    for the released SDXL VAE, which overflows in fp16). ``reference``: the PRIS-CV pipeline as it
    runs: its phase sizes and path-by-path batches (``reference_compat``), text encoders resident
    throughout, its fp16 VAE upcast to fp32 to decode 16×-redundant tiles, all ``steps`` noised
    latents kept."""
    base = UNetConfig.preset(kind).sample_size * 8
    s = validate(base, prompt=["a prompt"] * batch, height=height, width=width, view_batch_size=view_batch_size,
                 guidance_scale=7.5 if cfg else 1.0, num_inference_steps=steps, reference_compat=reference)
    unet, vae, text = fake_unet(kind, dtype), fake_vae("sdxl", vae_dtype or dtype), fake_text(dtype)
    decoder = fake_vae("sdxl", torch.float32) if reference and dtype == torch.float16 else vae
    w_unet, w_text = weight_bytes(unet), weight_bytes(text.text_encoder, text.text_encoder_2)
    kept = w_text if reference else 0  # the reference never moves its text encoders off the GPU
    t = text_encode_peak(dtype, batch, s.cfg)
    stages = [Stage(0, "text", f"{batch} prompt(s)", w_unet + weight_bytes(vae) + w_text, t.activation_bytes)]
    for k in range(s.phases):
        rows = 2 if s.cfg and not lone_halves(s, k) else 1
        for paths, views, shape in unet_calls(s, k):
            p = unet_call_peak(kind, dtype, shape, views * batch * rows)
            stages.append(Stage(k + 1, "unet", f"{paths}: batch {views * batch * rows} × {shape[0]}×{shape[1]}",
                                w_unet + weight_bytes(vae) + kept, p.activation_bytes,
                                _latent_bytes(s, k, steps, "unet"), views * batch * rows))
        act, detail = decode_peak(s, k, decoder)
        stages.append(Stage(k + 1, "decode", detail, w_unet + weight_bytes(decoder) + kept, act,
                            _latent_bytes(s, k, steps, "decode")))
    return stages


def peak(stages: list[Stage]) -> Stage:  # the stage with the largest total
    return max(stages, key=lambda st: st.total)

