"""No lost or mixed-up work: run folders, atomic phase files, checked resumes, safe replays; σ = 0;
img2img from the command line; A1111 metadata; NaN stops a run; exit codes (docs/cli.md)."""

import hashlib
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from demofusion.cli import main, read_png_params

RUN = ["--model", "tiny", "--prompt", "a lighthouse, at dawn: misty", "--negative-prompt", "blurry",
       "--height", "512", "--width", "512", "--steps", "2", "--no-progress"]


def snapshot(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run A (seed 1) stopped after phase 1, run B (seed 2) finished; both 512² (2 phases)."""
    d = tmp_path_factory.mktemp("runs")
    assert main(["generate", *RUN, "--seed", "1", "--out", str(d / "A"), "--stop-after-phase", "1"]) == 0
    assert main(["generate", *RUN, "--seed", "2", "--out", str(d / "B")]) == 0
    return d


def test_runs_without_out_keep_each_other(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    small = ["--model", "tiny", "--height", "256", "--width", "256", "--steps", "1", "--no-progress"]
    assert main(["generate", *small]) == 0
    assert main(["generate", *small]) == 0
    folders = sorted((tmp_path / "out").iterdir())
    assert len(folders) == 2 and all((f / "phase_1.png").is_file() for f in folders)
    assert all(re.fullmatch(r"\d{8}-\d{6}-seed0(-\d+)?", f.name) for f in folders), folders
    assert "writing to out" in capsys.readouterr().out


def test_existing_out_needs_overwrite_and_then_holds_only_the_new_run(runs, tmp_path, capsys):
    out = tmp_path / "reused"
    assert main(["generate", *RUN, "--seed", "2", "--out", str(out)]) == 0  # two phases
    assert main(["generate", *RUN, "--seed", "1", "--out", str(out), "--stop-after-phase", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["generate", *RUN, "--seed", "1", "--out", str(out), "--stop-after-phase", "1", "--overwrite"]) == 0
    # the older run's phase 2 is gone: a resume cannot mistake it for this run's
    assert not (out / "phase_2.safetensors").exists() and not (out / "phase_2.png").exists()
    assert main(["generate", "--resume", str(out), "--no-progress"]) == 0
    assert read_png_params(out / "phase_2.png")["seed"] == 1


def test_from_image_never_touches_its_source(runs, tmp_path, monkeypatch, capsys):
    source = runs / "B" / "phase_2.png"
    before = snapshot(runs / "B")
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--from-image", str(source), "--no-progress"]) == 0
    assert main(["generate", "--from-image", str(source), "--out", str(runs / "B"), "--overwrite"]) == 2
    assert "source picture" in capsys.readouterr().err
    assert snapshot(runs / "B") == before
    (replay,) = (tmp_path / "out").iterdir()
    assert np.array_equal(pixels(replay / "phase_2.png"), pixels(source))


def test_resume_refuses_a_foreign_phase_and_leaves_files_as_they_were(runs, tmp_path, capsys):
    import shutil

    a = tmp_path / "A"
    shutil.copytree(runs / "A", a)
    shutil.copy(runs / "B" / "phase_2.safetensors", a / "phase_2.safetensors")  # a later phase of another run
    before = snapshot(a)
    assert main(["generate", "--resume", str(a), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip()
    assert "phase_2.safetensors" in line and "another run" in line and len(line.splitlines()) == 1
    assert snapshot(a) == before


@pytest.mark.parametrize("damage", ["truncate", "random", "nan"])
def test_resume_refuses_a_damaged_phase(runs, tmp_path, capsys, damage):
    import shutil

    from safetensors.torch import save_file

    a = tmp_path / "A"
    shutil.copytree(runs / "A", a)
    f = a / "phase_1.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "random":
        f.write_bytes(np.random.default_rng(0).bytes(2000))
    else:
        z = load_file(str(f))["latents"]
        z[0, 0, 0, 0] = float("nan")
        save_file({"latents": z}, str(f), metadata={"run_id": json.loads((a / "run.json").read_text())["run_id"]})
    before = snapshot(a)
    assert main(["generate", "--resume", str(a), "--no-progress"]) == 2
    line = capsys.readouterr().err.strip()
    assert "phase_1.safetensors" in line and len(line.splitlines()) == 1
    assert snapshot(a) == before


def test_write_interrupted_mid_file_leaves_the_previous_file_or_none(runs, tmp_path, monkeypatch, capsys):
    import safetensors.torch as st

    real = st.save_file

    def half_then_ctrl_c(tensors, path, metadata=None):
        real(tensors, path, metadata=metadata)
        if "phase_2" in str(path):
            data = open(path, "rb").read()
            open(path, "wb").write(data[: len(data) // 2])
            raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", half_then_ctrl_c)
    out = tmp_path / "cut"
    assert main(["generate", *RUN, "--seed", "2", "--out", str(out)]) == 130
    assert "--resume" in capsys.readouterr().err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["phase_1.png", "phase_1.safetensors", "run.json"], names  # no half file, no temp file
    monkeypatch.setattr(st, "save_file", real)
    assert main(["generate", "--resume", str(out), "--no-progress"]) == 0
    assert np.array_equal(pixels(out / "phase_2.png"), pixels(runs / "B" / "phase_2.png"))


def test_sigma_zero_is_the_blur_switched_off_bit_for_bit(tmp_path):
    for name, flags in (("zero", ["--sigma", "0"]), ("off", ["--no-dilated-blur"]), ("on", [])):
        assert main(["generate", *RUN, "--out", str(tmp_path / name), *flags]) == 0
    z = {n: load_file(str(tmp_path / n / "phase_2.safetensors"))["latents"] for n in ("zero", "off", "on")}
    assert torch.isfinite(z["zero"]).all()
    assert torch.equal(z["zero"], z["off"])
    assert not torch.equal(z["zero"], z["on"])  # the blur does something, so the equality above means something


def test_img2img_from_the_command_line(tmp_path):
    rng = np.random.default_rng(0)
    rgba = np.concatenate([rng.integers(0, 256, (192, 256, 3)), np.full((192, 256, 1), 128)], -1).astype(np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "photo.png")
    out = tmp_path / "up"
    assert main(["generate", "--image", str(tmp_path / "photo.png"), "--model", "tiny", "--steps", "1",
                 "--no-progress", "--out", str(out)]) == 0
    # default target: the picture × 2 → 512×384 px (2 phases); phase 1 is the picture itself, upscaled by DemoFusion
    assert Image.open(out / "phase_2.png").size == (512, 384)
    meta = read_png_params(out / "phase_2.png")
    assert meta["image"] == str(tmp_path / "photo.png") and meta["width"] == 512 and meta["height"] == 384
    alias = tmp_path / "alias"
    assert main(["upscale", str(tmp_path / "photo.png"), "--model", "tiny", "--steps", "1", "--no-progress",
                 "--out", str(alias)]) == 0
    assert np.array_equal(pixels(alias / "phase_2.png"), pixels(out / "phase_2.png"))
    replay = tmp_path / "replay"
    assert main(["generate", "--from-image", str(out / "phase_2.png"), "--no-progress", "--out", str(replay)]) == 0
    assert np.array_equal(pixels(replay / "phase_2.png"), pixels(out / "phase_2.png"))


def parse_a1111(text):
    """A minimal reader of AUTOMATIC1111's ``parameters`` text, written independently of ours."""
    *head, last = text.strip().split("\n")
    prompt, negative, in_negative = [], [], False
    for line in head:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    pairs = {k.strip(): (json.loads(v) if v.startswith('"') else v.strip())
             for k, v in re.findall(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', last)}
    return "\n".join(prompt), "\n".join(negative), pairs


def test_png_parameters_in_a1111_format(runs):
    text = Image.open(runs / "B" / "phase_2.png").text["parameters"]
    prompt, negative, p = parse_a1111(text)
    assert prompt == "a lighthouse, at dawn: misty" and negative == "blurry"
    assert p["Steps"] == "2" and p["Sampler"] == "Euler" and p["CFG scale"] == "7.5" and p["Seed"] == "2"
    assert p["Size"] == "512x512" and p["Model hash"] == read_png_params(runs / "B" / "phase_2.png")["model_hash"]
    assert p["DemoFusion sigma"] == "0.8" and "DemoFusion view batch size" not in p  # auto (16 without a budget)


def test_nan_during_a_run_stops_it_and_nothing_nonfinite_is_saved(tmp_path, monkeypatch, capsys):
    from demofusion.unet import UNet

    forward = UNet.forward

    def nan_in_phase_2(self, x, t, *a, **k):
        out = forward(self, x, t, *a, **k)
        return out * float("nan") if x.shape[0] > 2 else out  # phase 1 is one view (× 2 for guidance)

    monkeypatch.setattr(UNet, "forward", nan_in_phase_2)
    out = tmp_path / "nan"
    assert main(["generate", *RUN, "--out", str(out)]) == 1
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "phase 2, step 1" in line and "NaN" in line and "Traceback" not in line
    assert sorted(p.name for p in out.iterdir()) == ["phase_1.png", "phase_1.safetensors", "run.json"]


def test_internal_errors_are_one_line_exit_1_and_debug_shows_them(tmp_path, monkeypatch, capsys):
    from demofusion.pipeline import DemoFusionPipeline

    def bug(self, *a, **k):
        raise ZeroDivisionError("a bug of ours")

    monkeypatch.setattr(DemoFusionPipeline, "__call__", bug)
    argv = ["generate", "--model", "tiny", "--height", "256", "--width", "256", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main([*argv, "--out", str(tmp_path / "b"), "--debug"])


def test_dry_run_checks_and_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--model", "tiny", "--dry-run"]) == 0  # the CLI defaults: 3072² on tiny
    out = capsys.readouterr().out
    assert "12 phase(s)" in out and "UNet evaluations" in out and "dry run" in out
    assert list(tmp_path.iterdir()) == []


def test_ablate_sigma_zero_cell_is_a_real_picture_with_metadata(tmp_path):
    out = tmp_path / "abl"
    assert main(["ablate", *RUN, "--grid", "no-dilated-blur", "--sweep", "sigma=0", "--out", str(out)]) == 0
    record = json.loads((out / "ablation.json").read_text())
    off, zero = (pixels(c["images"][-1]) for c in record["cells"])
    assert zero.std() > 0 and np.array_equal(zero, off)  # σ = 0 is the blur switched off, not a black image
    meta = read_png_params(record["cells"][1]["images"][-1])
    assert meta["sigma"] == 0.0 and meta["ablation"] == "sigma=0" and meta["phase"] == 2
    assert "Negative prompt: blurry" in Image.open(record["cells"][1]["images"][-1]).text["parameters"]
