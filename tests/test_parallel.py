"""View parallelism across processes: torchrun with gloo on the CPU.

Each step's views are split so that every rank has ⌈views / N⌉ of them (phase 1: a CFG half
each); every chunk runs on one rank and the predictions are all-gathered, so the result must
equal one process that splits its views for N ranks (``view_ranks=N``, ``--view-ranks N``) *bit
for bit* — on every rank, for 2 ranks and for 3 (an uneven split), through the command line
(`python -m demofusion`, Euler with CFG) and the Python API (Euler-ancestral, no guidance) — while
each rank runs fewer UNet rows than that process. On the CPU the bits depend on the thread count
(oneDNN/MKL reductions), so the one-process references run with OMP_NUM_THREADS=1, as torchrun's
workers do. A rank that fails stops the whole job, quickly, with its error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from demofusion.parallel import blocks

HELPERS = Path(__file__).parent / "helpers"
RUN = ["generate", "--height", "768", "--width", "512", "--steps", "2", "--no-progress"]  # tiny: 3 phases


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}


def torchrun(n: int, *args, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env())


def test_blocks_are_balanced_and_contiguous():
    assert blocks(5, 2) == [range(0, 3), range(3, 5)]
    assert blocks(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert blocks(1, 3) == [range(0, 1), range(1, 1), range(1, 1)]
    for n in range(12):
        for w in range(1, 5):
            b = blocks(n, w)
            assert [k for r in b for k in r] == list(range(n)) and max(map(len, b)) - min(map(len, b)) <= 1


@pytest.mark.parametrize("n, vbs, ranks, cfg", [(65, 16, 1, True), (13, 16, 8, True), (65, 16, 8, True),
                                                 (34, 4, 3, False), (1, 16, 2, True), (1, 16, 4, False), (7, 2, 5, True)])
def test_a_step_is_split_into_balanced_chunks_and_ranks(n, vbs, ranks, cfg):
    """Every view once, in order; chunks ≤ view_batch_size; alone: ⌈n / vbs⌉ chunks differing by ≤ 1;
    per rank ⌈n / N⌉ views (a view's CFG halves apart when the ranks are at least twice the views)."""
    from demofusion.pipeline.reference import DEFAULT, PRIS_CV

    cut = DEFAULT.chunks(n, vbs, ranks, cfg)
    halves = cfg and ranks >= 2 * n
    assert [v for c in cut for v in range(c.first, c.first + c.views)] == \
        [v for v in range(n) for _ in range(2 if halves else 1)]
    assert all(c.views <= vbs and 0 <= c.rank < ranks for c in cut)
    rows = [sum(c.views * (1 if c.half else 2) for c in cut if c.rank == r) for r in range(ranks)]
    assert max(rows) == (1 if halves else 2 * -(-n // ranks)), rows
    if ranks == 1:
        sizes = [c.views for c in cut]
        assert len(sizes) == -(-n // vbs) and max(sizes) - min(sizes) <= 1
    assert [c.views for c in PRIS_CV.chunks(n, vbs, ranks, cfg)] == [min(vbs, n - a) for a in range(0, n, vbs)]


def test_counted_work_per_rank_meets_the_targets():
    """benchmarks/distributed.py's figures: the busiest rank's single-view evaluations by phase,
    against the hand count (views 1, 13, 34, 65 at 4096²; 50 steps; × 2 CFG; phase 1 one half)."""
    from demofusion.pipeline.work import rank_evaluations, unet_evaluations
    from demofusion.pipeline.settings import validate

    s = lambda side: validate(1024, prompt="x", height=side, width=side, stride=64, view_batch_size=16, force=True)
    big, small = s(4096), s(2048)
    assert rank_evaluations(big, 8) == [50, 2 * 2 * 50, 5 * 2 * 50, 9 * 2 * 50]
    assert rank_evaluations(small, 4) == [50, 4 * 2 * 50]
    assert sum(unet_evaluations(big)) / sum(rank_evaluations(big, 8)) >= 6.5
    assert sum(unet_evaluations(small)) / sum(rank_evaluations(small, 4)) >= 3


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The one-process run split for n ranks (--view-ranks n), made once per n."""
    runs = {}

    def run(n: int) -> Path:
        if n not in runs:
            runs[n] = tmp_path_factory.mktemp(f"one{n}") / "run"
            subprocess.run([sys.executable, "-m", "demofusion", *RUN, "--view-ranks", str(n), "--out", runs[n]],
                           check=True, env=env(), capture_output=True, timeout=300)
        return runs[n]

    return run


@pytest.mark.parametrize("n", [2, 3])
def test_cli_under_torchrun_is_bit_identical(one_process, tmp_path, n):
    out, ref = tmp_path / "run", one_process(n)
    r = torchrun(n, "-m", "demofusion", *RUN, "--out", out)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in ref.iterdir())
    for k in (1, 2, 3):
        a, b = (np.asarray(Image.open(d / f"phase_{k}.png")) for d in (ref, out))
        assert np.array_equal(a, b), f"phase {k} pixels"
        la, lb = (load_file(d / f"phase_{k}.safetensors") for d in (ref, out))
        assert la.keys() == lb.keys() and all(torch.equal(la[x], lb[x]) for x in la), f"phase {k} latents"
    assert r.stdout.count("phase 3:") == 1  # only rank 0 speaks
    assert json.loads((out / "run.json").read_text())["view_ranks"] == n  # recorded: one process replays it alike


@pytest.mark.parametrize("kind", ["sdxl", "turbo"])
def test_api_under_torchrun_is_bit_identical_on_every_rank(tmp_path, kind):
    (tmp_path / "one").mkdir()
    subprocess.run([sys.executable, HELPERS / "dist_api.py", kind, tmp_path / "one", "2", "3"], check=True,
                   env=env(), capture_output=True, timeout=300)
    for n in (2, 3):
        ref = torch.load(tmp_path / "one" / f"one{n}.pt")
        (tmp_path / str(n)).mkdir()
        r = torchrun(n, HELPERS / "dist_api.py", kind, tmp_path / str(n))
        assert r.returncode == 0, r.stderr[-2000:]
        for rank in range(n):
            got = torch.load(tmp_path / str(n) / f"rank{rank}.pt")
            assert got["unet_calls"] == ref["unet_calls"]
            assert all(torch.equal(a, b) for a, b in zip(got["latents"], ref["latents"])), (n, rank)
            assert all(torch.equal(a, b) for a, b in zip(got["images"], ref["images"])), (n, rank)
            assert got["rows"] < ref["rows"] * 0.7, (n, rank)  # the work is really shared


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error:")]


def only_torchruns_traceback(r: subprocess.CompletedProcess) -> bool:
    """torchrun itself ends a failed job with its ChildFailedError / SignalException traceback
    (docs/big-images.md); no rank adds one."""
    return r.stderr.count("Traceback (most recent call last)") == 1 and r.stderr.count('File "<frozen runpy>", line 198') == 1


def test_a_failing_rank_stops_the_job_and_says_why(tmp_path):
    r = torchrun(2, HELPERS / "dist_fail.py", *RUN, "--out", tmp_path / "run", timeout=120)
    assert r.returncode != 0
    # rank 0 is not failing (it waits in a collective), so rank 1 says its own error, naming itself
    assert error_lines(r) == ["error: rank 1: internal error (RuntimeError: injected failure on rank 1); run again "
                              "with --debug for the traceback and please report it"]
    assert only_torchruns_traceback(r)


def test_bad_input_under_torchrun_is_said_once_and_every_rank_exits_2(tmp_path):
    r = torchrun(2, "-m", "demofusion", *RUN, "--steps", "0", "--out", tmp_path / "run", timeout=120)
    assert error_lines(r) == ["error: --steps must be 1..1000, got 0"]  # rank 0's; rank 1 is quiet
    assert only_torchruns_traceback(r) and "ChildFailedError" in r.stderr
    # torchrun's summary lists each rank's own code; torchrun itself always exits 1. A rank still
    # shutting down when its sibling has exited is ended by torchrun (SIGTERM, -15): a race on a
    # loaded machine, after every rank has refused the input (the one line above was said)
    codes = re.findall(r"^ +exitcode +: (-?\d+)", r.stderr, re.M)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"} and r.returncode == 1, codes
    assert not (tmp_path / "run").exists()


def test_ctrl_c_under_torchrun_is_said_once_and_every_rank_exits_130(tmp_path):
    import signal

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           HELPERS / "dist_exit.py", tmp_path, *RUN, "--steps", "4", "--out", out]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
    for line in p.stdout:  # Ctrl-C in a terminal reaches torchrun, which passes SIGINT on to every rank
        if line.startswith("phase 1:"):
            p.send_signal(signal.SIGINT)
            break
    stdout, stderr = p.communicate(timeout=120)
    said = [ln for ln in (stdout + stderr).splitlines() if ln.startswith(("interrupted", "error:"))]
    assert said == [f"interrupted; finished phases are saved in {out} — continue with `demofusion generate "
                    f"--resume {out}`"]
    assert [(tmp_path / f"rank{r}.code").read_text() for r in (0, 1)] == ["130", "130"]
    assert stderr.count("Traceback (most recent call last)") == 1 and "SignalException" in stderr  # torchrun's
    assert (out / "phase_1.png").is_file() and not (out / "phase_3.png").exists()


# ---- --prompts: one image per line, sharded across ranks, resumable -------------------------------
PROMPTS = "a lighthouse\n# a comment\n\na castle at night\na red fox\nan old map\na glass of water\n"
BATCH = ["generate", "--height", "512", "--width", "256", "--steps", "2", "--no-progress"]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path))


def test_prompts_batch_on_two_ranks_equals_single_runs_and_resumes(tmp_path):
    import json

    f = tmp_path / "prompts.txt"
    f.write_text(PROMPTS)
    py = lambda *a: subprocess.run([sys.executable, *map(str, a)], env=env(), capture_output=True, text=True,
                                   timeout=300)
    r = py("-m", "demofusion", *BATCH, "--prompts", f, "--out", tmp_path / "one")
    assert r.returncode == 0, r.stderr[-2000:]
    names = [f"{i:04d}.png" for i in range(5)]
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == sorted([*names, "manifest.json"])

    r = torchrun(2, "-m", "demofusion", *BATCH, "--prompts", f, "--out", tmp_path / "two")
    assert r.returncode == 0, r.stderr[-2000:]
    for n in names:
        assert np.array_equal(pixels(tmp_path / "one" / n), pixels(tmp_path / "two" / n)), n
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert [(e["line"], e["prompt"], e["seed"]) for e in manifest["images"]] == \
        [(0, "a lighthouse", 0), (1, "a castle at night", 1), (2, "a red fox", 2), (3, "an old map", 3),
         (4, "a glass of water", 4)]

    # line 2 is exactly `generate --prompt "a red fox" --seed 2` (its last phase)
    r = py("-m", "demofusion", *BATCH, "--prompt", "a red fox", "--seed", "2", "--out", tmp_path / "single")
    assert r.returncode == 0, r.stderr[-2000:]
    assert np.array_equal(pixels(tmp_path / "single" / "phase_2.png"), pixels(tmp_path / "one" / "0002.png"))

    # Ctrl-C before the third image: two kept; the same command again makes the rest, redoing nothing
    r = py(HELPERS / "interrupt_batch.py", *BATCH, "--prompts", f, "--out", tmp_path / "cut")
    assert r.returncode == 130 and "run the same command again" in r.stderr
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cut").glob("*.png")}
    assert sorted(done) == names[:2]
    r = py("-m", "demofusion", *BATCH, "--prompts", f, "--out", tmp_path / "cut")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {n: (tmp_path / "cut" / n).stat().st_mtime_ns for n in done} == done
    for n in names:
        assert np.array_equal(pixels(tmp_path / "one" / n), pixels(tmp_path / "cut" / n)), n

    # other settings in the same folder: an error, nothing overwritten
    r = py("-m", "demofusion", *BATCH, "--steps", "3", "--prompts", f, "--out", tmp_path / "cut")
    assert r.returncode == 2 and "made with other settings" in r.stderr and r.stderr.strip().count("\n") == 0
