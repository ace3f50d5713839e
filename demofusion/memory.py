"""Peak GPU memory of every stage of a DemoFusion run, measured on our own modules, without a GPU.

The real UNet, VAE and text encoders are built at SDXL shapes with *fake* CUDA tensors
(``FakeTensorMode``: shapes, dtypes, strides, no data, no arithmetic); the real code runs on them
while a :class:`Tracker` sums the bytes of the live CUDA storages and keeps the maximum. Host work
on ordinary CPU tensors (tile weights, tokenisation) runs for real. Two fixes make fake CUDA act
like real CUDA: attention is routed to the flash / memory-efficient kernels CUDA picks in
fp16/bf16 (:class:`SDPARouter`; the math path fake mode would take materialises the L×L matrix:
2.6 GiB for one 4096-token SDXL call), and a bool read such as ``isfinite(x).all()`` answers True
(the healthy path). What fake tensors cannot see (CUDA context, workspaces, allocator slack) is a
stated :func:`reserve`.

Entry points: :func:`measure`, :func:`unet_call_peak`, :func:`vae_decode_tile_peak`,
:func:`vae_encode_tile_peak`, :func:`text_encode_peak`, :func:`stage_table`.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GiB, MiB = 2**30, 2**20

# ---- what the tracker cannot see: ASSUMPTIONS, not yet measured on a GPU ------------------------
# CUDA context + kernel images of torch/cuBLAS/cuDNN, outside PyTorch's allocator: commonly
# 0.3–0.6 GiB with lazy module loading (nvidia-smi minus memory_reserved); the upper end is taken.
CUDA_CONTEXT = GiB // 2
# cuBLAS/cuBLASLt workspaces per handle and stream (CUBLAS_WORKSPACE_CONFIG: a few MiB to 32 MiB
# by default) plus cuDNN convolution workspace, which cuDNN sizes to what is free: 64 + 256 MiB.
WORKSPACES = 64 * MiB + 256 * MiB
# Allocator slack (blocks rounded up, freed blocks not reusable): memory_reserved commonly runs
# 5–15 % above max_memory_allocated; 10 % of the activations is taken.
FRAGMENTATION = 0.10
# Latent working set of an upscaling step besides the UNet call (fp32, counted, not measured):
# ~8 latents (z, z_up, ε, ẑ_t, padded/blurred copies, the merged paths) and ~4 copies of every
# view (to_step, model_in, noise, stepped).
LATENT_COPIES, VIEW_COPIES = 8, 4


def reserve(activation_bytes: int) -> int:
    """Bytes a real GPU needs beyond what the tracker counts, for a stage of these activations."""
    return CUDA_CONTEXT + WORKSPACES + int(FRAGMENTATION * activation_bytes)


# ---- the tracker -----------------------------------------------------------------------------
class Tracker(TorchDispatchMode):
    """Sums the bytes of live CUDA storages (``now``) and keeps the maximum (``peak``). Each op
    output's storage counts once until it dies (``weakref.finalize``); tensors alive before the run
    are :meth:`add`-ed by hand (they outlive it). Ops on real CPU tensors only run for real."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def add(self, t: torch.Tensor, finalize: bool = False) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type != "cuda":
            return
        st = t.untyped_storage()
        if id(st) in self.live:
            return
        self.live[id(st)] = st.nbytes()
        self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        if finalize:
            weakref.finalize(st, self._free, id(st))

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func is torch.ops.aten._local_scalar_dense.default and leaves[0].dtype == torch.bool:
            return True  # a check such as isfinite(x).all(): the healthy path
        device = kwargs.get("device")
        if all(not isinstance(t, FakeTensor) and t.device.type == "cpu" for t in leaves) and \
                (device is None or torch.device(device).type == "cpu"):
            with unset_fake_temporarily():  # host work on real tensors: run it for real
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            self.add(t, finalize=True)
        return out


class SDPARouter(TorchFunctionMode):
    """Sends ``F.scaled_dot_product_attention`` ([B, heads, L, D]) to the kernel CUDA picks: flash
    for fp16/bf16 without mask and head dim ≤ 256; memory-efficient for other head dims that are
    multiples of 8 (the VAE's 512, fp32); anything else (masks: none of ours) unchanged."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            return _sdpa(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


def _sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **rest):
    d, aten = q.shape[-1], torch.ops.aten
    if attn_mask is None and q.dtype in (torch.float16, torch.bfloat16) and d <= 256 and d % 8 == 0:
        return aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
    if attn_mask is None and d % 8 == 0:
        return aten._scaled_dot_product_efficient_attention(q, k, v, None, False, dropout_p, is_causal, scale=scale)[0]
    return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale, **rest)


@functools.lru_cache(maxsize=1)
def fake_mode():
    """The one fake mode every module and input here lives in (fake tensors of two modes don't mix)."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def _resident(objs) -> list[torch.Tensor]:
    """Tensors in ``objs``: tensors, modules' parameters and buffers, lists/tuples of them."""
    out = []
    for o in objs:
        if isinstance(o, torch.nn.Module):
            out += [*o.parameters(), *o.buffers()]
        elif isinstance(o, (list, tuple)):
            out += _resident(o)
        elif isinstance(o, torch.Tensor):
            out.append(o)
    return out


class _Enough(Exception):
    """Ends a tiled run after its first batch of tiles (:class:`_FirstBatch`)."""


def track(fn, *args, resident=(), flash: bool = True) -> tuple[object, Tracker]:
    """Run ``fn(*args)`` under a tracker in the fake mode; return (result, tracker). CUDA tensors in
    ``args``, in ``resident`` and the module ``fn`` is bound to are alive from the start (the
    baseline). ``flash``: route attention as CUDA does (False: the math path)."""
    tr, result, owner = Tracker(), None, getattr(fn, "__self__", None)
    for t in _resident([*args, *resident, *([owner] if isinstance(owner, torch.nn.Module) else [])]):
        tr.add(t)
    with fake_mode(), torch.no_grad(), tr, (SDPARouter() if flash else contextlib.nullcontext()), \
            contextlib.suppress(_Enough):
        result = fn(*args)
    return result, tr


def measure(fn, *args, resident=(), flash: bool = True) -> tuple[object, int]:
    """``(fn(*args), peak bytes)``: the peak counts what was resident at the start (see :func:`track`)."""
    result, tr = track(fn, *args, resident=resident, flash=flash)
    return result, tr.peak


# ---- modules at real shapes, fake CUDA, built once ----------------------------------------------
def on_fake_cuda(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A module built on ``meta`` given fake CUDA parameters and buffers (floats in ``dtype``), in
    place (``module.to()`` cannot swap fake parameters; reassigning ``_parameters`` can)."""
    like = lambda t: fake_input(*t.shape, dtype=dtype if t.is_floating_point() else t.dtype)
    for m in module.modules():
        m._parameters.update({n: torch.nn.Parameter(like(p), requires_grad=False)
                              for n, p in m._parameters.items() if p is not None})
        m._buffers.update({n: like(b) for n, b in m._buffers.items() if b is not None})
    return module.eval()


def fake_input(*shape, dtype=torch.float16) -> torch.Tensor:
    with fake_mode():
        return torch.empty(shape, dtype=dtype, device="cuda")


def weight_bytes(*modules) -> int:
    return sum(t.untyped_storage().nbytes() for t in _resident(modules))


@functools.lru_cache(maxsize=None)
def fake_unet(config="sdxl-base", dtype=torch.float16):
    """Our UNet (a preset name or a UNetConfig), fake CUDA, built once per (config, dtype)."""
    from .unet import UNet, UNetConfig

    with torch.device("meta"):
        return on_fake_cuda(UNet(UNetConfig.preset(config) if isinstance(config, str) else config), dtype)


@functools.lru_cache(maxsize=None)
def fake_vae(preset="sdxl", dtype=torch.float16):
    from .vae import AutoencoderKL, VAEConfig

    with torch.device("meta"):
        return on_fake_cuda(AutoencoderKL(VAEConfig.preset(preset)), dtype)


@functools.lru_cache(maxsize=None)
def fake_text(dtype=torch.float16):
    """SDXL's two text encoders (CLIP ViT-L, OpenCLIP bigG) with byte-level tokenizers."""
    from .text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, TextEncoders

    with torch.device("meta"):
        enc = [on_fake_cuda(CLIPTextModel(CLIPTextConfig.preset(n)), dtype) for n in ("clip-l", "bigg")]
    return TextEncoders(CLIPTokenizer.byte_level(), enc[0], CLIPTokenizer.byte_level(pad_token="!"), enc[1])


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
                   flash=True) -> StagePeak:
    """One UNet forward on ``batch`` latents of ``latent`` (batch 2 = one view with CFG)."""
    unet = fake_unet(config_or_kind, dtype)
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    args = [fake_input(batch, *shape, dtype=dtype) for shape in
            ((c.in_channels, *latent), (77, c.cross_attention_dim), (pooled,), (6,))]
    return _peak(lambda x, *a: unet(x, 999.0, *a), *args, modules=(unet,), flash=flash)


@functools.lru_cache(maxsize=None)
def vae_decode_tile_peak(tile_latent=(128, 128), dtype=torch.float16, batch=2) -> StagePeak:
    """One ``vae.decode`` of ``batch`` tiles of ``tile_latent`` (decode_tiled's default: 2 tiles
    of ≤ 128² latents, i.e. 1024 px)."""
    vae = fake_vae("sdxl", dtype)
    return _peak(vae.decode, fake_input(batch, 4, *tile_latent, dtype=dtype), modules=(vae,))


@functools.lru_cache(maxsize=None)
def vae_encode_tile_peak(tile_px=(1024, 1024), dtype=torch.float16, batch=2) -> StagePeak:
    """One ``vae.encode`` of ``batch`` image tiles of ``tile_px`` (encode_tiled's default)."""
    vae = fake_vae("sdxl", dtype)
    return _peak(lambda x: vae.encode(x).mean, fake_input(batch, 3, *tile_px, dtype=dtype), modules=(vae,))


@functools.lru_cache(maxsize=None)
def text_encode_peak(dtype=torch.float16, batch=1, cfg=True) -> StagePeak:
    """``TextEncoders.encode_with_negative`` of ``batch`` prompts (zeros for the negative, SDXL's default)."""
    text = fake_text(dtype)
    fn = lambda p: text.encode_with_negative(p, guidance=cfg)
    return _peak(fn, ["a prompt"] * batch, modules=(text.text_encoder, text.text_encoder_2))


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

    @property
    def reserve(self) -> int:
        return reserve(self.activations)

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.latents + self.reserve


def view_paths(s, k: int) -> list[tuple[str, int, tuple[int, int]]]:
    """(paths, views, latent size) of every stack of views phase ``k`` (0-based) denoises, as
    :class:`~demofusion.pipeline.denoise.Denoiser` stacks them (local and global together when
    their shapes agree, unless ``reference_compat``)."""
    from .ops import view_starts

    h, w = s.sizes[k][0] // 8, s.sizes[k][1] // 8
    if k < s.first_upscale:
        return [("whole", 1, (h, w))]
    paths = []
    if s.local_paths:
        win = (min(s.window, h), min(s.window, w))
        n = len(view_starts(h, win[0], s.stride)) * len(view_starts(w, win[1], s.stride))
        paths.append(("local", n, win))
    if s.dilated_sampling:
        d = k + 1  # phase k+1 dilates by k+1: (k+1)² sub-latents, zero-padded to a multiple
        paths.append(("global", d * d, (-(-h // d), -(-w // d))))
    if not s.reference_compat and len({shape for *_, shape in paths}) == 1:
        paths = [("+".join(p for p, *_ in paths), sum(n for _, n, _ in paths), paths[0][2])]
    return paths


def unet_calls(s, k: int) -> list[tuple[str, int, tuple[int, int]]]:
    """The largest UNet call of each stack: (paths, views ≤ view_batch_size, latent size);
    the UNet batch is views × prompts × 2 with CFG."""
    return [(p, min(n, s.view_batch_size), shape) for p, n, shape in view_paths(s, k)]


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


def decode_peak(s, k: int, vae) -> tuple[int, str]:
    """(activation bytes, detail) of decoding phase ``k`` as the pipeline does (``_decode``), and of
    turning the image into output (``check_image``, ``tensor_to_unit``: same-size temporaries)."""
    from .images import tensor_to_unit
    from .pipeline.guards import check_image
    from .vae import decode_tiled, decode_tiled_reference

    B, (h, w) = s.batch, (s.sizes[k][0] // 8, s.sizes[k][1] // 8)
    proxy, z = _FirstBatch(vae), fake_input(B, 4, h, w, dtype=torch.float32)
    if s.reference_compat and s.multi_decoder and k > 0:
        how, fn = "16×-redundant tiles", lambda z: decode_tiled_reference(proxy, z, sample_size=s.window)
    elif not s.reference_compat and s.multi_decoder and max(h, w) * 8 > vae.config.sample_size:
        how, fn = "tiles", lambda z: decode_tiled(proxy, z)
    else:
        how, fn = "whole", proxy.decode
    _, tr = track(fn, z, resident=(vae,))
    image = fake_input(B, 3, 8 * h, 8 * w, dtype=vae.dtype if how == "whole" else torch.float32)
    _, post = measure(lambda x: tensor_to_unit(check_image(x, k + 1, "")), image)
    n, _, th, tw = proxy.shape
    return max(tr.peak - weight_bytes(vae), post), f"{how}: {n} × {th}×{tw} latents, {str(vae.dtype)[6:]}"


def _latent_bytes(s, k: int, steps: int, stage: str) -> int:
    """Latent working set of phase ``k`` besides the module call (fp32; the reference keeps all
    ``steps`` noised copies of the upsampled latent too, in fp16)."""
    h, w = s.sizes[k][0] // 8, s.sizes[k][1] // 8
    latent = s.batch * 4 * h * w * 4
    noised = steps * latent // 2 if s.reference_compat and k >= s.first_upscale else 0
    if stage == "decode":
        return 2 * latent + noised  # z and z / scaling_factor
    views = sum(n for _, n, _ in view_paths(s, k)) if k >= s.first_upscale else 0
    return LATENT_COPIES * latent + VIEW_COPIES * views * s.batch * 4 * s.window**2 * 4 + noised


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
    from .pipeline.settings import validate
    from .unet import UNetConfig

    base = UNetConfig.preset(kind).sample_size * 8
    s = validate(base, prompt=["a prompt"] * batch, height=height, width=width, view_batch_size=view_batch_size,
                 guidance_scale=7.5 if cfg else 1.0, num_inference_steps=steps, reference_compat=reference)
    rows = 2 if s.cfg else 1
    unet, vae, text = fake_unet(kind, dtype), fake_vae("sdxl", vae_dtype or dtype), fake_text(dtype)
    decoder = fake_vae("sdxl", torch.float32) if reference and dtype == torch.float16 else vae
    w_unet, w_text = weight_bytes(unet), weight_bytes(text.text_encoder, text.text_encoder_2)
    kept = w_text if reference else 0  # the reference never moves its text encoders off the GPU
    t = text_encode_peak(dtype, batch, s.cfg)
    stages = [Stage(0, "text", f"{batch} prompt(s)", w_unet + weight_bytes(vae) + w_text, t.activation_bytes)]
    for k in range(s.phases):
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

