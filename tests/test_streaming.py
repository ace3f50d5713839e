"""Offload "sequential" with the next unit copied in ahead (demofusion/streaming.py).

No GPU here, so the copy stream is replaced by a recording stand-in and checked for order:
each unit's copies are issued (after the copy stream waited for the compute stream) before the
unit that precedes it runs, the compute stream waits before the unit runs, the unit computes with
exactly those copies, and leaves right after; a wrong guess is dropped; a unit that calls itself
stays until its outer call ends. The same logic on the CPU (the device copies are real clones)
gives the latents of a run without offloading, bit for bit; on pretend CUDA (fake tensors) a whole
run streams with :class:`SameStream`; :class:`CudaCopyStream`'s calls are checked against stand-ins
for ``torch.cuda`` (allocation outside the side stream, the copy inside it, ``record_stream``).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from demofusion.memory import fake_mode
from demofusion.placement import Placement
from demofusion.streaming import CudaCopyStream, SameStream, Streamer, copy_stream_for
from tests.helpers.pipeline import small_pipeline


class Recording(SameStream):
    """A copy stream that logs its calls (to ``log``, shared with the units' run/done hooks)."""

    def __init__(self, log: list):
        self.log, self.made = log, {}

    def begin(self):
        self.log.append("begin")

    def copy(self, home, device):
        out = super().copy(home, device)
        self.log.append(("copy", tuple(home.shape)))
        self.made[out.untyped_storage()._cdata] = out  # a Parameter made of it shares the storage
        return out

    def compute_waits(self):
        self.log.append("wait")


class Twice(nn.Linear):
    """A Linear that calls itself once more from its forward (as an attention skipping zero rows)."""

    def forward(self, x, again: bool = True):
        return super().forward(x) + (self(x, again=False) if again else 0)


def _fake_cpu(module: nn.Module) -> nn.Module:
    """``module``'s parameters as fake CPU tensors (their home, for a pretend CUDA device)."""
    with fake_mode():
        for m in module.modules():
            for n, p in list(m._parameters.items()):
                m._parameters[n] = nn.Parameter(torch.empty(p.shape), requires_grad=False)
    return module


def _home_pipeline():
    """SDXL-shaped components (fp16) waiting in fake CPU memory, the work on pretend CUDA."""
    from demofusion.pipeline import DemoFusionPipeline
    from demofusion.presets import random_components

    unet, vae, text, sched = random_components("sdxl-base", device="meta", dtype=torch.float16)
    with fake_mode():
        for module in (unet, vae, text.text_encoder, text.text_encoder_2):
            for m in module.modules():
                for table in (m._parameters, m._buffers):
                    for n, t in list(table.items()):
                        if t is not None:
                            f = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                            table[n] = nn.Parameter(f, requires_grad=False) if table is m._parameters else f
    return DemoFusionPipeline(unet, vae, text, sched, device="cuda")


def _model():
    return _fake_cpu(nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 7)))


def _run_logged(placement, model, units, calls, log, seen):
    """``calls`` forward passes (each a list of unit indices) in the "sequential" stage, logging
    "run"/"done" of each unit after the placement's own hooks, and what each unit ran with."""
    with placement.stage("unet", "sequential"):
        for i, u in enumerate(units):  # registered after the placement's hooks: they run after them
            u.register_forward_pre_hook(lambda m, a, i=i: (log.append(("run", i)), seen.append(
                (i, [t for t in m.parameters()]))) and None)
            u.register_forward_hook(lambda m, a, o, i=i: log.append(("done", i)))
        with fake_mode():
            for call in calls:
                x = torch.empty(1, 4, device="cuda")
                for k in call:
                    x = torch.empty(1, units[k].in_features, device="cuda")
                    units[k](x)
    for u in units:
        u._forward_pre_hooks.clear()
        u._forward_hooks.clear()


def test_the_next_unit_is_copied_while_the_current_one_runs():
    model, log, seen = _model(), [], []
    stream = Recording(log)
    placement = Placement("cuda", {"unet": [model]}, copy_stream=stream)
    units = list(model)
    _run_logged(placement, model, units, [[0, 1, 2], [0, 1, 2]], log, seen)
    first = [("run", 0), ("done", 0), ("run", 1), ("done", 1), ("run", 2), ("done", 2)]  # learns the order
    second = ["begin", ("copy", (6, 5)), ("copy", (6,)), ("run", 0), ("done", 0),
              "wait", "begin", ("copy", (7, 6)), ("copy", (7,)), ("run", 1), ("done", 1),
              "wait", "begin", ("copy", (5, 4)), ("copy", (5,)), ("run", 2), ("done", 2)]
    assert log == first + second
    s = placement.streamer
    assert (s.hits, s.misses) == (2, 0)
    for i, params in seen[4:]:  # units 1 and 2 of the second call ran with the copies made ahead
        assert all(p.untyped_storage()._cdata in stream.made and p.device.type == "cuda" for p in params), i
    assert all(placement.at_home(u) for u in units)  # the guess left after the last call (unit 0) too


def test_a_wrong_guess_is_dropped_and_the_unit_called_is_brought():
    model, log, seen = _model(), [], []
    placement = Placement("cuda", {"unet": [model]}, copy_stream=Recording(log))
    units = list(model)
    _run_logged(placement, model, units, [[0, 1, 2], [0, 2]], log, seen)
    assert placement.streamer.misses == 1 and placement.streamer.hits == 0
    i, params = seen[-1]
    assert i == 2 and all(p.device.type == "cuda" for p in params)
    # unit 1's copies are dropped, unit 2 is brought when called (no wait), unit 0 copied ahead again
    assert log[-7:] == [("run", 0), ("done", 0), "begin", ("copy", (5, 4)), ("copy", (5,)), ("run", 2), ("done", 2)]
    assert all(placement.at_home(u) for u in units)


def test_a_unit_calling_itself_stays_until_its_outer_call_ends():
    model = _fake_cpu(nn.Sequential(Twice(4, 4)))
    placement = Placement("cuda", {"unet": [model]}, copy_stream=Recording([]))
    sent = []
    with placement.stage("unet", "sequential"):
        send_home = placement.streamer._send_home
        placement.streamer._send_home = lambda units: (sent.append(len(sent)), send_home(units))
        with fake_mode():
            model(torch.empty(1, 4, device="cuda"))
    assert sent == [0] and placement.at_home(model)  # once, after the outer call


def test_prefetching_on_the_cpu_gives_the_same_latents_bit_for_bit():
    pipe = small_pipeline("sdxl")
    kw = dict(prompt="a castle", height=256, width=256, num_inference_steps=2, seed=3, stride=8,
              output_type="latent")
    want = pipe(**kw).latents
    plain = pipe(**kw, offload="sequential").latents  # the CPU: no copy stream, as before
    assert pipe.placement.streamer.copies is None and pipe.placement.streamer.hits == 0
    pipe.placement.copy_stream = Recording([])
    got = pipe(**kw, offload="sequential").latents
    assert pipe.placement.streamer.hits > 0 and pipe.placement.streamer.misses == 0
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(got, want, plain))
    assert pipe.placement.at_home(pipe.unet)


def test_a_pretend_cuda_run_streams_with_copies_ahead():
    pipe = _home_pipeline()
    assert isinstance(copy_stream_for(torch.device("cuda")), SameStream)  # no CUDA runtime here
    assert copy_stream_for(torch.device("cpu")) is None
    with fake_mode():
        out = pipe("a lighthouse", height=1024, width=1024, num_inference_steps=2, offload="sequential",
                   output_type="latent", seed=1)
    s = pipe.placement.streamer
    assert isinstance(s.copies, SameStream) and s.hits > 0 and s.misses == 0
    assert out.latents[-1].device.type == "cuda"
    assert all(pipe.placement.at_home(m) for m in (pipe.unet, pipe.vae, pipe.text.text_encoder))


def test_plans_count_the_unit_coming_on_cuda():
    from demofusion.memory.plan import Model
    from demofusion.placement import stream_units
    from demofusion.tensors import weight_bytes
    pipe = _home_pipeline()
    sizes = sorted((weight_bytes(u) for u in stream_units(pipe.unet)), reverse=True)
    assert Model.of(pipe).unit_bytes == sizes[0] + sizes[1]
    cpu = small_pipeline("sdxl")
    assert Model.of(cpu).unit_bytes == max(weight_bytes(u) for u in stream_units(cpu.unet))


def test_cuda_copy_stream_waits_allocates_copies_and_records(monkeypatch):
    """CudaCopyStream's torch.cuda calls, against stand-ins: begin = side waits for current; copy =
    allocated outside the side stream's context, copied inside it, then record_stream(side);
    compute_waits = current waits for side."""
    log = []

    class S:
        def __init__(self, name):
            self.name = name

        def wait_stream(self, other):
            log.append(("wait", self.name, other.name))

    current, side = S("compute"), S("side")
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)

    @contextlib.contextmanager
    def on(stream):
        log.append(("enter", stream.name))
        yield
        log.append(("exit", stream.name))

    monkeypatch.setattr(torch.cuda, "stream", on)
    real_empty_like, real_copy = torch.empty_like, torch.Tensor.copy_
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: (log.append("alloc"), real_empty_like(t))[1])
    monkeypatch.setattr(torch.Tensor, "copy_", lambda t, src, **kw: (log.append(("copy", kw)), real_copy(t, src))[1])
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda t, s: log.append(("record", s.name)), raising=False)

    copies = CudaCopyStream("cuda")
    home = torch.arange(6.0)
    copies.begin()
    out = copies.copy(home, "cpu")
    copies.compute_waits()
    assert torch.equal(out, home) and out.data_ptr() != home.data_ptr()
    assert log == [("wait", "side", "compute"), "alloc", ("enter", "side"), ("copy", {"non_blocking": True}),
                   ("exit", "side"), ("record", "side"), ("wait", "compute", "side")]


@pytest.mark.parametrize("policy", ["model", "none"])
def test_other_policies_do_not_stream(policy):
    model = _model()
    placement = Placement("cuda", {"text": [], "unet": [model], "vae": []}, copy_stream=Recording([]))
    with fake_mode(), placement.stage("unet", policy):
        pass
    assert placement.streamer is None
