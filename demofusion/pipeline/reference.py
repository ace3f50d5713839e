"""``reference_compat``: PRIS-CV's choices in one policy object (docs/algorithm.md).

The algorithm (:mod:`.algorithm`) asks a :class:`Policy` wherever our default and the PRIS-CV
reference pipelines (``pipeline_demofusion_sdxl.py`` and its ControlNet twin) differ, so the
default path carries no compat flags. :data:`DEFAULT` is ours; :data:`PRIS_CV` reproduces the
reference (≤ 1e-4 per phase, tests/test_reference_parity*.py):

* input scaling — the reference scales each UNet batch's input x/√(σ²+1) with a stale σ: the
  first batch of a phase's first step with the previous phase's last σ (0; not after img2img),
  every later batch of a step with the *next* step's σ (:meth:`Policy.input_sigma_index`); so its
  results depend on ``view_batch_size``. Only the UNet's input changes: the step itself is right.
* batching — local windows, then dilated sub-latents, each path chunked by ``view_batch_size``
  (with ControlNets the sub-latents in one batch, as its ControlNet pipeline); ours shares UNet
  calls between paths whose views have one shape (:meth:`Policy.batches`).
* the blur's mean/std matching — over the zero-padded latent; ours over z itself
  (:meth:`Policy.blur_statistics`).
* control images — zero-padded window crops and point-sampled sub-latent images; ours
  edge-replicated crops and s×s box averages (``control_pad``, ``control_sample``); each phase's
  image a bicubic of the previous phase's (``controlnet.guide.Guide``, ``reference=``).
* phase sizes (``settings.resolve_sizes``) and the 16×-redundant tiled decoder
  (``decoding.decode_latents``) — where a run's sizes and decoding are chosen.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """Our choices (:data:`DEFAULT`); :class:`PrisCV` overrides where the reference differs."""

    name: str = "default"
    control_pad: str = "replicate"  # F.pad mode of the window crops' margin
    control_sample: str = "box"  # sub-latent control images: s×s box averages ("point": samples)

    def input_sigma_index(self, i: int, chunk: int, phase: int, steps: int, upscaling: bool) -> int:
        """The σ index scaling the input of UNet batch ``chunk`` of step ``i`` (0-based ``phase``
        of ``steps``-step phases): the step's own."""
        return i

    def batches(self, paths: list, controlled: bool) -> list[tuple[tuple[int, ...], int | None]]:
        """How the paths' views share UNet calls: [(path indices stacked together, views per call;
        None: view_batch_size)]. Ours: all paths in one stack when their views have one shape."""
        if len({p.shape for p in paths}) == 1:
            return [(tuple(range(len(paths))), None)]
        return [((n,), None) for n in range(len(paths))]

    def blur_statistics(self, pad: tuple[int, int]) -> tuple[slice, slice] | None:
        """The region of the latent padded by ``pad`` (top, left) whose mean/std the blurred latent
        takes: z itself (None when unpadded: all of it)."""
        return (slice(pad[0], None), slice(pad[1], None)) if any(pad) else None


@dataclass(frozen=True)
class PrisCV(Policy):
    """The PRIS-CV reference pipelines' choices (``reference_compat=True``)."""

    name: str = "pris-cv"
    control_pad: str = "constant"
    control_sample: str = "point"

    def input_sigma_index(self, i: int, chunk: int, phase: int, steps: int, upscaling: bool) -> int:
        if not upscaling:
            return i
        if chunk == 0:  # σ left over from the previous step: the previous phase's last (index N: 0)
            return steps if (i == 0 and phase > 0) else i
        return i + 1  # the scheduler already stepped once this step: the next σ

    def batches(self, paths: list, controlled: bool) -> list[tuple[tuple[int, ...], int | None]]:
        return [((n,), p.count if controlled and p.path == "global" else None) for n, p in enumerate(paths)]

    def blur_statistics(self, pad: tuple[int, int]) -> tuple[slice, slice] | None:
        return None


DEFAULT, PRIS_CV = Policy(), PrisCV()


def policy_for(reference_compat: bool) -> Policy:
    """The policy of a run: :data:`PRIS_CV` when ``reference_compat``, else :data:`DEFAULT`."""
    return PRIS_CV if reference_compat else DEFAULT
