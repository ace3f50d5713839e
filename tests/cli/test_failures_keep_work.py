"""No lost or mixed work and no replay that reproduces something else: what a user sees
(exit code, exactly one `error:` line, no traceback) and the output folder, byte for byte.

Every check runs before anything is deleted or written (a late one leaves the folder as it was);
one run at a time holds a folder; a resume re-decodes a picture whose latents were saved; an edited
run.json is refused; a replay compares every recorded hash; a --prompts batch checks every line
first; a full disk is one line and the resume then finishes; files get the umask's mode.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from demofusion.cli import main

SMALL = ["--model", "tiny", "--prompt", "a lighthouse", "--height", "512", "--width", "256", "--steps", "1",
         "--no-progress"]  # two phases: 256×256 → 256×512


def snapshot(folder: Path) -> dict:
    """Every file under ``folder``, hidden ones too (temp and lock files count), by content."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error(capsys, argv, code=2) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == code and len(lines) == 1 and "Traceback" not in err, (rc, err)
    return lines[0]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished two-phase run."""
    out = tmp_path_factory.mktemp("finished") / "A"
    assert main(["generate", *SMALL, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """A kohya LoRA (rank 1) on every attention query of the tiny UNet."""
    import torch
    from safetensors.torch import save_file

    import demofusion as df

    unet = df.DemoFusionPipeline.from_pretrained("tiny", device="cpu").unet
    g, sd = torch.Generator().manual_seed(0), {}
    for name, m in unet.named_modules():
        if name.endswith("to_q") and isinstance(m, torch.nn.Linear):
            key = "lora_unet_" + name.replace(".", "_")
            sd[f"{key}.lora_down.weight"] = torch.randn(1, m.in_features, generator=g) / m.in_features ** 0.5
            sd[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 1, generator=g) * 0.5
            sd[f"{key}.alpha"] = torch.tensor(1.0)
    path = tmp_path_factory.mktemp("lora") / "good.safetensors"
    save_file(sd, str(path))
    return path


# ---- a late check never costs the old run ---------------------------------------------------------
@pytest.mark.parametrize("trigger", ["budget", "nan-scale"])
def test_overwrite_keeps_the_old_run_when_a_check_fails(finished, lora, tmp_path, capsys, trigger):
    a = tmp_path / "A"
    shutil.copytree(finished, a)
    before = snapshot(a)
    flags = ["--max-memory", "1MB"] if trigger == "budget" else ["--lora", f"{lora}:nan"]
    line = one_error(capsys, ["generate", *SMALL, "--seed", "5", *flags, "--overwrite", "--out", str(a)])
    assert ("--max-memory" in line) if trigger == "budget" else ("--lora" in line and "finite" in line)
    assert snapshot(a) == before


def test_too_small_budget_writes_nothing_and_speaks_cli_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "new"
    line = one_error(capsys, ["generate", *SMALL, "--device", "cpu", "--max-memory", "1MB", "--out", str(out)])
    assert not out.exists()  # nothing written, so the corrected run is not refused
    assert "--max-memory" in line and "=" not in line and "--device" not in line and "output_type" not in line
    need = float(re.search(r"at least ([\d.]+) MiB", line).group(1))
    assert need < 832  # the CUDA context and workspaces (832 MiB) are not counted on the CPU
    assert main(["generate", *SMALL, "--device", "cpu", "--max-memory", f"{need + 1}MiB", "--out", str(out)]) == 0
    assert (out / "phase_2.png").is_file()


# ---- every "final image" exists -------------------------------------------------------------------
def test_resume_decodes_a_missing_picture_again(finished, tmp_path, capsys):
    r = tmp_path / "r"
    shutil.copytree(finished, r)
    (r / "phase_2.png").unlink()
    assert main(["generate", "--resume", str(r), "--no-progress"]) == 0
    final = re.search(r"final image (\S+)", capsys.readouterr().out).group(1)
    assert Path(final) == r / "phase_2.png" and Path(final).is_file()
    assert np.array_equal(pixels(final), pixels(finished / "phase_2.png"))
    assert Image.open(final).text["demofusion"] == Image.open(finished / "phase_2.png").text["demofusion"]


def test_a_write_failing_between_latents_and_picture_is_finished_by_resume(finished, tmp_path, capsys, monkeypatch):
    real = os.replace

    def full_at_the_picture(src, dst):
        if Path(dst).name == "phase_2.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", full_at_the_picture)
    out = tmp_path / "w"
    line = one_error(capsys, ["generate", *SMALL, "--out", str(out)])
    assert str(out) in line and "No space left" in line and f"--resume {out}" in line
    names = sorted(p.name for p in out.iterdir())
    assert names == ["phase_1.png", "phase_1.safetensors", "phase_2.safetensors", "run.json"], names  # no temp file
    monkeypatch.setattr(os, "replace", real)
    assert main(["generate", "--resume", str(out), "--no-progress"]) == 0
    assert np.array_equal(pixels(out / "phase_2.png"), pixels(finished / "phase_2.png"))


# ---- one run per folder -----------------------------------------------------------------------------
def test_a_second_run_into_a_busy_folder_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "busy"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "demofusion", "generate", *SMALL, "--steps", "3", "--out", str(out)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lock = out / ".demofusion.lock"
        while first.poll() is None and not (lock.is_file() and lock.read_text().strip()):
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()  # still running: it holds the folder
        line = one_error(capsys, ["generate", *SMALL, "--seed", "9", "--overwrite", "--out", str(out)])
        assert f"PID {first.pid}" in line and "in use" in line
        assert first.wait(timeout=600) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
    run = json.loads((out / "run.json").read_text())
    assert run["seed"] == 0 and not (out / ".demofusion.lock").exists()
    assert main(["generate", "--resume", str(out), "--no-progress"]) == 0  # one run's files: resumable


# ---- an edited run.json ---------------------------------------------------------------------------
def test_resume_refuses_an_edited_run_json(tmp_path, capsys):
    out = tmp_path / "e"
    assert main(["generate", *SMALL, "--out", str(out), "--stop-after-phase", "1"]) == 0
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "num_inference_steps": 5}, indent=2))
    before = snapshot(out)
    line = one_error(capsys, ["generate", "--resume", str(out), "--no-progress"])
    assert "run.json was edited" in line and run["run_id"] in line
    assert snapshot(out) == before


# ---- replays compare every recorded hash ------------------------------------------------------------
def test_from_image_refuses_changed_files_unless_told(tmp_path, lora, capsys):
    photo, style = tmp_path / "photo.png", tmp_path / "style.safetensors"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(photo)
    shutil.copy(lora, style)
    src = tmp_path / "src"
    assert main(["generate", "--model", "tiny", "--image", str(photo), "--lora", f"{style}:0.5", "--steps", "1",
                 "--no-progress", "--out", str(src)]) == 0
    png = src / "phase_1.png"  # 128² × 2 = the base size: one phase
    meta = json.loads(Image.open(png).text["demofusion"])

    Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)).save(photo)  # another picture, same name
    line = one_error(capsys, ["generate", "--from-image", str(png), "--no-progress", "--out", str(tmp_path / "x")])
    assert str(photo) in line and meta["image_sha256"] in line and "--ignore-hashes" in line
    assert not (tmp_path / "x").exists()
    rc = main(["generate", "--from-image", str(png), "--ignore-hashes", "--no-progress", "--out", str(tmp_path / "y")])
    err = capsys.readouterr().err
    assert rc == 0 and "warning:" in err and str(photo) in err and "error:" not in err

    shutil.copy(png, tmp_path / "replay.png")  # the LoRA file changes: a replay of the original picture is refused
    data = bytearray(style.read_bytes())
    data[-1] ^= 1
    style.write_bytes(bytes(data))
    line = one_error(capsys, ["generate", "--from-image", str(tmp_path / "replay.png"), "--image", str(photo),
                              "--no-progress", "--out", str(tmp_path / "z")])
    assert str(style) in line and meta["lora_hash"][0] in line
    # a LoRA given on the command line replaces the recorded one: not compared (nor tiny's fused weights)
    assert main(["generate", "--from-image", str(tmp_path / "replay.png"), "--image", str(photo), "--lora",
                 f"{lora}:0.5", "--no-progress", "--out", str(tmp_path / "v")]) == 0
    assert "error:" not in capsys.readouterr().err


# ---- every line of a --prompts file is checked first ------------------------------------------------
def test_prompts_batch_checks_every_line_and_seed_first(tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("# two prompts\na lighthouse\n\na castle\n")
    out = tmp_path / "batch"
    line = one_error(capsys, ["generate", "--model", "tiny", "--height", "256", "--width", "256", "--steps", "1",
                              "--no-progress", "--prompts", str(f), "--seed", str(2**64 - 1), "--out", str(out)])
    assert f"--prompts {f} line 4" in line and "--seed" in line and str(2**64) in line
    assert not out.exists()  # no image, no manifest


# ---- a full disk ------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({(r.stderr or r.stdout).strip()[:100]}); needs root")
    yield d
    subprocess.run(["umount", str(d)], check=False)


def test_full_disk_is_one_line_and_resume_finishes(finished, small_disk, capsys):
    out = small_disk / "run"
    line = one_error(capsys, ["generate", *SMALL, "--out", str(out)])
    assert str(out) in line and "No space left" in line and f"--resume {out}" in line
    assert sorted(p.name for p in out.iterdir()) == ["phase_1.png", "phase_1.safetensors", "run.json"]  # no temp
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    assert main(["generate", "--resume", str(out), "--no-progress"]) == 0
    assert np.array_equal(pixels(out / "phase_2.png"), pixels(finished / "phase_2.png"))


# ---- smaller: one mode for every file, the umask's ----------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_file_gets_the_umask_mode(tmp_path, umask):
    import torch

    from demofusion.outputs import save_latents, save_png, write_json

    old = os.umask(umask)
    try:
        save_latents(tmp_path / "phase_1.safetensors", torch.zeros(1, 4, 8, 8))
        save_png(Image.new("RGB", (8, 8)), tmp_path / "phase_1.png", {"seed": 0})
        write_json(tmp_path / "run.json", {"seed": 0})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o666 & ~umask}, modes
