"""Memory plans: from a budget and the model, what is on the device when (the offload policy), the
UNet batch (views per call, CFG halves together or apart) and the VAE tiles, so that the estimated
peak of every stage of the run fits the budget (:func:`plan`).

The plan picks the first of these that fits, cheapest in time first:
  1. offload "none", then "model", with ``view_batch_size`` 16, 8, 4 (each batch still fills a GPU);
  2. the same with 2, then 1 view per call, then 1 view with the CFG halves in two calls;
  3. offload "sequential" (the UNet's weights stream through the device every call) with 16 … 1;
  the VAE decoding one native-size tile per call; only if none of that fits, smaller VAE tiles.
Placement never changes a value. A smaller batch computes the same sums in other kernels: equal
to float rounding (≤ 1e-5 relative, measured), bit for bit only where the kernels ignore the batch
(not promised by cuBLAS or oneDNN); so a ``view_batch_size`` given by the caller is kept as it is.
Smaller VAE tiles move the cross-fades: the latents are the same, the image differs slightly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..config import UNITS, parse_budget  # noqa: F401  (re-exported: parse_budget lives in config)
from ..errors import InputError
from ..fp8 import is_fp8
from ..parallel import min_over_ranks
from ..placement import POLICIES, stream_units
from ..tensors import weight_bytes
from .fake import (_once, controlnet_call_peak, fake_text, fake_unet, fake_vae, text_encode_peak, unet_call_peak,
                   vae_encode_tile_peak)
from .measure import GiB
from .stages import Stage, _latent_bytes, decode_peak, lone_halves, unet_calls

DEFAULT_VIEW_BATCH = 16
SMALLER_TILES = (96, 64, 48, 32)  # latents: only when nothing else fits


def fmt(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class Model:
    """What a plan needs to know of a pipeline: its configs, dtypes and weight bytes."""

    unet_config: object
    unet_dtype: torch.dtype
    fp8: bool
    vae_config: object
    decode_dtype: torch.dtype  # float32 when an fp16 VAE that overflows would be upcast
    text_configs: tuple
    text_dtype: torch.dtype
    unet_bytes: int
    vae_bytes: int
    text_bytes: int
    unit_bytes: int  # offload "sequential": the largest unit, plus the next largest on CUDA (prefetched)
    control_configs: tuple = ()  # the ControlNets' configs (they work, and stream, with the UNet)
    control_bytes: int = 0
    view_layout: object = None  # the pipeline's mechanisms.view_layout (None: the default layout)

    @classmethod
    def of(cls, pipe) -> "Model":
        vae, text = pipe.vae, pipe.text
        upcasts = vae.dtype == torch.float16 and vae.on_fp16_overflow == "upcast" and vae.config.force_upcast
        vae_bytes = weight_bytes(vae) * (2 if upcasts else 1)
        encoders, nets = (text.text_encoder, text.text_encoder_2), getattr(pipe, "controlnets", [])
        units = sorted((weight_bytes(u) for m in (pipe.unet, *nets) for u in stream_units(m)), reverse=True)
        ahead = getattr(getattr(pipe, "device", None), "type", "cuda") == "cuda"  # presets: planned for CUDA
        return cls(pipe.unet.config, pipe.unet.dtype, is_fp8(pipe.unet), vae.config,
                   torch.float32 if upcasts else vae.dtype, tuple(e.config for e in encoders), text.dtype,
                   weight_bytes(pipe.unet), vae_bytes, weight_bytes(*encoders), sum(units[:2 if ahead else 1]),
                   tuple(n.controlnet_config for n in nets), weight_bytes(*nets) if nets else 0,
                   getattr(getattr(pipe, "mechanisms", None), "view_layout", None))


def preset_model(kind: str = "sdxl-base", dtype=torch.float16, fp8: bool = False, vae_dtype=None) -> Model:
    """The :class:`Model` of a preset at real shapes (fake CUDA modules: nothing is allocated)."""
    from types import SimpleNamespace

    return Model.of(SimpleNamespace(unet=fake_unet(kind, dtype, fp8), vae=fake_vae("sdxl", vae_dtype or dtype),
                                    text=fake_text(dtype)))


@dataclass(frozen=True)
class Choice:
    offload: str = "none"
    view_batch_size: int = DEFAULT_VIEW_BATCH
    cfg_apart: bool = False  # the unconditional and conditional halves in two UNet calls
    decode_tile: int | None = None  # latents; None: the VAE's native size
    decode_batch: int = 1  # tiles per VAE call (2 saves little time and doubles the decode's peak)


@dataclass(frozen=True)
class MemoryPlan:
    """A run's placement and batches, with the estimated peak of every stage (reserve included)."""

    budget: int | None
    choice: Choice
    stages: tuple = ()
    exact: bool = True  # the latents equal the unbudgeted run's bit for bit (batches unchanged)

    def __getattr__(self, name):  # offload, view_batch_size, cfg_apart, decode_tile, decode_batch
        if name in {f.name for f in dataclasses.fields(Choice)}:
            return getattr(self.choice, name)
        raise AttributeError(name)

    @property
    def peak_bytes(self) -> int:
        """Estimated peak of the whole run: its largest stage, reserve included."""
        return max((st.total for st in self.stages), default=0)

    def phase_peaks(self) -> dict[int, int]:
        """Estimated peak per phase (0: prompt encoding)."""
        out: dict[int, int] = {}
        for st in self.stages:
            out[st.phase] = max(out.get(st.phase, 0), st.total)
        return out

    def describe(self) -> str:
        c = self.choice
        head = (f"memory plan: offload={c.offload}, view_batch_size={c.view_batch_size}"
                f"{', CFG halves apart' if c.cfg_apart else ''}, VAE tiles {c.decode_tile or 'native'}"
                f" × {c.decode_batch} per call; estimated peak {fmt(self.peak_bytes)}"
                + (f" of {fmt(self.budget)}" if self.budget else "")
                + ("" if self.exact else "; fewer views per call than without a budget: latents equal to float rounding"))
        rows = [f"  phase {st.phase} {st.name:<6} {fmt(st.total):>10}  (weights {fmt(st.weights)}, "
                f"activations {fmt(st.activations)}, latents {fmt(st.latents)}, reserve {fmt(st.reserve)}) "
                f"{st.detail}" for st in self.stages]
        return "\n".join([head, *rows])


# ---- the stages of a run under a choice -------------------------------------------------------
def _weights(m: Model, policy: str, stage: str, offload_text: bool) -> int:
    unet = m.unet_bytes + m.control_bytes  # the ControlNets come and go with the UNet
    if policy == "none":
        return unet + m.vae_bytes + (m.text_bytes if stage == "text" or not offload_text else 0)
    if stage == "unet":
        return m.unit_bytes if policy == "sequential" else unet
    return m.text_bytes if stage == "text" else m.vae_bytes


def text_stages(m: Model, s, policy: str) -> list[Stage]:
    act = text_encode_peak(m.text_dtype, s.batch, s.cfg, m.text_configs).activation_bytes
    return [Stage(0, "text", f"{s.batch} prompt(s)", _weights(m, policy, "text", s.offload_text_encoders), act)]


def unet_stages(m: Model, s, c: Choice) -> list[Stage]:
    s = dataclasses.replace(s, view_batch_size=c.view_batch_size)
    out = []
    for k in range(len(s.resume_latents), s.phases):
        rows = 1 if c.cfg_apart or not s.cfg or lone_halves(s, k, m.view_layout) else 2
        for paths, views, shape in unet_calls(s, k, m.view_layout):
            b = views * s.batch * rows
            act = unet_call_peak(m.unet_config, m.unet_dtype, tuple(shape), b, fp8=m.fp8).activation_bytes
            act, images = _with_controlnets(m, s, k, act, tuple(shape), b, rows)
            out.append(Stage(k + 1, "unet", f"{paths}: batch {b} × {shape[0]}×{shape[1]}",
                             _weights(m, c.offload, "unet", s.offload_text_encoders), act,
                             _latent_bytes(s, k, _steps_run(s, k), "unet", m.view_layout) + images, b))
    return out


def _steps_run(s, k: int) -> int:
    """The steps phase ``k`` runs (steps_per_phase, upscale_strength): each keeps a noised copy in
    reference mode."""
    n, first = s.phase_steps(k)
    return n - first


def _with_controlnets(m: Model, s, k: int, unet_act: int, shape: tuple, b: int, rows: int) -> tuple[int, int]:
    """(activations, control image bytes) of a UNet call of batch ``b`` (``rows`` per view: 2 with
    CFG in one call) with the run's ControlNets. The call's control crops live through it; each
    ControlNet's call also holds their CFG-doubled copy and the residuals summed so far, the UNet's
    call the summed residuals. Between calls the phase keeps one fp32 control image per ControlNet
    (the padded copies the crops are cut from come and go with the cut, before either peak)."""
    if not m.control_configs or s.control is None:
        return unet_act, 0
    peaks = [controlnet_call_peak(cfg, m.unet_dtype, shape, b) for cfg in m.control_configs]
    res, n = max(r for _, r in peaks), len(peaks)
    crops = n * (b // rows) * 3 * 64 * shape[0] * shape[1] * torch.finfo(m.unet_dtype).bits // 8
    doubled = crops * (rows - 1)  # Guide.residuals: repeat_interleave(2) for CFG pairs
    controlnet = crops + doubled + max(p.activation_bytes for p, _ in peaks) + (res if n > 1 else 0)
    act = max(controlnet, crops + unet_act + res)
    return act, n * s.batch * 3 * s.sizes[k][0] * s.sizes[k][1] * 4


def vae_stages(m: Model, s, c: Choice) -> list[Stage]:
    """Encoding the start image (img2img) and decoding every phase (unless latent output)."""
    w, out = _weights(m, c.offload, "vae", s.offload_text_encoders), []
    vae = fake_vae(m.vae_config, m.decode_dtype)
    if s.image is not None:
        tile = 8 * (c.decode_tile or m.vae_config.sample_size // vae.scale_factor)
        px = (min(tile, s.sizes[0][0]), min(tile, s.sizes[0][1]))
        act = vae_encode_tile_peak(px, m.decode_dtype, c.decode_batch * s.batch, m.vae_config).activation_bytes
        out.append(Stage(1, "encode", f"tiles of {px[0]}×{px[1]} px", w, act))
    if s.output_type == "latent":
        return out
    for k in range(len(s.resume_latents), s.phases):
        key = ("decode run", repr(m.vae_config), m.decode_dtype, s.batch, s.sizes[k], s.multi_decoder,
               s.reference_compat, k == 0, c.decode_tile, c.decode_batch)
        act, detail = _once(key, lambda: decode_peak(s, k, vae, c.decode_tile, c.decode_batch))
        out.append(Stage(k + 1, "decode", detail, w, act, _latent_bytes(s, k, _steps_run(s, k), "decode")))
    return out


def estimate(m: Model, s, c: Choice, gpu: bool = True) -> list[Stage]:
    """Every stage of run ``s`` under choice ``c``, in run order (``gpu`` False: a CPU run's reserve)."""
    stages = _on(text_stages(m, s, c.offload) + unet_stages(m, s, c) + vae_stages(m, s, c), gpu)
    return sorted(stages, key=lambda st: (st.phase, st.name != "text", st.name == "decode"))


def _on(stages: list[Stage], gpu: bool) -> list[Stage]:
    """The stages as the device has them: a CPU run's reserve has no CUDA context and workspaces."""
    return stages if gpu else [dataclasses.replace(st, gpu=False) for st in stages]


# ---- choosing ---------------------------------------------------------------------------------
def _batches(s, auto: bool) -> tuple[list, list]:
    """(fast, slow) UNet batch options: (views per call, CFG apart)."""
    if not auto:
        return [(s.view_batch_size, False)], []
    sizes = [v for v in (16, 8, 4, 2, 1) if v <= DEFAULT_VIEW_BATCH]
    fast = [(v, False) for v in sizes if v >= 4]
    return fast, [(v, False) for v in sizes if v < 4] + ([(1, True)] if s.cfg else [])


def _decodes(m: Model, s, shrink: bool) -> list[tuple]:
    out = [(None, 1)]
    native = m.vae_config.sample_size // 8
    if shrink and s.multi_decoder and not s.reference_compat:
        out += [(t, 1) for t in SMALLER_TILES if t < native]
    return out


def plan(m: Model, s, budget: int | None = None, offload: str | None = None, auto_batch: bool = False,
         estimate_stages: bool = True, gpu: bool = True) -> MemoryPlan:
    """The cheapest choice whose every stage fits ``budget`` (bytes; None: no budget, the caller's
    choice as it is). ``offload`` restricts the policy; ``auto_batch``: the view batch is ours to
    choose (the caller gave none). A budget nothing fits is a one-line :class:`InputError` naming
    the smallest budget that works and the ways below it (a :class:`BudgetError`). ``gpu`` False:
    a CPU run (no CUDA context in the reserve)."""
    vbs = s.view_batch_size or DEFAULT_VIEW_BATCH
    s = dataclasses.replace(s, view_batch_size=vbs)
    if budget is None:
        c = Choice(offload or "none", vbs)
        return MemoryPlan(None, c, tuple(estimate(m, s, c, gpu)) if estimate_stages else ())
    policies = [offload] if offload else list(POLICIES)
    fast, slow = _batches(s, auto_batch)
    quick = [p for p in policies if p != "sequential"]
    order = [(p, b) for p in quick for b in fast] + [(p, b) for p in quick for b in slow] + \
            [(p, b) for p in policies if p == "sequential" for b in fast + slow]
    fits = lambda stages: all(st.total <= budget for st in _on(stages, gpu))
    for shrink in (False, True):
        for policy, (v, apart) in order:
            c = Choice(policy, v, apart)
            if not (fits(text_stages(m, s, policy)) and fits(unet_stages(m, s, c))):
                continue
            for tile, tb in _decodes(m, s, shrink):
                c = dataclasses.replace(c, decode_tile=tile, decode_batch=tb)
                if fits(vae_stages(m, s, c)):
                    return MemoryPlan(budget, c, tuple(estimate(m, s, c, gpu)), exact=v == vbs and not apart)
    _too_small(m, s, budget, policies[-1], (fast + slow)[-1], _decodes(m, s, True)[-1], gpu)


class BudgetError(InputError):
    """A ``max_memory`` nothing fits. Its fields let a front end word the advice in its own terms
    (the command line's flags): ``ways`` holds keys of :data:`WAYS`."""

    def __init__(self, budget: int, need: int, policy: str, view_batch: int, worst, ways: list[str]):
        self.budget, self.need, self.policy, self.view_batch, self.worst, self.ways = \
            budget, need, policy, view_batch, worst, ways
        super().__init__(f"max_memory={fmt(budget)} is too small for this run: it needs at least {fmt(need)} "
                         f"(offload={policy}, view_batch_size={view_batch}, at phase {worst.phase} {worst.name}); "
                         f"below that: {', '.join(WAYS[w] for w in ways)}")


WAYS = {"latent": "output_type='latent' (decode later)", "fp8": "fp8 UNet weights (fp8=True)",
        "size": "a smaller height/width", "prompts": "fewer prompts per call", "cpu": "or device='cpu'"}


def _too_small(m: Model, s, budget: int, policy: str, batch: tuple, decode: tuple, gpu: bool = True):
    c = Choice(policy, *batch, *decode)
    stages = estimate(m, s, c, gpu)
    worst = max(stages, key=lambda st: st.total)
    ways = ["size"]
    if worst.name == "unet" and not m.fp8:
        ways.insert(0, "fp8")
    if s.batch > 1:
        ways.append("prompts")
    if worst.name == "decode":
        ways.insert(0, "latent")
    raise BudgetError(budget, worst.total, policy, batch[0], worst, ways + (["cpu"] if gpu else []))


def budget_of(pipe, max_memory) -> int | None:
    """``max_memory`` in bytes; ``"auto"``: on CUDA the device's free memory plus what this
    process's allocator already holds (its own weights among it); elsewhere no budget."""
    if max_memory != "auto":
        return max_memory
    dev = pipe.device
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(dev)
    return free + torch.cuda.memory_reserved(dev)


def plan_run(pipe, s, estimate_stages: bool = True, model: Model | None = None) -> MemoryPlan:
    """The plan of run ``s`` (validated settings) on ``pipe`` (``model``: its description, if
    ``pipe`` only names the device): its budget, offload and batch."""
    budget = budget_of(pipe, s.max_memory)
    if s.max_memory == "auto" and s.distributed:  # each GPU's free memory differs: plan for the smallest
        budget = min_over_ranks(budget)
    if budget is None and not estimate_stages:  # nothing to measure: the caller's choice as it is
        return MemoryPlan(None, Choice(s.offload or "none", s.view_batch_size or DEFAULT_VIEW_BATCH))
    return plan(model or Model.of(pipe), s, budget, s.offload, auto_batch=s.view_batch_size is None,
                estimate_stages=estimate_stages, gpu=torch.device(pipe.device).type != "cpu")
