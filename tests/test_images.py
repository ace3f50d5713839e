"""demofusion.images: every PIL mode → [B,3,H,W] in [-1, 1], tensor checks, errors, resizing and output helpers.

Expected values are computed independently here from the raw numpy pixel values; the tolerance is 1e-6 (absolute)
on the [-1, 1] float32 result. For CMYK / YCbCr / LAB / HSV the documented rule is PIL's ``convert("RGB")``.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from demofusion.errors import InputError
from demofusion.images import image_to_tensor, load_image, tensor_to_pil, tensor_to_unit

H, W = 5, 6
TOL = 1e-6
RNG = np.random.default_rng(0)


def _u8(*shape):
    """Random uint8 pixels with both extremes 0 and 255 present."""
    a = RNG.integers(0, 256, size=(H, W) + shape, dtype=np.uint8)
    a.flat[0], a.flat[-1] = 0, 255
    return a


def _frombytes(mode, arr):
    return Image.frombytes(mode, (W, H), np.ascontiguousarray(arr).tobytes())


def _expect(rgb01):
    """[H,W,3] (or [H,W] grey) float in [0, 1] → [1,3,H,W] float32 tensor in [-1, 1]."""
    rgb01 = np.asarray(rgb01, dtype=np.float64)
    if rgb01.ndim == 2:
        rgb01 = np.repeat(rgb01[..., None], 3, axis=2)
    return torch.from_numpy(rgb01 * 2 - 1).permute(2, 0, 1)[None].float()


def _check(img, expected, **kw):
    out = image_to_tensor(img, **kw)
    assert out.dtype == torch.float32 and out.shape == (1, 3, H, W)
    torch.testing.assert_close(out, expected, atol=TOL, rtol=0)


def _composite(colour, alpha, bg=(255, 255, 255)):
    a = alpha[..., None] / 255.0
    return (colour * a + np.asarray(bg, dtype=np.float64) * (1 - a)) / 255.0


def _one_line_error(fn, *args, must=("image",), **kw):
    with pytest.raises(InputError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    for word in must:
        assert word in msg, msg
    return msg


# --- PIL modes -----------------------------------------------------------------------------------------------------

def test_mode_1():
    bits = RNG.integers(0, 2, size=(H, W)).astype(bool)
    bits.flat[0], bits.flat[-1] = False, True
    img = Image.fromarray(bits)
    assert img.mode == "1"
    _check(img, _expect(bits.astype(np.float64)))


def test_mode_L_and_RGB():
    grey, rgb = _u8(), _u8(3)
    _check(_frombytes("L", grey), _expect(grey / 255.0))
    _check(_frombytes("RGB", rgb), _expect(rgb / 255.0))


def test_mode_RGBA_LA_composited_on_white():
    rgba, la = _u8(4), _u8(2)
    _check(_frombytes("RGBA", rgba), _expect(_composite(rgba[..., :3].astype(np.float64), rgba[..., 3])))
    grey = np.repeat(la[..., :1].astype(np.float64), 3, axis=2)
    _check(_frombytes("LA", la), _expect(_composite(grey, la[..., 1])))


def test_mode_RGBa_premultiplied():
    rgb, alpha = _u8(3), _u8()
    premult = np.floor(rgb.astype(np.float64) * alpha[..., None] / 255).astype(np.uint8)
    img = _frombytes("RGBa", np.concatenate([premult, alpha[..., None]], axis=2))
    assert img.mode == "RGBa"
    expected = np.clip((premult + 255.0 * (1 - alpha[..., None] / 255.0)) / 255.0, 0, 1)
    _check(img, _expect(expected))


def _palette_image():
    palette = RNG.integers(0, 256, size=(256, 3), dtype=np.uint8)
    palette[0], palette[1] = (0, 0, 0), (255, 255, 255)
    idx = RNG.integers(0, 8, size=(H, W), dtype=np.uint8)
    idx.flat[0], idx.flat[1] = 0, 1
    return idx, palette


def test_mode_P_palette_lookup():
    idx, palette = _palette_image()
    img = _frombytes("P", idx)
    img.putpalette(palette.tobytes())
    _check(img, _expect(palette[idx] / 255.0))


def test_mode_P_with_transparency_index_and_table():
    idx, palette = _palette_image()
    img = _frombytes("P", idx)
    img.putpalette(palette.tobytes())
    img.info["transparency"] = 2  # one fully transparent index
    alpha = np.where(idx == 2, 0, 255)
    _check(img, _expect(_composite(palette[idx].astype(np.float64), alpha)))
    table = RNG.integers(0, 256, size=256, dtype=np.uint8)
    img.info["transparency"] = table.tobytes()  # per-index alpha (PNG tRNS)
    _check(img, _expect(_composite(palette[idx].astype(np.float64), table[idx])))


def test_mode_P_with_rgba_palette():
    idx, palette = _palette_image()
    alpha = RNG.integers(0, 256, size=256, dtype=np.uint8)
    img = _frombytes("P", idx)
    img.putpalette(np.concatenate([palette, alpha[:, None]], axis=1).tobytes(), rawmode="RGBA")
    _check(img, _expect(_composite(palette[idx].astype(np.float64), alpha[idx])))


def test_mode_PA():
    idx, palette = _palette_image()
    alpha = _u8()
    img = _frombytes("PA", np.stack([idx, alpha], axis=2))
    img.putpalette(palette.tobytes())
    assert img.mode == "PA"
    _check(img, _expect(_composite(palette[idx].astype(np.float64), alpha)))


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "LAB", "HSV"])
def test_colour_spaces_follow_pil_convert(mode):
    img = _frombytes(mode, _u8(len(mode) if mode != "YCbCr" else 3))
    _check(img, _expect(np.asarray(img.convert("RGB")) / 255.0))


@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2")])
def test_16_bit_modes_keep_full_precision(mode, dtype):
    arr = RNG.integers(0, 65536, size=(H, W)).astype(np.uint16)
    arr.flat[0], arr.flat[1], arr.flat[2], arr.flat[3] = 0, 65535, 32768, 257
    img = _frombytes(mode, arr.astype(dtype))
    assert img.mode == mode
    out = image_to_tensor(img)
    torch.testing.assert_close(out, _expect(arr / 65535.0), atol=TOL, rtol=0)
    assert out[0, 0, 0, 1].item() == 1.0 and out[0, 0, 0, 0].item() == -1.0
    assert abs(out[0, 0, 0, 2].item() - (32768 / 65535 * 2 - 1)) < TOL  # mid grey, not clipped to white
    assert abs(out[0, 0, 0, 3].item() - (257 / 65535 * 2 - 1)) < TOL  # 16-bit precision, not rounded to 8 bits


def test_mode_I_8_bit_16_bit_and_out_of_range():
    small = RNG.integers(0, 256, size=(H, W)).astype(np.int32)
    small.flat[-1] = 255
    _check(Image.fromarray(small), _expect(small / 255.0))
    wide = RNG.integers(0, 65536, size=(H, W)).astype(np.int32)
    wide.flat[-1] = 65535
    _check(Image.fromarray(wide), _expect(wide / 65535.0))
    _one_line_error(image_to_tensor, Image.fromarray(np.full((H, W), 70000, np.int32)), must=("image", "70000"))
    _one_line_error(image_to_tensor, Image.fromarray(np.full((H, W), -1, np.int32)), must=("image", "-1"))


def test_mode_F():
    arr = RNG.random((H, W)).astype(np.float32)
    arr.flat[0], arr.flat[-1] = 0.0, 1.0
    img = Image.fromarray(arr)
    assert img.mode == "F"
    _check(img, _expect(arr.astype(np.float64)))
    msg = _one_line_error(image_to_tensor, Image.fromarray(arr * 255), must=("image", "[0, 1]"))
    assert "255" in msg
    arr[2, 2] = np.nan
    _one_line_error(image_to_tensor, Image.fromarray(arr), must=("image", "NaN"))


def test_custom_background():
    rgba = _u8(4)
    rgba[0, 0, 3] = 0
    out = image_to_tensor(_frombytes("RGBA", rgba), background=(10, 200, 30))
    expected = _expect(_composite(rgba[..., :3].astype(np.float64), rgba[..., 3], bg=(10, 200, 30)))
    torch.testing.assert_close(out, expected, atol=TOL, rtol=0)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([10, 200, 30]) / 127.5 - 1, atol=TOL, rtol=0)
    _one_line_error(image_to_tensor, _frombytes("RGBA", rgba), background="white", must=("background",))
    _one_line_error(image_to_tensor, _frombytes("RGBA", rgba), background=(0, 0, 300), must=("background",))


# --- resizing, batches, files ----------------------------------------------------------------------------------

def test_resize_pil_8_bit_matches_lanczos_and_float_path_stays_in_range():
    rgb = _u8(3)
    out = image_to_tensor(_frombytes("RGB", rgb), size=(10, 8))
    assert out.shape == (1, 3, 10, 8)
    ref = np.asarray(_frombytes("RGB", rgb).resize((8, 10), Image.LANCZOS)) / 255.0
    torch.testing.assert_close(out, torch.from_numpy(ref * 2 - 1).permute(2, 0, 1)[None].float(), atol=TOL, rtol=0)
    wide = _frombytes("I;16", RNG.integers(0, 65536, size=(H, W)).astype("<u2"))
    out16 = image_to_tensor(wide, size=(3, 4))
    assert out16.shape == (1, 3, 3, 4) and out16.min() >= -1 and out16.max() <= 1
    assert image_to_tensor(wide, size=(H, W)).shape == (1, 3, H, W)


def test_resize_tensor():
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    out = image_to_tensor(x, size=(4, 6))
    assert out.shape == (2, 3, 4, 6) and out.min() >= -1 and out.max() <= 1


def test_list_of_images_is_a_batch():
    a, b = _u8(3), _u8(3)
    out = image_to_tensor([_frombytes("RGB", a), _frombytes("L", b[..., 0])])
    assert out.shape == (2, 3, H, W)
    torch.testing.assert_close(out[1:], _expect(b[..., 0] / 255.0), atol=TOL, rtol=0)
    small = Image.new("RGB", (3, 3))
    _one_line_error(image_to_tensor, [_frombytes("RGB", a), small], must=("image", "size"))
    assert image_to_tensor([_frombytes("RGB", a), small], size=(4, 4)).shape == (2, 3, 4, 4)
    _one_line_error(image_to_tensor, [])


def test_paths_and_16_bit_png(tmp_path):
    arr = RNG.integers(0, 65536, size=(H, W)).astype(np.uint16)
    arr.flat[0], arr.flat[1] = 32768, 65535
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    for p in (path, str(path)):
        torch.testing.assert_close(image_to_tensor(p), _expect(arr / 65535.0), atol=TOL, rtol=0)
    assert load_image(path).size == (W, H)


def test_bad_paths(tmp_path):
    text = tmp_path / "photo.txt"
    text.write_text("not an image\n")
    msg = _one_line_error(load_image, text, must=("--image", "photo.txt", "not an image file"))
    assert msg.startswith("--image ")
    _one_line_error(load_image, tmp_path / "missing.png", must=("--image", "missing.png"))
    _one_line_error(image_to_tensor, text, must=("image", "photo.txt"))
    _one_line_error(image_to_tensor, str(tmp_path / "missing.png"), must=("image", "missing.png"))


# --- tensors and other inputs -------------------------------------------------------------------------------------

def test_tensors_in_range_pass_unchanged():
    x = torch.rand(2, 3, 4, 5) * 2 - 1
    x[0, 0, 0, 0], x[0, 0, 0, 1] = -1.0, 1.0 + 5e-7  # within the 1e-6 tolerance, not clamped
    out = image_to_tensor(x)
    assert out is x or (out.dtype == x.dtype and torch.equal(out, x))
    assert out[0, 0, 0, 1].item() == x[0, 0, 0, 1].item()
    assert torch.equal(image_to_tensor(x[1]), x[1:])
    assert torch.equal(image_to_tensor(x.numpy()), x)
    assert torch.equal(image_to_tensor(x, size=(4, 5)), x)


@pytest.mark.parametrize("bad,words", [
    (torch.rand(1, 3, 4, 4) * 255, ("image", "values in [", "divide by 127.5 and subtract 1")),
    (torch.full((1, 3, 4, 4), float("nan")), ("image", "NaN")),
    (torch.zeros(1, 4, 4, 4), ("image", "(1, 4, 4, 4)")),
    (torch.zeros(4, 4), ("image", "shape")),
    (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), ("image", "uint8")),
    (np.zeros((1, 3, 4, 4), dtype=np.int64), ("image", "int64")),
    (np.full((3, 4, 4), 2.0, dtype=np.float32), ("image", "[2, 2]")),
    (None, ("image must be", "got NoneType")),
    (3, ("image must be", "got int")),
    ({"a": 1}, ("image must be", "got dict")),
])
def test_bad_inputs_raise_one_line_input_error(bad, words):
    _one_line_error(image_to_tensor, bad, must=words)


def test_error_message_for_int():
    msg = _one_line_error(image_to_tensor, 3)
    assert msg == "image must be a PIL image, a path to an image file, or a [B,3,H,W] tensor in [-1, 1]; got int"


def test_255_tensor_message_names_range():
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0, 0, 0] = 255
    msg = _one_line_error(image_to_tensor, x)
    assert "values in [0, 255]" in msg and "divide by 127.5 and subtract 1" in msg


# --- output helpers -------------------------------------------------------------------------------------------

def test_tensor_to_pil_round_trip_and_unit():
    rgb = _u8(3)
    x = image_to_tensor(_frombytes("RGB", rgb))
    (pil,) = tensor_to_pil(x)
    assert pil.mode == "RGB" and pil.size == (W, H)
    assert np.array_equal(np.asarray(pil), rgb)
    unit = tensor_to_unit(torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]))
    assert torch.equal(unit, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert len(tensor_to_pil(torch.zeros(2, 3, 2, 2))) == 2


def test_mode_La_premultiplied():
    grey, alpha = _u8(), _u8()
    premult = np.floor(grey.astype(np.float64) * alpha / 255).astype(np.uint8)
    img = _frombytes("La", np.stack([premult, alpha], axis=2))
    assert img.mode == "La"
    _check(img, _expect(np.clip((premult + 255.0 * (1 - alpha / 255.0)) / 255.0, 0, 1)))
