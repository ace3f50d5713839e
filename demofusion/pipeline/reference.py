"""``reference_compat``: PRIS-CV's choices in one policy object (docs/algorithm.md).

The algorithm (:mod:`.algorithm`) asks a :class:`Policy` wherever our default and the PRIS-CV
reference pipelines (``pipeline_demofusion_sdxl.py`` and its ControlNet twin) differ, so the
default path carries no compat flags. :data:`DEFAULT` is ours; :data:`PRIS_CV` reproduces the
reference (≤ 1e-4 per phase, tests/parity/test_*_vs_pris_cv.py):

* input scaling — the reference scales each UNet batch's input x/√(σ²+1) with a stale σ: the
  first batch of a phase's first step with the previous phase's last σ (0; not after img2img),
  every later batch of a step with the *next* step's σ (:meth:`Policy.input_sigma_index`); so its
  results depend on ``view_batch_size``. Only the UNet's input changes: the step itself is right.
* batching — local windows, then dilated sub-latents, each path cut into ``view_batch_size``-view
  chunks and a remainder (with ControlNets the sub-latents in one batch, as its ControlNet
  pipeline); ours shares UNet calls between paths whose views have one shape
  (:meth:`Policy.batches`) and cuts a stack into balanced chunks, split first among the ranks
  (:meth:`Policy.chunks`).
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

from ..parallel import blocks

HALVES = ("uncond", "cond")


@dataclass(frozen=True)
class Chunk:
    """One UNet batch of a stack of views: views ``first … first+views−1``, computed by rank
    ``rank`` of the ranks the step is split for. ``half``: "uncond" or "cond" when the chunk is
    one CFG half alone (a lone view on several ranks); None: both halves (as the memory plan says:
    in one call as pairs, or apart)."""

    first: int
    views: int
    rank: int = 0
    half: str | None = None


def balanced(n: int, per: int) -> list[tuple[int, int]]:
    """(first, views) of ⌈n / per⌉ chunks of ``n`` views whose sizes differ by at most one, the
    larger first: 65 views at 16 per call → 5 × 13, not 16, 16, 16, 16, 1."""
    return [(r.start, len(r)) for r in blocks(n, -(-n // per))] if n else []


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

    def chunks(self, n: int, per: int, ranks: int = 1, cfg: bool = False, start: int = 0) -> list[Chunk]:
        """The UNet batches of a stack of ``n`` views (at most ``per`` a call) split for ``ranks``
        ranks: the views in ``ranks`` contiguous blocks whose sizes differ by at most one (rank
        ``start`` mod ``ranks`` takes the first, so that a step's stacks share the extra views
        round the ranks), each block in :func:`balanced` chunks. With guidance and at least two
        ranks per view, each CFG half of a view is a chunk of its own (phase 1 on 2+ ranks).
        The bits depend on these batches only: one process split for N ranks computes what N do."""
        if cfg and n and ranks >= 2 * n:
            return [Chunk(v, 1, (start + 2 * v + h) % ranks, half) for v in range(n) for h, half in enumerate(HALVES)]
        return [Chunk(b.start + a, m, (start + r) % ranks) for r, b in enumerate(blocks(n, ranks))
                for a, m in balanced(len(b), per)]

    def step_chunks(self, paths: list, per: int, ranks: int = 1, cfg: bool = False, controlled: bool = False):
        """[(path indices stacked together, their :class:`Chunk` s)] of one step: :meth:`batches`
        cut by :meth:`chunks` (``per``: view_batch_size), the stacks' rank blocks rotated so that
        every rank gets ⌈views / ranks⌉ of the step's views (or a lone CFG half)."""
        out, start = [], 0
        for members, per_call in self.batches(paths, controlled):
            n = sum(paths[m].count for m in members)
            chunks = self.chunks(n, per_call or per, ranks, cfg, start)
            start += n * (2 if chunks and chunks[0].half else 1)
            out.append((members, chunks))
        return out

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

    def chunks(self, n: int, per: int, ranks: int = 1, cfg: bool = False, start: int = 0) -> list[Chunk]:
        """The reference's batches whatever the ranks: ``per`` views a call and the remainder
        (16, 16, 16, 16, 1); the chunks dealt to the ranks in contiguous blocks."""
        cut = [(a, min(per, n - a)) for a in range(0, n, per)]
        owner = {k: r for r, b in enumerate(blocks(len(cut), ranks)) for k in b}
        return [Chunk(a, m, owner[k]) for k, (a, m) in enumerate(cut)]

    def blur_statistics(self, pad: tuple[int, int]) -> tuple[slice, slice] | None:
        return None


DEFAULT, PRIS_CV = Policy(), PrisCV()


def policy_for(reference_compat: bool) -> Policy:
    """The policy of a run: :data:`PRIS_CV` when ``reference_compat``, else :data:`DEFAULT`."""
    return PRIS_CV if reference_compat else DEFAULT
