"""benchmarks/gpu_check.py: its ``--smoke`` run on the CPU writes every
section's figures, and without a GPU the real check stops with one clear line."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"


def test_smoke_run_writes_json_and_table(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    for section in ("env", "ceilings", "unet", "compile", "memory", "run", "repeat"):
        assert "error" not in report[section], report[section]
    assert report["env"]["sdpa"].startswith("aten::_scaled_dot_product")
    assert {(row["batch"], row["format"]) for row in report["unet"]} == {
        (b, f) for b in (1, 2) for f in ("contiguous", "channels_last")}
    assert report["repeat"]["bitwise_equal"] is True and report["compile"]["compiled_repeat_bitwise"] is True
    assert len(report["run"]["phase_seconds"]) == 2 and report["memory"][0]["estimate_gib"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("| section | figure | value |") and "| repeat | bitwise_equal | True |" in table


def test_without_a_gpu_the_check_says_so(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                       env={"CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(SCRIPT.parent.parent)})
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: no CUDA GPU here; run with --smoke to check the script on the CPU"]
    assert not (tmp_path / "gpu_check.json").exists()
