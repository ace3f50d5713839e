"""Measure like the paper: FID, KID, IS on whole pictures and on seeded base-size crops (FID_c,
KID_c, IS_c), and CLIP score, with the protocol recorded (docs/evaluate.md).

    import demofusion as df
    result = df.evaluate("out/table1", reference="data/laion-1k", crops=10, crop_size=1024,
                         inception_weights="weights/pt_inception.pth", clip_model="weights/clip-vit-l")
    result["fid"], result["fid_crop"], result["kid"]["mean"], result["is_crop"]["mean"], result["protocol"]

Needs the optional extra: ``pip install 'demofusion[eval]'``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..devices import resolve_device
from ..errors import InputError
from .clip import clip_loader, clip_score
from .crops import crops_of, prepare_crop_folder, save_crop
from .inception import BACKENDS, FEATURES, RESIZE, feature_net, features, weights_sha256
from .metrics import ALL, counts, scores
from .sources import ImageSet, image_set, is_run_folder, prompts_for, read_rgb, run_costs, run_phases

__all__ = ["evaluate", "BACKENDS", "RESIZE", "DEFAULT_BACKEND"]
DEFAULT_BACKEND = "torch-fidelity"  # AccDiffusion's authors: "torch-fidelity, 10 crops" (docs/evaluate.md)
RNG_SEED = 2020  # torch-fidelity's default seed for KID subsets and IS shuffling


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    names = ("demofusion", "torch", "torch-fidelity", "torchmetrics", "clean-fid", "scipy", "numpy", "transformers")
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _gather(images: ImageSet, backend, net, crop, save_to=None, whole_if_small=False):
    """One pass over a set: whole-picture features, crop features (and crops saved), pictures read once."""
    pools, logits, cpools, clogits = [], [], [], []
    for i, f in enumerate(images.files):
        img = read_rgb(f)
        p, lg = features(backend, net, img.unsqueeze(0))
        pools.append(p), logits.append(lg)
        if crop["count"]:
            cs = crops_of(img, crop["size"], crop["count"], crop["seed"], i, str(f), whole_if_small)
            p, lg = features(backend, net, torch.stack(cs))
            cpools.append(p), clogits.append(lg)
            for j, c in enumerate(cs if save_to is not None else []):
                save_crop(c, save_to, i, j)
    cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
    return cat(pools), cat(logits), cat(cpools), cat(clogits)


def _check(backend, crops, crop_size, crop_seed):
    if backend not in BACKENDS:
        raise InputError(f"--backend {backend}: choose from {', '.join(BACKENDS)}")
    if not isinstance(crops, int) or crops < 0:
        raise InputError(f"--crops {crops}: give a count ≥ 0 (0: no crop metrics)")
    if not isinstance(crop_size, int) or crop_size < 16:
        raise InputError(f"--crop-size {crop_size}: give a size in px ≥ 16 (the model's base size: 1024 for SDXL)")
    if crop_seed is None or not isinstance(crop_seed, int) or crop_seed < 0:
        raise InputError(f"--crop-seed {crop_seed}: give an integer ≥ 0 (the crops must be reproducible)")


def _score_set(images: ImageSet, ref, backend, net, crop, which, seed, save_to):
    gen, gen_logits, cgen, cgen_logits = _gather(images, backend, net, crop, save_to and save_to / "images")
    whole_c = counts(len(gen), 0 if ref is None else len(ref["whole"]))
    out = {"images": len(gen)}
    out |= scores(backend, gen, gen_logits, None if ref is None else ref["whole"], whole_c, seed, which)
    used = {"whole": vars(whole_c)}
    if crop["count"]:
        crop_c = counts(len(cgen), 0 if ref is None else len(ref["crops"]))
        s = scores(backend, cgen, cgen_logits, None if ref is None else ref["crops"], crop_c, seed, which)
        out |= {f"{k}_crop": v for k, v in s.items()} | {"crops": len(cgen)}
        used["crop"] = vars(crop_c)
    return out, used


def _check_sizes(sets: list[ImageSet], crop_size: int) -> None:
    """Every generated picture holds a crop: said before anything is computed or written."""
    from PIL import Image

    for s in sets:
        for f in s.files:
            with Image.open(f) as im:
                w, h = im.size
            if min(w, h) < crop_size:
                raise InputError(f"{f} is {w}×{h}, smaller than --crop-size {crop_size}; pass a --crop-size of at "
                                 f"most {min(w, h)} (the model's base size is the paper's choice)")


def _pictures(images: ImageSet):
    return (read_rgb(f) for f in images.files)


def evaluate(images, reference=None, prompts=None, *, crops: int = 10, crop_size: int = 1024, crop_seed: int = 0,
             save_crops=None, inception_weights=None, clip_model=None, backend: str = DEFAULT_BACKEND,
             device="auto", metrics=None) -> dict:
    """Score ``images`` (a folder, a list of files, or one `generate` run folder: then per phase)
    against ``reference`` (a folder or files of real pictures; None: IS and CLIP score only).

    ``prompts``: a list or a file, one per picture in sorted order (default: our PNG metadata);
    CLIP score needs them and ``clip_model``. ``metrics``: a subset of fid, kid, is, clip (default all).
    Returns fid, kid{mean,std}, is{mean,std}, fid_crop, kid_crop, is_crop, clip_score (None where not
    computed), counts, costs and the protocol that makes two results comparable."""
    _check(backend, crops, crop_size, crop_seed)
    which = set(metrics or (*ALL, "clip"))
    unknown = which - {*ALL, "clip"}
    if unknown:
        raise InputError(f"metrics: unknown {', '.join(sorted(unknown))}; choose from fid, kid, is, clip")
    path = Path(images).expanduser() if isinstance(images, (str, Path)) else None
    per_phase = path is not None and is_run_folder(path)
    sets = run_phases(path) if per_phase else [image_set(images)]
    ref_set = None if reference is None else image_set(reference, "--reference")
    texts = {s.name: prompts_for(s, prompts) for s in sets} if "clip" in which else {}
    save_to = None if save_crops is None else prepare_crop_folder(save_crops)
    if crops and which & set(ALL):
        _check_sizes(sets, crop_size)
    if clip_model is not None and "clip" in which:
        clip_loader(clip_model)  # the folder is checked before any work
    device = resolve_device(device)
    inception_metrics = bool(which & set(ALL))
    net = feature_net(backend, inception_weights, device, FEATURES) if inception_metrics else None
    crop = {"count": crops, "size": crop_size, "seed": crop_seed}
    ref = None
    if ref_set is not None and inception_metrics:
        r, _, rc, _ = _gather(ref_set, backend, net, crop, save_to and save_to / "reference", whole_if_small=True)
        ref = {"whole": r, "crops": rc}
    results, used = {}, {}
    for s in sets:
        folder = save_to if len(sets) == 1 or save_to is None else save_to / s.name
        res, used[s.name] = _score_set(s, ref, backend, net, crop, which, RNG_SEED, folder) \
            if inception_metrics else ({"images": len(s.files)}, {})
        res["clip_score"] = None
        if texts.get(s.name) is not None and clip_model is not None:
            res["clip_score"] = clip_score(_pictures(s), texts[s.name], clip_model, device)
        res["costs"] = run_costs(s)
        results[s.name] = {k: res.get(k) for k in ("fid", "kid", "is", "fid_crop", "kid_crop", "is_crop")} | res
    protocol = {
        "backend": backend, "resize": RESIZE[backend],
        "input": "RGB uint8 in [0, 255] as Pillow reads the file (convert('RGB')), sorted file order",
        "inception_weights": str(inception_weights) if inception_weights else "the library's download",
        "inception_sha256": weights_sha256(inception_weights) if inception_metrics else None,
        "crops": crops, "crop_size": crop_size, "crop_seed": crop_seed,
        "crop_rng": "numpy default_rng([crop_seed, picture index]): tops, then lefts, uniform",
        "reference_crops": "the same crops of each reference picture; one no larger than the crop is taken whole",
        "rng_seed": RNG_SEED, "counts": used if per_phase else used[sets[0].name],
        "reference": None if ref_set is None else len(ref_set.files),
        "clip_model": clip_model, "device": str(device), "versions": _versions(),
    }
    if not per_phase:
        return results[sets[0].name] | {"protocol": protocol}
    return {"phases": results, "protocol": protocol}
