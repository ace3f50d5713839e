"""Fusing LoRAs into the weights, and taking them out again exactly.

    from demofusion.lora import LoraStack
    stack = LoraStack()
    modules = {"unet": pipe.unet, "text_encoder": pipe.text.text_encoder,
               "text_encoder_2": pipe.text.text_encoder_2}
    stack.load(modules, "style.safetensors", scale=0.8)   # → "style"
    stack.unload(modules, "style")                         # weights as they were, bit for bit

Fusing adds ``scale · (alpha / rank) · up @ down`` to each target's weight, computed in float32
on the weight's device and cast back to the weight's dtype, in place (``Parameter`` objects are
kept: other code holds references to them). Everything is checked before anything changes: a
LoRA that does not fit leaves the weights untouched.

:class:`LoraStack` keeps, on the CPU, a copy of each weight the first time a LoRA touches it.
Unloading restores those copies and fuses the remaining LoRAs again in load order, so the
weights are exactly (bit for bit) those of loading only the remaining LoRAs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from demofusion.fp8 import FP8_DTYPES

from .checks import check_scale
from .formats import LoRA, LoraError, LoraTarget, listing, read_lora, sd15_error

Modules = dict  # component name ("unet", "text_encoder", "text_encoder_2") → nn.Module

# SD 1.5 / 2.x UNets: text context 768 / 1024 wide, attention in down block 0, four levels.
_SD15_CONTEXT = {768: "SD 1.5", 1024: "SD 2.x"}
_SD15_PATHS = ("down_blocks.0.attentions.", "down_blocks.3.", "up_blocks.3.")


@dataclass
class _Planned:
    """A target and the parameter it updates."""

    target: LoraTarget
    weight: torch.Tensor  # a Parameter, or a fused projection's rows of one


def fuse_lora(modules: Modules, lora: LoRA | str | os.PathLike, scale: float = 1.0) -> None:
    """Add ``lora`` (a :class:`LoRA` or a file path) × ``scale`` to the weights of ``modules``
    (in place; see the module doc).

    Not undoable by itself: use :class:`LoraStack` to unload. Raises :class:`LoraError` (and
    changes nothing) when a target is missing, mis-shaped, or stored in fp8.
    """
    scale = check_scale(scale)
    if not isinstance(lora, LoRA):
        lora = read_lora(lora)
    for p in plan(modules, lora):
        add_update_(p.weight, p.target, scale)


def plan(modules: Modules, lora: LoRA) -> list[_Planned]:
    """Each target with the weight it updates, after checking that all of them fit."""
    absent = sorted(lora.components - {c for c, m in modules.items() if m is not None})
    if absent:
        n = sum(t.component == absent[0] for t in lora.targets)
        raise LoraError(f"{lora.source}: has {n} targets in {absent[0]} but no {absent[0]} module was given; "
                        f"pass all of {', '.join(sorted(lora.components))} in the modules")
    missing, misfit, planned = [], [], []
    for t in lora.targets:
        weight = _weight(modules, t.component, t.module)
        if weight is None:
            missing.append(t)
        elif not _fits(t, weight):
            misfit.append((t, weight))
        else:
            planned.append(_Planned(t, weight))
    _raise_sd15(lora, missing, misfit)
    if missing:
        raise LoraError(f"{lora.source}: {len(missing)} of {len(lora)} LoRA targets are not Linear/Conv2d "
                        f"modules of this model: {listing(_describe(t) for t in missing)}; use a LoRA made for SDXL")
    if misfit:
        shapes = (f"{_key(t)} (update {_update_shape(t)}, weight {tuple(w.shape)})" for t, w in misfit)
        raise LoraError(f"{lora.source}: {len(misfit)} of {len(lora)} LoRA targets do not fit their weight's "
                        f"shape: {listing(shapes)}; use a LoRA made for this model (SDXL)")
    fp8 = [p.target for p in planned if p.weight.dtype in FP8_DTYPES]
    if fp8:
        raise LoraError(f"{lora.source}: {len(fp8)} target weights are stored as fp8 "
                        f"({listing(t.component + '.' + t.module for t in fp8)}): load LoRAs before fp8 "
                        "conversion (to_fp8_ / --fp8)")
    meta = [p.target for p in planned if p.weight.is_meta]
    if meta:
        raise LoraError(f"{lora.source}: {len(meta)} target weights are not loaded (meta device): "
                        f"{listing(t.module for t in meta)}; load the model's weights first")
    return planned


def _key(t: LoraTarget) -> str:
    """The file key a target came from (its module for targets built in memory)."""
    return t.keys[0] if t.keys else f"{t.component}.{t.module}"


def _describe(t: LoraTarget) -> str:
    return f"{_key(t)} → {t.component}.{t.module}"


def _weight(modules: Modules, component: str, path: str) -> torch.Tensor | None:
    """The ``weight`` of the Linear or Conv2d at ``path`` in ``modules[component]``, or None.
    A projection fused with others (``UNet.fuse_qkv``) gives its rows of the fused weight, a view
    the in-place update writes through."""
    root = modules.get(component)
    if root is None:
        return None
    try:
        module = root.get_submodule(path)
    except AttributeError:
        parent, _, name = path.rpartition(".")
        try:
            rows = getattr(root.get_submodule(parent), "projection_weight", None)
        except AttributeError:
            return None
        return rows(name) if callable(rows) else None
    if not isinstance(module, (nn.Linear, nn.Conv2d)):
        return None
    return module.weight


def _update_shape(t: LoraTarget) -> tuple:
    return (t.up.shape[0], *t.down.shape[1:])


def _fits(t: LoraTarget, weight: torch.Tensor) -> bool:
    """``up @ down`` has the weight's shape (a Linear also takes 1×1-conv-shaped factors)."""
    shape = _update_shape(t)
    if weight.ndim == 2 and len(shape) == 4 and shape[2:] == (1, 1):
        shape = shape[:2]
    return tuple(weight.shape) == tuple(shape)


def _raise_sd15(lora: LoRA, missing: list, misfit: list) -> None:
    """An SD 1.5/2.x LoRA says so, rather than listing keys: its UNet modules and widths are SD 1.5's."""
    paths = [t.module for t in missing if t.component == "unet" and t.module.startswith(_SD15_PATHS)]
    if paths:
        raise sd15_error(lora.source, f"it updates UNet modules SDXL does not have, such as {paths[0]}")
    for t, w in misfit:
        if t.component == "unet" and t.module.endswith(("attn2.to_k", "attn2.to_v")):
            width = t.down.shape[1]
            if width in _SD15_CONTEXT and width != w.shape[1]:
                raise sd15_error(lora.source, f"{_SD15_CONTEXT[width]} cross-attention {width} wide at {t.module}, "
                                              f"this model's is {w.shape[1]}")


def update(t: LoraTarget, shape, device, scale: float = 1.0) -> torch.Tensor:
    """``scale · alpha/rank · up @ down`` in float32 on ``device``, shaped as the weight."""
    up = t.up.to(device=device, dtype=torch.float32).flatten(1)  # [out, rank]
    down = t.down.to(device=device, dtype=torch.float32).flatten(1)  # [rank, in·kh·kw]
    return (up @ down).mul_(scale * t.factor).reshape(shape)


@torch.no_grad()
def add_update_(weight: nn.Parameter, t: LoraTarget, scale: float) -> None:
    """``weight += update`` computed in float32, cast back to the weight's dtype, in place."""
    w = weight.data
    w32 = w.to(torch.float32, copy=True)
    w32 += update(t, w.shape, w.device, scale)
    w.copy_(w32)


# ---------------------------------------------------------------- several LoRAs, undoable ----
class LoraStack:
    """LoRAs fused into a model's weights, each unloadable exactly (see the module doc).

    ``load`` and ``unload`` take the same ``modules`` mapping each time (component name →
    module); parameters are looked up by name on every call, so modules moved with ``.to()``
    in between are fine. Convert to fp8 only after loading LoRAs, and unload before converting.
    """

    def __init__(self):
        self._loras: dict[str, tuple[LoRA, float]] = {}  # name → (LoRA, scale), in load order
        self._originals: dict[tuple[str, str], torch.Tensor] = {}  # (component, module) → CPU copy

    @property
    def loaded(self) -> dict[str, float]:
        """Loaded LoRAs, name → scale, in load order."""
        return {name: scale for name, (_, scale) in self._loras.items()}

    def load(self, modules: Modules, lora: LoRA | str | os.PathLike, scale: float = 1.0,
             name: str | None = None) -> str:
        """Fuse ``lora`` (a :class:`LoRA` or a file path) with ``scale``; returns its name
        (``name``, else the file's stem, made unique with ``-2``, ``-3``…)."""
        scale = check_scale(scale)  # finite, within ±MAX_SCALE: checked before the file is read
        if not isinstance(lora, LoRA):
            lora = read_lora(lora)
        if name is None:
            name = self._free_name(lora.name)
        elif name in self._loras:
            raise LoraError(f"a LoRA named {name!r} is already loaded; unload it first or pass another name")
        planned = plan(modules, lora)
        for p in planned:
            key = (p.target.component, p.target.module)
            if key not in self._originals:
                self._originals[key] = p.weight.detach().to("cpu", copy=True)
        for p in planned:
            add_update_(p.weight, p.target, scale)
        self._loras[name] = (lora, float(scale))
        return name

    def unload(self, modules: Modules, name: str | None = None) -> None:
        """Take out the LoRA ``name`` (None: all of them); the weights become exactly those of
        loading the remaining LoRAs, in their order, into the original weights."""
        if name is not None and name not in self._loras:
            loaded = ", ".join(repr(n) for n in self._loras) or "none"
            raise LoraError(f"no LoRA named {name!r} is loaded (loaded: {loaded}); use one of those names")
        weights = self._touched_weights(modules)
        remaining = {} if name is None else {n: v for n, v in self._loras.items() if n != name}
        plans = [(plan(modules, lora), scale) for lora, scale in remaining.values()]  # checked first
        with torch.no_grad():
            for key, weight in weights.items():
                weight.data.copy_(self._originals[key])
        for planned, scale in plans:
            for p in planned:
                add_update_(p.weight, p.target, scale)
        self._loras = remaining
        still = {(t.component, t.module) for lora, _ in remaining.values() for t in lora.targets}
        self._originals = {k: v for k, v in self._originals.items() if k in still}

    def _touched_weights(self, modules: Modules) -> dict:
        """Every weight with a saved original, checked to be restorable."""
        weights, lost, fp8 = {}, [], []
        for key in self._originals:
            w = _weight(modules, *key)
            if w is None or w.shape != self._originals[key].shape:
                lost.append(".".join(key))
            elif w.dtype in FP8_DTYPES:
                fp8.append(".".join(key))
            else:
                weights[key] = w
        if lost:
            raise LoraError(f"{len(lost)} weights the LoRAs changed are not in the modules given: "
                            f"{listing(lost)}; pass the same modules to unload as to load")
        if fp8:
            raise LoraError(f"{len(fp8)} weights the LoRAs changed are now fp8 ({listing(fp8)}): "
                            "unload LoRAs before fp8 conversion")
        return weights

    def _free_name(self, base: str) -> str:
        name, i = base, 1
        while name in self._loras:
            i += 1
            name = f"{base}-{i}"
        return name

    def __repr__(self) -> str:
        return f"LoraStack({self.loaded})"
