"""FID, KID and IS from Inception features, by the statistics of the chosen backend's library.

We only gather features (inception.py) and hand them over: torch-fidelity's
``fid_features_to_statistics`` / ``kid_features_to_metric`` / ``isc_features_to_metric``;
torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` / ``InceptionScore`` (fed
the features through an identity "network"); clean-fid's ``frechet_distance`` / ``kernel_distance``.
Every random choice (KID subsets, IS shuffling) is seeded with the recorded ``rng_seed``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

ALL = ("fid", "kid", "is")


@dataclass
class Counts:
    """The counts the statistics used (recorded: they change the numbers)."""

    kid_subsets: int
    kid_subset_size: int
    isc_splits: int


def counts(n_gen: int, n_ref: int, kid_subsets: int = 100, kid_subset_size: int = 1000, isc_splits: int = 10) -> Counts:
    """The libraries' defaults, shrunk to what the sets allow: a KID subset cannot exceed a set, and
    an IS split of one picture scores exactly 1, so splits keep two pictures or more."""
    subset = max(2, min(kid_subset_size, n_gen, n_ref or n_gen))
    return Counts(kid_subsets, subset, max(1, min(isc_splits, n_gen // 2)))


class _Features(torch.nn.Module):
    """Identity "network" for torchmetrics' metric classes: they receive our features as images."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def _torch_fidelity(gen, gen_logits, ref, c: Counts, seed: int, which) -> dict:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric

    out = {}
    if "is" in which and len(gen_logits) > 1:  # one picture's IS is 1 by definition: not a measurement
        r = isc_features_to_metric(gen_logits, c.isc_splits, True, seed)
        out["is"] = {"mean": r["inception_score_mean"], "std": r["inception_score_std"]}
    if ref is None:
        return out
    if "fid" in which and len(gen) > 1 and len(ref) > 1:
        stats = fid_features_to_statistics(gen), fid_features_to_statistics(ref)
        out["fid"] = fid_statistics_to_metric(*stats, False)["frechet_inception_distance"]
    if "kid" in which and len(gen) > 1 and len(ref) > 1:
        r = kid_features_to_metric(gen, ref, kid_subsets=c.kid_subsets, kid_subset_size=c.kid_subset_size,
                                   rng_seed=seed, verbose=False)
        out["kid"] = {"mean": r["kernel_inception_distance_mean"], "std": r["kernel_inception_distance_std"]}
    return out


def _torchmetrics(gen, gen_logits, ref, c: Counts, seed: int, which) -> dict:
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore
    from torchmetrics.image.kid import KernelInceptionDistance

    out = {}
    with torch.random.fork_rng(devices=[]):  # torchmetrics draws KID subsets and IS order from torch's RNG
        torch.manual_seed(seed)  # seeded before each random metric: one's draws never shift another's
        if "is" in which and len(gen_logits) > 1:
            m = InceptionScore(feature=_Features(gen_logits.shape[1]), splits=c.isc_splits)
            m.update(gen_logits)
            mean, std = m.compute()
            out["is"] = {"mean": float(mean), "std": float(std)}
        if ref is not None and "fid" in which and len(gen) > 1 and len(ref) > 1:
            m = FrechetInceptionDistance(feature=_Features(gen.shape[1]))
            m.update(ref, real=True)
            m.update(gen, real=False)
            out["fid"] = float(m.compute())
        if ref is not None and "kid" in which and len(gen) > 1 and len(ref) > 1:
            m = KernelInceptionDistance(feature=_Features(gen.shape[1]), subsets=c.kid_subsets,
                                        subset_size=c.kid_subset_size)
            m.update(ref, real=True)
            m.update(gen, real=False)
            torch.manual_seed(seed)
            mean, std = m.compute()
            out["kid"] = {"mean": float(mean), "std": float(std)}
    return out


def _clean_fid(gen, gen_logits, ref, c: Counts, seed: int, which) -> dict:
    from cleanfid.fid import frechet_distance, kernel_distance

    out = _torch_fidelity(gen, gen_logits, None, c, seed, which)  # clean-fid has no IS: torch-fidelity's
    if ref is None:
        return out
    g, r = gen.double().numpy(), ref.double().numpy()
    if "fid" in which and len(g) > 1 and len(r) > 1:
        out["fid"] = float(frechet_distance(g.mean(0), np.cov(g, rowvar=False), r.mean(0), np.cov(r, rowvar=False)))
    if "kid" in which and len(g) > 1 and len(r) > 1:
        state = np.random.get_state()  # clean-fid draws its subsets from numpy's global RNG
        try:
            np.random.seed(seed)
            out["kid"] = {"mean": kernel_distance(g, r, c.kid_subsets, c.kid_subset_size), "std": None}
        finally:
            np.random.set_state(state)
    return out


STATISTICS = {"torch-fidelity": _torch_fidelity, "torchmetrics": _torchmetrics, "clean-fid": _clean_fid}


def scores(backend: str, gen: torch.Tensor, gen_logits: torch.Tensor, ref: torch.Tensor | None, c: Counts,
           seed: int, which=ALL) -> dict:
    """{"fid": x, "kid": {"mean", "std"}, "is": {"mean", "std"}} (a key is absent where a set is too small:
    FID and KID need two samples on each side, IS two pictures)."""
    return {k: _finite(v) for k, v in STATISTICS[backend](gen, gen_logits, ref, c, seed, set(which)).items()}


def _finite(value):
    """A library's non-finite number (IS underflows to NaN on extreme logits) → None: never saved as NaN."""
    if isinstance(value, dict):  # e.g. IS over one split: a finite mean, a NaN std → std None
        value = {k: _finite(v) for k, v in value.items()}
        return None if value.get("mean", 0) is None or all(v is None for v in value.values()) else value
    return value if value is None or np.isfinite(value) else None
