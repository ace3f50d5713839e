"""Where the weights are while a run works: the offload policies.

* ``"none"``: the UNet and the VAE stay on the device; the text encoders too, unless
  ``offload_text_encoders`` sends them home after encoding (the default).
* ``"model"``: a component is on the device only while it works — the text encoders while
  encoding, the UNet while denoising, the VAE while decoding or encoding; the others wait at home.
* ``"sequential"``: as ``"model"``, and during a UNet call its weights stream through the device
  in units of at most 1/32 of the UNet (a resnet, an attention's projection, a transformer layer):
  each unit comes in just before it runs and leaves just after; on CUDA the next unit is copied in
  on a side stream while the current one computes (demofusion/streaming.py).

*Home* is host memory, pinned on CUDA so copies to the device are ``non_blocking``. Bringing a
tensor to the device copies its home copy; sending it home drops the device copy (weights are
read-only; a dtype change made on the device, such as the VAE's fp16-overflow upcast, is copied
home first). Parameters are replaced in ``module._parameters`` rather than through ``.data``, which
also works for fake tensors (the memory tests). A tensor the placement did not put where it is
(a module built or re-weighted since, e.g. by ``fuse_qkv`` or fp8 conversion) is taken as new:
its home is where it is now, whatever was recorded for the module's id. On a CPU device the
device copy is a clone: the policies save nothing there, but their mechanics run (and are
tested) on a machine without a GPU.
Nothing here changes a value: a run's results are the same under every policy, bit for bit.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from .devices import resolve_device
from .streaming import Streamer, copy_stream_for
from .tensors import is_fake, weight_bytes

POLICIES = ("none", "model", "sequential")
UNIT_FRACTION = 32  # sequential: stream units of at most 1/32 of the module's bytes


def _own(module: nn.Module) -> bool:
    """The module holds tensors itself (not only through children): its forward uses them."""
    return any(t is not None for t in (*module._parameters.values(), *module._buffers.values()))


def stream_units(module: nn.Module, limit: int | None = None) -> list[nn.Module]:
    """The modules whose weights stream one at a time: ``module`` split into children until each
    holds at most ``limit`` bytes (default 1/32 of it) or holds tensors itself. Containers
    (ModuleList/ModuleDict: no forward of their own) are always split."""
    limit = limit if limit is not None else max(weight_bytes(module) // UNIT_FRACTION, 1)
    if _own(module) or not any(True for _ in module.children()) or \
            (weight_bytes(module) <= limit and not isinstance(module, (nn.ModuleList, nn.ModuleDict))):
        return [module] if weight_bytes(module) else []
    return [u for child in module.children() for u in stream_units(child, limit)]


class Placement:
    """Moves the components of a pipeline between home and ``device`` as each stage needs.

    ``components``: name → modules (``"text"``: both encoders, ``"unet"``, ``"vae"``).
    ``copy_stream``: the stream "sequential" copies the next unit on (demofusion/streaming.py);
    None: chosen by the device (a CUDA side stream; none, so no prefetching, off CUDA)."""

    def __init__(self, device, components: dict[str, list[nn.Module]], copy_stream=None):
        self.device = torch.device(device)
        self.components = components
        self.copy_stream = copy_stream
        self.streamer: Streamer | None = None  # the last "sequential" stage's (its hits and misses)
        self._auto_stream = None  # (device, the copy stream chosen for it)
        self._home: dict[tuple[int, str], torch.Tensor] = {}  # (id(module), name) → its home tensor
        self._copies: dict[tuple[int, str], weakref.ref] = {}  # (id(module), name) → the device copy made
        self._owners: dict[int, weakref.ref] = {}  # id(module) → the module: its entries go with it

    # ---- tensors ---------------------------------------------------------------------------
    def _slots(self, modules):
        for module in modules:
            for m in module.modules():
                for table in (m._parameters, m._buffers):
                    for name, t in table.items():
                        if t is not None:
                            yield m, table, name, t

    def _pinned(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda" and not is_fake(t) and torch.cuda.is_available():
            return t.pin_memory()
        return t

    def _home_of(self, m: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor | None:
        """The home of ``m``'s tensor ``name`` when ``t`` is that home or the device copy made of
        it; None when ``t`` was not placed here (an entry left by a replaced tensor is dropped)."""
        key = (id(m), name)
        home = self._home.get(key)
        if home is None or t is home:
            return home
        copy = self._copies.get(key)
        if copy is not None and copy() is t:
            return home
        self._home.pop(key)
        self._copies.pop(key, None)
        return None

    def _record(self, m: nn.Module, name: str, home: torch.Tensor) -> None:
        self._home[(id(m), name)] = home
        if id(m) not in self._owners:  # a module gone (e.g. fused away) takes its home copies with it
            self._owners[id(m)] = weakref.ref(m, lambda _, i=id(m): self._forget(i))

    def _forget(self, owner: int) -> None:
        self._owners.pop(owner, None)
        for table in (self._home, self._copies):
            for key in [k for k in table if k[0] == owner]:
                del table[key]

    def at_home(self, module: nn.Module) -> bool:
        """Every tensor of ``module`` is its home copy (nothing of it on the device)."""
        return all(self._home_of(m, n, t) is t for m, _, n, t in self._slots([module]))

    def bring(self, modules, keep_home: bool = True, copy=None) -> None:
        """Put ``modules`` on the device (copies of their home tensors, non-blocking from pinned memory).
        ``keep_home=False`` (policy "none"): the device copy becomes the only
        one. ``copy(home, device)``: how to copy (default ``home.to(device, non_blocking=True)``)."""
        for m, table, name, t in self._slots(modules):
            key, home = (id(m), name), self._home_of(m, name, t)
            if home is None:
                if t.device == self.device and self.device.type != "cpu":
                    continue  # made on the device: already there
                home = t if not keep_home else self._set_home(m, table, name, self._pinned(t))
            elif t is not home:
                continue  # on the device already
            new = home.to(self.device, non_blocking=True, copy=True) if copy is None else copy(home, self.device)
            table[name] = _as(table, new, m)
            self._copies[key] = weakref.ref(table[name])
            if not keep_home:
                self._home.pop(key, None)

    def send_home(self, modules) -> None:
        """Drop the device copies of ``modules``' tensors (their home copies take their place)."""
        for m, table, name, t in self._slots(modules):
            home = self._home_of(m, name, t)
            if home is t:
                continue
            if home is None and t.device.type == "cpu":
                self._record(m, name, t)  # never moved: it is home
            elif home is None or home.dtype != t.dtype:  # made on the device, or re-typed there
                self._set_home(m, table, name, self._pinned(t.to("cpu", copy=True)))
            else:
                table[name] = home

    def _set_home(self, m: nn.Module, table: dict, name: str, t: torch.Tensor) -> torch.Tensor:
        home = table[name] = _as(table, t, m)
        self._record(m, name, home)
        return home

    def move_all(self, device) -> None:
        """Every component to ``device``, which becomes the one work runs on (home copies dropped)."""
        self.device = resolve_device(device)
        for modules in self.components.values():
            for m in modules:
                m.to(self.device)
        self._home.clear()
        self._copies.clear()

    # ---- stages ------------------------------------------------------------------------------
    def needed(self, stage: str, policy: str, offload_text_encoders: bool = True) -> set[str]:
        """Components on the device during ``stage`` ("text", "unet" or "vae")."""
        if policy == "none":
            return {"unet", "vae"} | ({"text"} if stage == "text" or not offload_text_encoders else set())
        return {stage}

    @contextlib.contextmanager
    def stage(self, stage: str, policy: str, offload_text_encoders: bool = True):
        """The device holds what ``stage`` needs under ``policy`` (others go home first); under
        "sequential" the UNet streams unit by unit during the stage."""
        if policy not in POLICIES:
            raise ValueError(f"offload must be one of {', '.join(POLICIES)}, got {policy!r}")
        if self.device.type == "cpu" and policy == "none":
            yield  # nothing to move: the device is home
            return
        needed = self.needed(stage, policy, offload_text_encoders)
        for name, modules in self.components.items():
            if name not in needed:
                self.send_home(modules)
        streamed = policy == "sequential" and stage == "unet"
        for name in needed:  # under "none" only visiting text encoders keep their home copies
            if not streamed:
                self.bring(self.components[name], keep_home=policy != "none" or name == "text" and
                           stage == "text" and offload_text_encoders)
        with self._streaming(self.components["unet"]) if streamed else contextlib.nullcontext():
            yield

    @contextlib.contextmanager
    def _streaming(self, modules):
        units = [u for m in modules for u in stream_units(m)]
        self.streamer = Streamer(self.bring, self.send_home, self._copy_stream())
        try:
            with self.streamer.hooked(units):
                yield
        finally:
            self.streamer.drop()
            self.send_home(modules)  # after an error mid-call too

    def _copy_stream(self):
        if self.copy_stream is not None:
            return self.copy_stream
        if self._auto_stream is None or self._auto_stream[0] != self.device:  # one stream per device
            self._auto_stream = (self.device, copy_stream_for(self.device))
        return self._auto_stream[1]

    def finish(self, policy: str) -> None:
        """After a run: under "model" and "sequential" every component waits at home."""
        if policy != "none":
            for modules in self.components.values():
                self.send_home(modules)


def _as(table, t: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``t`` as an entry of ``table``: a Parameter for ``module._parameters``, the tensor for buffers."""
    if table is module._parameters and not isinstance(t, nn.Parameter):
        return nn.Parameter(t, requires_grad=False)
    return t
