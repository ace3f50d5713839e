"""View parallelism across processes on torch.distributed — exact by construction.

Within a denoising step every *chunk* of views (one UNet batch: the views with their CFG pairs,
or one CFG half of a lone view) is a pure function of the step's shared latent. The policy cuts a
step's views for N ranks (:meth:`~demofusion.pipeline.reference.Policy.chunks`: every rank
⌈views / N⌉, in phase 1 a CFG half each) and names each chunk's rank; :class:`ViewParallel` runs
each rank's own chunks and one ``all_gather`` gives every rank all the predictions in chunk
order. Every UNet call is the call one process split for N ranks makes (``view_ranks=N``: same
inputs, same batch), so the result is that process's bit for bit, on every rank; everything else
(noise, jitter, merging, the sampler step) every rank computes alike from the same seed.

A stack of views with a single chunk (phase 1 without guidance) runs on every rank, with no
communication. Per step a rank sends its views' predictions: 4 × h × w × 4 bytes per view
(256 KiB for a 128² SDXL view) and receives the others'.
"""

from __future__ import annotations

import torch


class Serial:
    """One process: chunks run in order."""

    rank, world = 0, 1

    def map(self, fn, rows: list[int], like: torch.Tensor, owners: list[int] | None = None) -> list[torch.Tensor]:
        return [fn(k) for k in range(len(rows))]


def blocks(n: int, world: int) -> list[range]:
    """Chunks ``0..n-1`` in ``world`` contiguous blocks whose sizes differ by at most one."""
    q, r = divmod(n, world)
    starts = [i * q + min(i, r) for i in range(world + 1)]
    return [range(starts[i], starts[i + 1]) for i in range(world)]


class ViewParallel:
    """The ranks of a process group share each step's chunks (``group``: default the world)."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self.group, self.dist = group, dist
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)

    def map(self, fn, rows: list[int], like: torch.Tensor, owners: list[int] | None = None) -> list[torch.Tensor]:
        """``[fn(k) for k in chunks]`` with each rank computing its own; ``rows[k]``: the number
        of rows (dim 0) of chunk k's output; ``owners[k]``: the rank of chunk k (mod the world;
        None: contiguous balanced blocks of chunks); ``like``: a tensor with the outputs' trailing
        shape, dtype and device (a rank left without a chunk still takes part in the gather)."""
        if len(rows) == 1 or self.world == 1:
            return [fn(k) for k in range(len(rows))]
        if owners is None:
            mine = blocks(len(rows), self.world)
        else:
            mine = [[k for k in range(len(rows)) if owners[k] % self.world == r] for r in range(self.world)]
        local = [fn(k) for k in mine[self.rank]]
        n_rows = [sum(rows[k] for k in b) for b in mine]
        buf = like.new_zeros((max(n_rows), *like.shape[1:]))
        if local:
            cat = torch.cat(local)
            buf[: cat.shape[0]] = cat
        parts = [torch.empty_like(buf) for _ in range(self.world)]
        self.dist.all_gather(parts, buf, group=self.group)
        out: list = [None] * len(rows)
        for b, part, n in zip(mine, parts, n_rows):
            for k, x in zip(b, part[:n].split([rows[k] for k in b])):
                out[k] = x
        return out


def runner(enabled: bool = True):
    """:class:`ViewParallel` when a process group of more than one rank is initialised (and
    ``enabled``), else :class:`Serial`."""
    import torch.distributed as dist

    if enabled and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return ViewParallel()
    return Serial()


def world(enabled: bool = True) -> int:
    """The ranks a run's views are shared among: the process group's size (when ``enabled``), else 1."""
    return runner(enabled).world


def min_over_ranks(value: int | None) -> int | None:
    """The smallest ``value`` over the ranks of the process group (None stays None; no group: itself).
    Every rank must plan alike (the same chunks), so a per-device figure is agreed on first."""
    r = runner()
    if value is None or isinstance(r, Serial):
        return value
    import torch.distributed as dist

    backend = dist.get_backend()
    t = torch.tensor([value], dtype=torch.int64, device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
