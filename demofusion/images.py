"""Images in and out of the pipeline: PIL images (any mode), image files and tensors ↔ [B,3,H,W] in [-1, 1].

``image_to_tensor`` turns every accepted input into float32 [B,3,H,W] in [-1, 1]; each mode maps to RGB in
[0, 1] (then ×2−1) as follows:

- ``1`` (bilevel): 0 → 0, 1 → 1 (black / white).
- ``L``: grey value v → v/255 on all three channels. ``RGB``: each channel v → v/255.
- ``P`` (palette): looked up in the palette; if it has transparency (a ``transparency`` key or an RGBA palette)
  it is treated as ``RGBA``. ``PA``: palette lookup plus alpha, treated as ``RGBA``.
- ``L``/``RGB`` with a ``transparency`` key (PNG tRNS colour): PIL's ``convert("RGBA")``, then as ``RGBA``.
- ``LA``, ``RGBA``: composited on ``background`` (default white) in float: out = c·a + bg·(1−a), a = alpha/255.
- ``RGBa``, ``La`` (premultiplied alpha): out = c + bg·(1−a) (c is already c·a), clipped to [0, 1].
- ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: PIL's ``convert("RGB")`` is the rule, then v/255.
- ``I;16``, ``I;16L``, ``I;16B``, ``I;16N`` (16-bit): v → v/65535 at full 16-bit precision (never through 8 bits,
  so 65535 → 1.0 and 32768 → 32768/65535; PIL's own ``convert("RGB")`` would clip them to 255, i.e. white).
- ``I`` (32-bit int): max ≤ 255 → 8-bit (v/255); max ≤ 65535 → 16-bit (v/65535); else ``InputError``.
- ``F`` (32-bit float): values must already be in [0, 1] and are used as they are; anything outside [0, 1],
  NaN or Inf → ``InputError`` (scale the image to [0, 1] first).
- Any other mode: PIL's ``convert("RGB")`` if PIL can, else ``InputError``.

Resizing (only when ``size`` = (h, w) is given and differs): 8-bit results without alpha are resized as 8-bit
RGB with PIL's LANCZOS; float results (alpha composites, 16-bit, ``F``) channel by channel as float (mode ``F``)
with LANCZOS, then clipped to [0, 1]. Tensors: ``F.interpolate(mode="bicubic", antialias=True)``, clamped to [-1, 1].

Tensors / numpy arrays must be float [3,H,W] or [B,3,H,W] in [-1, 1] (1e-6 tolerance); they are never clamped
or rescaled silently: integer dtypes, NaN/Inf, other shapes or other ranges raise ``InputError``. A ``str`` or
``pathlib.Path`` is opened with ``load_image``; a list of images (same size after resizing) becomes a batch.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .errors import InputError

_WHAT = "image must be a PIL image, a path to an image file, or a [B,3,H,W] tensor in [-1, 1]"


def load_image(path, name: str = "--image") -> Image.Image:
    """Open and fully load an image file; anything unreadable → ``InputError`` naming ``name`` and the path."""
    if not os.path.exists(path):
        raise InputError(f"{name} {path}: no such file; check the path")
    try:
        with Image.open(path) as im:
            im.load()
        return ImageOps.exif_transpose(im)  # as a viewer shows it (phone photos carry a rotation tag)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise InputError(f"{name} {path}: not an image file PIL can read ({reason})") from None


def image_to_tensor(image, size=None, background=(255, 255, 255)) -> torch.Tensor:
    """PIL image (any mode), image path, list of those, or [B,3,H,W] tensor → float32 [B,3,h,w] in [-1, 1]."""
    bg = _background(background)
    if isinstance(image, (list, tuple)):
        return _batch([image_to_tensor(im, size, background) for im in image])
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image, name="image")
    if isinstance(image, Image.Image):
        rgb = _resize_rgb(_pil_to_rgb(image, bg), size)
        return (torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None] * 2 - 1).float()
    if isinstance(image, (np.ndarray, torch.Tensor)):
        x = _checked_tensor(image)
        if size is not None and tuple(x.shape[2:]) != tuple(size):
            x = F.interpolate(x, size=tuple(size), mode="bicubic", antialias=True).clamp(-1, 1)
        return x
    raise InputError(f"{_WHAT}; got {type(image).__name__}")


def control_to_tensor(image, name: str = "control_image") -> torch.Tensor:
    """A ControlNet's conditioning image (diffusers' convention: RGB in [0, 1], never resized here):
    PIL image, path, list of those (a batch), or a float [B,3,H,W] tensor in [0, 1] → float32 [B,3,H,W]."""
    if isinstance(image, (list, tuple)):
        if not image:
            raise InputError(f"{name} is an empty list; give an image (one per ControlNet for several)")
        return _batch([control_to_tensor(im, name) for im in image])
    if isinstance(image, (str, os.PathLike)):
        image = load_image(image, name=name)
    if isinstance(image, Image.Image):
        rgb = _resize_rgb(_pil_to_rgb(image, _background((0, 0, 0))), None)
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))[None].float()
    if isinstance(image, (np.ndarray, torch.Tensor)):
        x = torch.from_numpy(image) if isinstance(image, np.ndarray) else image
        if not x.is_floating_point() or x.ndim not in (3, 4) or x.shape[-3] != 3 or x.numel() == 0:
            raise InputError(f"{name} tensor has dtype {x.dtype} and shape {tuple(x.shape)}; expected float "
                             "[B,3,H,W] or [3,H,W] in [0, 1] (e.g. x.float() / 255, channels first)")
        x = (x[None] if x.ndim == 3 else x).float().cpu()
        if not torch.isfinite(x).all():
            raise InputError(f"{name} tensor contains NaN or Inf; expected finite values in [0, 1]")
        lo, hi = (float(v) for v in torch.aminmax(x))
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise InputError(f"{name} tensor has values in [{lo:g}, {hi:g}]; a control image is in [0, 1] "
                             "(divide 8-bit values by 255; map [-1, 1] with (x + 1) / 2)")
        return x
    raise InputError(f"{name} must be a PIL image, an image file path, or a [B,3,H,W] tensor in [0, 1]; "
                     f"got {type(image).__name__}")


def tensor_to_unit(image: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1, 1] → float in [0, 1] (clamped)."""
    return (image.float() / 2 + 0.5).clamp(0, 1)


def tensor_to_pil(image: torch.Tensor) -> list[Image.Image]:
    """[B,3,H,W] (or [3,H,W]) in [-1, 1] → list of uint8 RGB PIL images (rounded)."""
    x = image[None] if image.ndim == 3 else image
    x = (tensor_to_unit(x) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]


def _background(background) -> np.ndarray:
    """The background colour as float RGB in [0, 1]."""
    try:
        bg = np.asarray(background, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        bg = np.zeros(0)
    if bg.shape != (3,) or not np.all((bg >= 0) & (bg <= 255)):
        raise InputError(f"background must be an (r, g, b) colour with values in 0..255; got {background!r}")
    return bg / 255


def _has_alpha(im: Image.Image) -> bool:
    """Whether a mode without an alpha band still carries transparency (palette alpha or a tRNS key)."""
    return "transparency" in im.info or (im.mode == "P" and im.palette is not None and im.palette.mode == "RGBA")


def _pil_to_rgb(im: Image.Image, bg: np.ndarray) -> np.ndarray:
    """PIL image → [H,W,3] RGB: uint8 for plain 8-bit results, else float64 in [0, 1] (see module doc)."""
    if im.mode == "PA" or im.mode in ("L", "RGB", "P") and _has_alpha(im):
        im = im.convert("RGBA")
    elif im.mode in ("1", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("RGB")
    a = np.asarray(im)
    if im.mode in ("L", "RGB"):
        return _grey3(a)
    if im.mode in ("LA", "RGBA", "La", "RGBa"):
        c, alpha = a[..., :-1] / 255.0, a[..., -1:] / 255.0
        out = (c if im.mode in ("La", "RGBa") else c * alpha) + bg * (1 - alpha)
        return _grey3(np.clip(out, 0, 1))
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        return _grey3(a.astype(np.float64) / 65535)
    if im.mode == "I":
        return _grey3(_int32_to_unit(a))
    if im.mode == "F":
        return _grey3(_float_to_unit(a))
    try:
        return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise InputError(f"image mode {im.mode!r} cannot be converted to RGB ({e}); convert it to RGB first") from None


def _grey3(a: np.ndarray) -> np.ndarray:
    """[H,W] or [H,W,1] → [H,W,3] by repeating the grey value; [H,W,3] unchanged."""
    a = a[..., None] if a.ndim == 2 else a
    return np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a


def _int32_to_unit(a: np.ndarray) -> np.ndarray:
    """Mode ``I``: 8-bit if max ≤ 255, 16-bit if max ≤ 65535, else an error."""
    lo, hi = int(a.min()), int(a.max())
    if lo < 0 or hi > 65535:
        raise InputError(f"image is a 32-bit integer (mode 'I') image with values in [{lo}, {hi}]; "
                         "only 0..255 (8-bit) or 0..65535 (16-bit) are understood: rescale it to one of those")
    return a.astype(np.uint8) if hi <= 255 else a.astype(np.float64) / 65535


def _float_to_unit(a: np.ndarray) -> np.ndarray:
    """Mode ``F``: values must be finite and in [0, 1]."""
    if not np.isfinite(a).all():
        raise InputError("image is a float (mode 'F') image containing NaN or Inf; replace those values first")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0 or hi > 1:
        raise InputError(f"image is a float (mode 'F') image with values in [{lo:g}, {hi:g}]; "
                         "float images must be in [0, 1]: scale it (e.g. divide by 255 or 65535)")
    return a.astype(np.float64)


def _resize_rgb(rgb: np.ndarray, size) -> np.ndarray:
    """[H,W,3] RGB → [h,w,3] in [0, 1] float; LANCZOS on 8-bit RGB (uint8) or per channel as float."""
    if size is not None and tuple(rgb.shape[:2]) != tuple(size):
        h, w = (int(s) for s in size)
        if rgb.dtype == np.uint8:
            rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.LANCZOS))
        else:
            chans = [Image.fromarray(rgb[..., i].astype(np.float32)).resize((w, h), Image.LANCZOS) for i in range(3)]
            rgb = np.clip(np.stack(chans, axis=2).astype(np.float64), 0, 1)
    return rgb / 255.0 if rgb.dtype == np.uint8 else rgb


def _checked_tensor(image) -> torch.Tensor:
    """A float [3,H,W] / [B,3,H,W] array or tensor in [-1, 1] → float32 [B,3,H,W] tensor, values untouched."""
    dtype = image.dtype
    if not (np.issubdtype(dtype, np.floating) if isinstance(image, np.ndarray) else dtype.is_floating_point):
        raise InputError(f"image tensor has dtype {dtype}; expected float in [-1, 1]: use x.float() / 127.5 - 1")
    x = torch.from_numpy(image) if isinstance(image, np.ndarray) else image
    if x.ndim not in (3, 4) or x.shape[-3] != 3 or x.numel() == 0:
        raise InputError(f"image tensor has shape {tuple(x.shape)}; expected [B,3,H,W] or [3,H,W] "
                         "(RGB, channels first: permute an [H,W,3] array with .permute(2, 0, 1))")
    x = (x[None] if x.ndim == 3 else x).float()
    if not torch.isfinite(x).all():
        raise InputError("image tensor contains NaN or Inf; expected finite values in [-1, 1]")
    lo, hi = (float(v) for v in torch.aminmax(x))
    if lo < -1 - 1e-6 or hi > 1 + 1e-6:
        raise InputError(f"image tensor has values in [{lo:g}, {hi:g}]; expected [-1, 1]: {_range_fix(lo, hi)}")
    return x


def _range_fix(lo: float, hi: float) -> str:
    """How to bring tensor values in [lo, hi] into [-1, 1]."""
    if lo >= -1.5 and hi <= 1.5:
        return "clamp it with x.clamp(-1, 1)"
    if lo >= 0 and hi <= 255:
        return "divide by 127.5 and subtract 1"
    return "divide by 32767.5 and subtract 1" if lo >= 0 and hi <= 65535 else "rescale it to [-1, 1]"


def _batch(tensors: list) -> torch.Tensor:
    """Concatenate per-image [B,3,H,W] tensors; all must share H and W."""
    if not tensors:
        raise InputError(f"{_WHAT}; got an empty list")
    sizes = {tuple(t.shape[2:]) for t in tensors}
    if len(sizes) > 1:
        raise InputError(f"image list has images of different sizes {sorted(sizes)}; pass size=(h, w) to resize them")
    return torch.cat([t.to(tensors[0].device) for t in tensors])
