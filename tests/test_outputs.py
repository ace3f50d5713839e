"""demofusion.outputs: atomic writes, A1111 PNG text, latents/JSON refusing NaN, output folders."""

import json
import os
import random
import re
from datetime import datetime

import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from demofusion.errors import InputError, NonFiniteError
from demofusion.outputs import (
    a1111_parameters,
    atomic_write,
    check_output_folder,
    load_latents,
    new_run_folder,
    read_png_params,
    save_latents,
    save_png,
    write_json,
)

# ---- an independent AUTOMATIC1111 "parameters" parser, written the way A1111's
# parse_generation_parameters reads the text: the last line holds `Key: value` pairs, the lines before it
# the prompt, and a line starting with `Negative prompt:` starts the negative prompt.
PAIR = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict:
    *lines, last = text.strip().split("\n")
    if len(PAIR.findall(last)) < 3:
        lines, last = lines + [last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in PAIR.findall(last):
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = json.loads(value)
        out[key.strip()] = value
    return out


BASE = dict(
    prompt="a photo of a lighthouse at dawn", negative_prompt="blurry", num_inference_steps=50, sampler="Euler",
    guidance_scale=7.5, seed=0, height=2048, width=3072, model_hash="abcdef0123456789", model="sdxl-base",
    phases=3, view_batch_size=16, stride=64, cosine_scale_1=3.0, cosine_scale_2=1.0, cosine_scale_3=1.0,
    sigma=0.8, multi_decoder=True, skip_residual=True, local_paths=True, dilated_sampling=True,
    dilated_blur=True, renormalise=True, view_jitter=False, version="0.1.0",
)
EXPECTED = {
    "Steps": "50", "Sampler": "Euler", "CFG scale": "7.5", "Seed": "0", "Size": "3072x2048",
    "Model hash": "abcdef0123456789", "Model": "sdxl-base", "DemoFusion phases": "3",
    "DemoFusion view batch size": "16", "DemoFusion stride": "64", "DemoFusion cosine scale 1": "3.0",
    "DemoFusion cosine scale 2": "1.0", "DemoFusion cosine scale 3": "1.0", "DemoFusion sigma": "0.8",
    "DemoFusion multi decoder": "True", "DemoFusion skip residual": "True", "DemoFusion local paths": "True",
    "DemoFusion dilated sampling": "True", "DemoFusion dilated blur": "True", "DemoFusion renormalise": "True",
    "DemoFusion view jitter": "False", "Version": "demofusion 0.1.0",
}


def test_a1111_text_layout():
    text = a1111_parameters(BASE)
    lines = text.split("\n")
    assert lines[0] == BASE["prompt"]
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 50, Sampler: Euler, CFG scale: 7.5, Seed: 0, Size: 3072x2048, Model hash: ")
    assert len(lines) == 3


@pytest.mark.parametrize("changes, expected", [
    ({}, {}),
    ({"prompt": 'a castle, at dusk: 8k, "epic" (detailed:1.2)'}, {}),
    ({"prompt": "line one, with commas\nline two: colon\n\nline four"}, {}),
    ({"negative_prompt": "lowres, bad anatomy\nwatermark: text"}, {}),
    ({"negative_prompt": ""}, {}),
    ({"negative_prompt": None, "sampler": "Euler a"}, {"Sampler": "Euler a"}),
    ({"model": 'my model, v2: "final"'}, {"Model": 'my model, v2: "final"'}),
    ({"phase": 2, "seed": 123456789}, {"DemoFusion phase": "2", "Seed": "123456789"}),
    ({"image": "/home/x/in, put.png", "strength": 0.6},
     {"DemoFusion init image": "in, put.png", "Denoising strength": "0.6"}),
    ({"phase_sizes": [[1024, 1024], [2048, 3072]]}, {"DemoFusion phase sizes": "1024x1024,2048x3072"}),
])
def test_a1111_text_parses_back(changes, expected):
    params = {**BASE, **changes}
    parsed = parse_a1111(a1111_parameters(params))
    assert parsed["Prompt"] == params["prompt"]
    assert parsed["Negative prompt"] == (params["negative_prompt"] or "")
    want = {**EXPECTED, **expected}
    assert {k: parsed.get(k) for k in want} == want
    assert set(parsed) - set(want) == {"Prompt", "Negative prompt"}


def test_a1111_text_skips_missing_values():
    text = a1111_parameters({"prompt": "x", "num_inference_steps": 4, "seed": None, "width": 64, "height": 32})
    assert text == f"x\nSteps: 4, Size: 64x32, Version: demofusion {__import__('demofusion').__version__}"


# ---- PNG -----------------------------------------------------------------------------------------
def _image():
    return Image.new("RGB", (8, 6), (10, 200, 30))


def test_png_round_trip(tmp_path):
    path = tmp_path / "phase_1.png"
    params = {**BASE, "prompt": "東京の夜, neon: rain", "phase": 1}
    save_png(_image(), path, params)
    assert read_png_params(path) == params
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (8, 6)
        assert im.text["parameters"] == a1111_parameters(params)
    assert sorted(os.listdir(tmp_path)) == ["phase_1.png"]


def test_save_png_refuses_nan_and_keeps_old_file(tmp_path):
    path = tmp_path / "p.png"
    save_png(_image(), path, BASE)
    before = path.read_bytes()
    with pytest.raises(InputError, match="guidance_scale"):
        save_png(_image(), path, {**BASE, "guidance_scale": float("nan")})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["p.png"]


def _png_with_text(path, **chunks):
    info = PngInfo()
    for k, v in chunks.items():
        info.add_text(k, v)
    _image().save(path, pnginfo=info)


@pytest.mark.parametrize("make, message", [
    (None, "--from-image {p}: no such file"),
    (lambda p: p.write_text("hello"), "--from-image {p}: not a readable image"),
    (lambda p: p.write_bytes(random.Random(0).randbytes(500)), "not a readable image"),
    (lambda p: _image().save(p, format="JPEG"), "is a JPEG image"),
    (lambda p: _png_with_text(p, parameters="x"), "carries no demofusion metadata (was it written by"),
    (lambda p: _png_with_text(p, demofusion="{not json"), "not valid JSON"),
    (lambda p: _png_with_text(p, demofusion='{"a": NaN}'), "not a JSON object of finite values"),
    (lambda p: _png_with_text(p, demofusion="[1, 2]"), "not a JSON object"),
])
def test_read_png_params_errors(tmp_path, make, message):
    p = tmp_path / "x.png"
    if make:
        make(p)
    before = p.read_bytes() if p.exists() else None
    with pytest.raises(InputError) as e:
        read_png_params(p)
    assert message.format(p=p) in str(e.value) and "\n" not in str(e.value)
    assert (p.read_bytes() if p.exists() else None) == before


# ---- atomic writes -------------------------------------------------------------------------------
def _half_writer(data: bytes, exc: BaseException):
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            raise exc
    return write


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_write_keeps_previous_file(tmp_path, exc):
    path = tmp_path / "phase_1.png"
    atomic_write(path, lambda tmp: tmp.write_bytes(b"old complete file" * 100))
    before = path.read_bytes()
    with pytest.raises(type(exc)):
        atomic_write(path, _half_writer(b"new" * 1000, exc))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["phase_1.png"]


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_interrupted_first_write_leaves_nothing(tmp_path, exc):
    with pytest.raises(type(exc)):
        atomic_write(tmp_path / "run.json", _half_writer(b"{}" * 1000, exc))
    assert os.listdir(tmp_path) == []


def test_temp_file_is_hidden_beside_target_with_same_suffix(tmp_path):
    seen = []
    atomic_write(tmp_path / "phase_1.png", lambda tmp: (seen.append(tmp), tmp.write_bytes(b"x")))
    assert seen[0].parent == tmp_path
    assert seen[0].name.startswith(".phase_1.png.tmp-") and seen[0].suffix == ".png"
    assert os.listdir(tmp_path) == ["phase_1.png"]


# ---- JSON and latents ----------------------------------------------------------------------------
def test_write_json_round_trip_and_refuses_nan(tmp_path):
    path = tmp_path / "run.json"
    write_json(path, {"b": 1, "a": [1.5, "x"]})
    assert json.loads(path.read_text()) == {"a": [1.5, "x"], "b": 1}
    before = path.read_bytes()
    with pytest.raises(InputError, match=r"sizes\.k\[1\] = inf"):
        write_json(path, {"sizes": {"k": [1.0, float("inf")]}})
    assert path.read_bytes() == before
    with pytest.raises(InputError, match="nan"):
        write_json(tmp_path / "new.json", {"x": float("nan")})
    assert sorted(os.listdir(tmp_path)) == ["run.json"]


def test_latents_round_trip(tmp_path):
    path = tmp_path / "phase_1.safetensors"
    t = torch.randn(1, 4, 8, 6).transpose(2, 3)  # non-contiguous on purpose
    save_latents(path, t, {"phase": "1"})
    back, meta = load_latents(path)
    assert torch.equal(back, t) and meta == {"phase": "1"}
    assert os.listdir(tmp_path) == ["phase_1.safetensors"]


def test_save_latents_refuses_nan(tmp_path):
    path = tmp_path / "phase_1.safetensors"
    save_latents(path, torch.zeros(1, 4, 2, 2), {})
    before = path.read_bytes()
    bad = torch.zeros(1, 4, 2, 2)
    bad[0, 1, 1, 1] = float("nan")
    with pytest.raises(NonFiniteError) as e:
        save_latents(path, bad, {})
    assert "1 of 16" in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["phase_1.safetensors"]


@pytest.mark.parametrize("damage", [
    lambda b: b[: len(b) // 2], lambda b: b[:-4], lambda b: b[:5], lambda b: b"",
    lambda b: random.Random(1).randbytes(len(b)),
])
def test_load_latents_damaged_files(tmp_path, damage):
    good = tmp_path / "good.safetensors"
    save_latents(good, torch.randn(1, 4, 16, 16), {"phase": "1"})
    bad = tmp_path / "phase_2.safetensors"
    bad.write_bytes(damage(good.read_bytes()))
    with pytest.raises(InputError) as e:
        load_latents(bad)
    msg = str(e.value)
    assert str(bad) in msg and "delete it or start a new run" in msg and "\n" not in msg


def test_load_latents_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such"):
        load_latents(tmp_path / "nope.safetensors")


# ---- output folders ------------------------------------------------------------------------------
def test_new_run_folder_same_second(tmp_path):
    now = datetime(2024, 1, 2, 3, 4, 5)
    a = new_run_folder(tmp_path / "out", seed=7, now=now)
    b = new_run_folder(tmp_path / "out", seed=7, now=now)
    assert a.name == "20240102-030405-seed7" and b.name == "20240102-030405-seed7-2"
    assert a.is_dir() and b.is_dir()
    assert new_run_folder(tmp_path / "out", now=now).name == "20240102-030405"


def test_new_run_folder_under_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="cannot create a run folder"):
        new_run_folder(tmp_path / "f" / "out", seed=1)


def test_check_output_folder_ok_cases(tmp_path):
    check_output_folder(tmp_path / "a" / "b", overwrite=False)  # created with parents
    assert (tmp_path / "a" / "b").is_dir() and os.listdir(tmp_path / "a" / "b") == []
    (tmp_path / "a" / "b" / ".DS_Store").write_text("")
    check_output_folder(tmp_path / "a" / "b", overwrite=False)  # hidden files only: still empty
    (tmp_path / "a" / "b" / "phase_1.png").write_text("")
    check_output_folder(tmp_path / "a" / "b", overwrite=True)


def test_check_output_folder_errors(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match=r"--out .*file\.txt: is a file; give a folder"):
        check_output_folder(tmp_path / "file.txt", overwrite=True)
    with pytest.raises(InputError, match="cannot create it"):
        check_output_folder(tmp_path / "file.txt" / "sub", overwrite=False)
    full = tmp_path / "full"
    full.mkdir()
    for name in ["run.json", "phase_1.png", "phase_1.safetensors", "phase_2.png"]:
        (full / name).write_text("")
    with pytest.raises(InputError) as e:
        check_output_folder(full, overwrite=False, option="--out")
    msg = str(e.value)
    assert "(phase_1.png, phase_1.safetensors, phase_2.png, …)" in msg
    assert "--overwrite" in msg and f"--resume {full}" in msg and "\n" not in msg


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_check_output_folder_unwritable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(InputError, match="not writable"):
            check_output_folder(locked, overwrite=False)
        with pytest.raises(InputError, match="cannot create it"):
            check_output_folder(locked / "sub", overwrite=False)
    finally:
        locked.chmod(0o700)
