"""bench/gpu_check.py's dry run: every step of the accelerator check, on the CPU at the smallest crop.

The check is run on a lent GPU machine only now and then; this keeps it from rotting.
What it reports is checked for being a measurement of the right things: parity with
OpenCV's independent Caffe implementation, each precision compared with float32, a
forward time per batch size and a CLI time per mode.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODELS = ("pspnet50_ade20k", "pspnet101_cityscapes")


@pytest.mark.slow
def test_dry_run_measures_every_item(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--dry-run", "--out", str(tmp_path), "--models", *MODELS],
        capture_output=True, text=True, timeout=900, cwd=PROJECT_ROOT,
    )
    assert result.returncode == 0, result.stderr
    (written,) = tmp_path.iterdir()
    assert written.name == "gpu_dry_run_cpu.json"
    report = json.loads(written.read_text())
    assert (report["device"], report["backend"], report["dry_run"]) == ("cpu", "tensorflow", True)
    for name in MODELS:
        model = report["models"][name]
        assert model["crop_size"] == 41
        parity = model["parity_vs_opencv"]
        assert parity["argmax_agreement"] >= 0.999 and parity["max_rel_dlogit"] < 1e-4
        float32 = model["precision_vs_float32"]["float32"]
        assert float32["crop"]["max_abs_dp"] == 0 and float32["-s"]["argmax_agreement"] == 1
        assert set(model["precisions_skipped"]) == {"bfloat16", "float16"}
        forward = model["forward"]["float32"]
        assert set(forward["per_crop_s"]) == {"1", "2"} and forward["fastest_s"] > 0
        cli = model["cli"]["float32"]
        # A 48x32 image, crop 41, base 40: one crop per scale but 2, 2 and 6 at the three largest of -ms,
        # each with its mirror.
        assert {mode: cli[mode]["passes"] for mode in cli} == {"default": 2, "-s": 2, "-s -ms": 26}
        assert all(cli[mode]["seconds"] > 0 for mode in cli)
    assert "pspnet50_ade20k" in result.stdout and "float32" in result.stdout
