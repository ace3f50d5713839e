"""MultiDiffusion views: window coordinates, jitter, and vectorised gather / scatter-add.

A *view* is a ``window_h × window_w`` crop of a latent, given by its top-left corner. Gather
and scatter are single indexing ops over all views at once (no per-view Python loops).
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
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Corners in the frame of the latent padded by J on every side, moved by a random jitter.

    Per axis, interior windows move by U{−J..J}, a window touching the top/left border by
    U{−J..0}, one touching the bottom/right by U{0..J}, one touching both not at all (as the
    reference). Returns starts + J + jitter, all windows inside the padded latent. One
    ``torch.randint`` draw of shape [V, 2] from ``generator`` (uniform in [−J, J], then clamped
    to each window's allowed range) — the documented draw for jitter.
    """
    padded = starts + J
    if J == 0:
        return padded
    at_start = starts == 0
    at_end = starts + torch.tensor(window) >= torch.tensor(size)
    lo = torch.where(at_end, 0, -J)  # a window on the far border may only move outwards (+)
    hi = torch.where(at_start, 0, J)  # one on the near border only outwards (−)
    u = torch.rand(starts.shape, generator=generator, dtype=torch.float64)
    jit = lo + torch.floor(u * (hi - lo + 1)).long()  # uniform integer in [lo, hi]
    return padded + jit


def _flat_index(starts: torch.Tensor, window: tuple[int, int], width: int, device) -> torch.Tensor:
    """[V, wh, ww] flat indices into an ``? × width`` plane of every view's pixels."""
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
    """Inverse of :func:`gather_views`: (Σ views placed at their corners [B,C,H,W], count [H,W])."""
    b, c, h, w = shape
    window = tuple(views.shape[-2:])
    idx = _flat_index(starts, window, w, views.device).reshape(-1)
    v = starts.shape[0]
    vals = views.reshape(v, b, c, -1).permute(1, 2, 0, 3).reshape(b, c, -1)
    total = torch.zeros(b, c, h * w, dtype=views.dtype, device=views.device).index_add_(2, idx, vals)
    count = torch.zeros(h * w, dtype=views.dtype, device=views.device)
    count.index_add_(0, idx, torch.ones_like(idx, dtype=views.dtype))
    return total.reshape(b, c, h, w), count.reshape(h, w)
