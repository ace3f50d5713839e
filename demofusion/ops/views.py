"""MultiDiffusion views: window coordinates, jitter, and vectorised gather / scatter-add.

A *view* is a ``window_h × window_w`` crop of a latent, given by its top-left corner. Gather
is a single indexing op over all views at once; the scatter-add adds views in a fixed order
(deterministic on every device).
"""

from __future__ import annotations

import torch


def view_starts(length: int, window: int, stride: int) -> list[int]:
    """Starts of windows covering ``[0, length)`` at ``stride``; the last one ends at the border.

    n = ⌊(L − w)/s − 1e-6⌋ + 2 windows when L > w (else 1), start_k = min(k·s, L − w) — the
    MultiDiffusion / DemoFusion rule.
    """
    if stride < 1 or window < 1:
        raise ValueError(f"window and stride must be positive, got window={window}, stride={stride}")
    if length <= window:
        return [0]
    n = int((length - window) / stride - 1e-6) + 2
    return [min(k * stride, length - window) for k in range(n)]


def local_views(h: int, w: int, window: tuple[int, int], stride: int) -> torch.Tensor:
    """Top-left corners [V, 2] (row-major over the grid) of the windows covering an h×w latent."""
    hs, ws = view_starts(h, window[0], stride), view_starts(w, window[1], stride)
    return torch.tensor([(a, b) for a in hs for b in ws], dtype=torch.long)


def jitter_range(window: int, stride: int) -> int:
    """J = (window − stride) // 4: how far a window may move (and how far the latent is padded)."""
    return max((window - stride) // 4, 0)


def jitter_views(starts: torch.Tensor, size: tuple[int, int], window: tuple[int, int], J: int,
                 generator: torch.Generator | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    """Corners in the frame of the latent padded by J on every side, moved by a random jitter.

    Per axis, interior windows move by U{−J..J}, a window touching the top/left border by
    U{−J..0}, one touching the bottom/right by U{0..J}, one touching both not at all (as the
    reference). Returns starts + J + jitter, all windows inside the padded latent. One
    ``torch.rand`` draw of shape [V, 2] in float64 from ``generator`` (uniform u in [0, 1), mapped
    to an integer of each window's allowed range) — the documented draw for jitter. ``u``, when
    given, replaces that draw (the same numbers drawn ahead, e.g. a whole phase's at once on the
    host and copied once): the result is then a function of ``u`` alone, on ``starts``' device.
    Every operand is made on ``starts``' device (no host→device copy when ``starts`` is there).
    """
    padded = starts + J
    if J == 0:
        return padded
    at_start = starts == 0
    at_end = torch.stack([starts[:, k] + window[k] >= size[k] for k in range(2)], dim=1)
    lo = torch.where(at_end, 0, -J)  # a window on the far border may only move outwards (+)
    hi = torch.where(at_start, 0, J)  # one on the near border only outwards (−)
    if u is None:
        u = torch.rand(starts.shape, generator=generator, dtype=torch.float64, device=starts.device)
    jit = lo + torch.floor(u * (hi - lo + 1)).long()  # uniform integer in [lo, hi]
    return padded + jit


def _flat_index(starts: torch.Tensor, window: tuple[int, int], width: int, device) -> torch.Tensor:
    """[V, wh, ww] flat indices into an ``? × width`` plane of every view's pixels. ``starts`` on
    ``device`` costs no copy; on the host it is copied once (pageable, blocking on CUDA)."""
    starts = starts.to(device)
    rows = starts[:, 0, None] + torch.arange(window[0], device=device)  # [V, wh]
    cols = starts[:, 1, None] + torch.arange(window[1], device=device)  # [V, ww]
    return rows[:, :, None] * width + cols[:, None, :]


def gather_views(x: torch.Tensor, starts: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """x [B,C,H,W] → views [V·B, C, wh, ww] (view-major: all of view 0's batch, then view 1 …)."""
    b, c, h, w = x.shape
    idx = _flat_index(starts, window, w, x.device)  # [V, wh, ww]
    v = idx.shape[0]
    out = x.reshape(b, c, h * w)[:, :, idx.reshape(-1)]  # [B, C, V·wh·ww]
    return out.reshape(b, c, v, *window).permute(2, 0, 1, 3, 4).reshape(v * b, c, *window)


def scatter_add_views(views: torch.Tensor, starts: torch.Tensor, shape: tuple[int, int, int, int]
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`gather_views`: (Σ views placed at their corners [B,C,H,W], count [H,W]).

    Deterministic on every device: the views are added one after the other in view order, so
    each pixel's sum is ((0 + v₀) + v₁) + … over the views covering it, in order — the bits of a
    loop of slice additions (and, in fp32, of the single CPU ``index_add_`` this replaced, whose
    CUDA kernel adds duplicate indices in no fixed order). One view's pixels are distinct, so each
    add is a gather, an add and a write to distinct places: no atomics. Pixels lead, so every
    gather/write moves whole rows of B·C values; the count rides along as one more column.
    """
    b, c, h, w = shape
    window = tuple(views.shape[-2:])
    idx = _flat_index(starts, window, w, views.device).reshape(starts.shape[0], -1)  # [V, P]
    vals = views.reshape(-1, b * c, idx.shape[1]).transpose(1, 2)  # [V, P, B·C]
    vals = torch.cat([vals, vals.new_ones(()).expand(*vals.shape[:2], 1)], dim=2)  # + the count
    total = views.new_zeros(h * w, b * c + 1)
    for k in range(idx.shape[0]):  # a fixed order: view 0, 1, …
        total.index_copy_(0, idx[k], total.index_select(0, idx[k]).add_(vals[k]))
    return total[:, :-1].t().reshape(b, c, h, w), total[:, -1].reshape(h, w)
