"""What a new user still broke (issue 21, items 7–11, 13, 16 and the smaller ones): each case is the
outcome the user sees — exit code, exactly one `error:` line (none for a closed pipe), no traceback,
nothing written — on the tiny model and tiny files."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from demofusion.cli import main

SMALL = ["--model", "tiny", "--height", "512", "--width", "512", "--steps", "1", "--no-progress"]


def one_error(capsys, argv, *words, code=2) -> str:
    """Run the CLI in-process; exactly one `error:` line holding ``words``, exit ``code``."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if not ln.startswith(("warning:", "note:"))]
    assert rc == code, (rc, err)
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "internal error" not in lines[0], lines[0]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ---- 8: a tiny σ is the limit (no blur), never NaN ----------------------------------------------
@pytest.mark.parametrize("std", [1e-30, 1e-200, torch.tensor(1e-30), torch.tensor(1e-44)])
def test_tiny_sigma_kernel_is_the_identity(std):
    from demofusion.ops.blur import gaussian_blur, gaussian_kernel1d

    for dtype in (torch.float32, torch.float16):
        assert torch.equal(gaussian_kernel1d(5, std, dtype=dtype), torch.tensor([0, 0, 1, 0, 0], dtype=dtype))
    x = torch.randn(1, 4, 9, 9)
    assert torch.equal(gaussian_blur(x, 5, std), x)


def test_tiny_sigma_runs_to_a_finite_picture(tmp_path, capsys):
    out = tmp_path / "run"
    # stride = window: few views, the dilated (blurred) path of phase 2 all the same
    assert main(["generate", *SMALL, "--stride", "32", "--sigma", "1e-30", "--out", str(out)]) == 0, capsys.readouterr().err
    picture = np.asarray(Image.open(out / "phase_2.png"))
    assert picture.std() > 0  # a picture, not a constant (NaN-derived) one


def test_nan_message_does_not_only_blame_the_weights():
    from demofusion.pipeline.guards import likely_cause

    cause = likely_cause(torch.float32)
    assert cause.index("setting") < cause.index("weights")


# ---- 10: closed pipe, ASCII terminals ------------------------------------------------------------
def test_closed_pipe_exits_quietly(tmp_path):
    r = subprocess.run(f"{sys.executable} -m demofusion generate --dry-run --height 512 --width 512 | head -1",
                       shell=True, executable="/bin/bash", capture_output=True, text=True, timeout=120, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.stdout.startswith("demofusion ") and len(r.stdout.splitlines()) == 1
    assert r.stderr == "", r.stderr  # no error line, no "Exception ignored", no traceback
    r = subprocess.run(f"set -o pipefail; {sys.executable} -m demofusion generate --dry-run --height 512 --width 512 "
                       "| head -1 >/dev/null", shell=True, executable="/bin/bash", capture_output=True, text=True,
                       timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 141 and r.stderr == "", (r.returncode, r.stderr)


def test_ascii_terminal_gets_x_for_times(monkeypatch):
    out, err = (io.TextIOWrapper(io.BytesIO(), encoding="ascii") for _ in range(2))
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert main(["generate", "--help"]) == 0
    assert main(["generate", "--model", "tiny", "--height", "100000", "--width", "100000"]) == 2
    out.flush(), err.flush()
    assert "image size x --scale" in out.buffer.getvalue().decode("ascii")
    lines = err.buffer.getvalue().decode("ascii").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "100000x100000 px" in lines[0], lines


# ---- 11: a bad DEMOFUSION_DIST_TIMEOUT -----------------------------------------------------------
def test_bad_dist_timeout_never_breaks_version_and_is_one_line_in_a_run(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DEMOFUSION_DIST_TIMEOUT", "abc")
    assert main(["--version"]) == 0 and "demofusion" in capsys.readouterr().out
    r = subprocess.run([sys.executable, "-m", "demofusion", "--version"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun: the value is read when the run joins
    one_error(capsys, ["generate", *SMALL, "--out", tmp_path / "o"], "DEMOFUSION_DIST_TIMEOUT=abc", "seconds")
    assert not (tmp_path / "o").exists()
