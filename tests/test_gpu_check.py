"""bench/gpu_check.py's dry run: every step of the accelerator check, on the CPU at the smallest crop.

The check is run on a lent GPU machine only now and then; this keeps it from rotting
on each Keras backend. What it reports is checked for being a measurement of the
right things: parity with OpenCV's independent Caffe implementation, each precision
compared with float32 (the mixed ones computing in 16 bits), a forward time per batch
size and a CLI time per mode. On JAX and PyTorch it runs with TensorFlow made
unimportable, as on the lent machines, which have no TensorFlow. The dry runs build the 50-layer
network (the 101-layer ones have the same layers, more of them: their parity is test_parity.py's);
the street-sized image the CLI modes of Cityscapes are timed on is checked apart.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from pspnet_keras import models

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# One model, the 50-layer one: on TensorFlow, on 2 shared cores, the dry run of pspnet101_cityscapes took
# more than twice as long.
MODEL = "pspnet50_ade20k"
BACKENDS = ("tensorflow", "jax", "torch")
PHOTO = PROJECT_ROOT / "example_images" / "rocket.jpg"
# The module run with TensorFlow absent: importing it fails and importlib finds no spec of it, as where
# it is not installed (a None in sys.modules, Python's "import system" reference).
WITHOUT_TENSORFLOW = (
    "import runpy, sys; sys.modules['tensorflow'] = None; "
    "runpy.run_module('bench.gpu_check', run_name='__main__', alter_sys=True)"
)
MIXED_PRECISIONS = ("bfloat16", "float16")


def dry_run_command(backend, out):
    """The dry run's command line on `backend`, without TensorFlow importable unless it is the backend."""
    arguments = ["--dry-run", "--out", str(out), "--models", MODEL]
    if backend == "tensorflow":
        return [sys.executable, "-m", "bench.gpu_check", *arguments]
    return [sys.executable, "-c", WITHOUT_TENSORFLOW, *arguments]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_dry_run_measures_every_item(backend, tmp_path):
    result = subprocess.run(
        dry_run_command(backend, tmp_path), capture_output=True, text=True, timeout=900, cwd=PROJECT_ROOT,
        env=dict(os.environ, KERAS_BACKEND=backend),
    )
    assert result.returncode == 0, result.stderr
    (written,) = tmp_path.iterdir()
    assert written.name == f"gpu_dry_run_cpu_{backend}.json"
    report = json.loads(written.read_text())
    assert (report["device"], report["backend"], report["dry_run"]) == ("cpu", backend, True)
    model = report["models"][MODEL]
    assert model["crop_size"] == 41
    parity = model["parity_vs_opencv"]
    assert parity["argmax_agreement"] >= 0.999 and parity["max_rel_dlogit"] < 1e-4
    precisions = model["precision_vs_float32"]
    assert precisions["float32"]["crop"]["max_abs_dp"] == 0
    # Each mixed precision computes in its own 16 bits: off float32 by more than rounding, bfloat16's
    # 8-bit significand further than float16's 11-bit one, and still mostly the same classes.
    bfloat16, float16 = (precisions[precision]["crop"] for precision in MIXED_PRECISIONS)
    assert bfloat16["max_abs_dp"] > float16["max_abs_dp"] > 1e-4
    assert bfloat16["argmax_agreement"] > 0.9 and float16["argmax_agreement"] > 0.9
    # Without a GPU, PSPNet refuses float16, and bfloat16 on this CPU: without AVX512_BF16 or AMX (where it
    # has them: on a backend other than TensorFlow, or with oneDNN off, as the check starts TensorFlow);
    # the check says so rather than run them.
    expected = {
        "bfloat16": "refused here: precision bfloat16 on the CPU ",
        "float16": "refused here: precision float16 needs a GPU and none is visible ",
    }
    for precision in MIXED_PRECISIONS:
        for refused in (precisions[precision]["default"], precisions[precision]["-s"], model["cli"][precision]):
            assert refused["skipped"].startswith(expected[precision]), refused
    for precision in ("float32", *MIXED_PRECISIONS):
        forward = model["forward"][precision]
        assert set(forward["per_crop_s"]) == {"1", "2"} and forward["fastest_s"] > 0
    cli = model["cli"]["float32"]
    # A 48x32 image, crop 41, base 24: one crop per scale but two at the largest of -ms, each with
    # its mirror.
    assert {mode: cli[mode]["passes"] for mode in cli} == {"default": 2, "-s": 2, "-s -ms": 14}
    assert all(cli[mode]["seconds"] > 0 for mode in cli)
    assert MODEL in result.stdout
    assert "precision bfloat16 on the CPU" in result.stdout and "precision float16 needs a GPU" in result.stdout


def test_cityscapes_cli_modes_are_timed_on_a_street_sized_image():
    """pspnet101_cityscapes's CLI modes run on the photo resized to 2048x1024 (the dry run's 48x32), every
    other model's on the photo as it is."""
    from bench import gpu_check

    street, other = (SimpleNamespace(config=models.RELEASED_MODELS[name]) for name in ("pspnet101_cityscapes", MODEL))
    with Image.open(PHOTO) as photo:
        photo_shape = (photo.height, photo.width, 3)
    assert gpu_check.cli_image(street, gpu_check.FULL_RUN).shape == (1024, 2048, 3)
    assert gpu_check.cli_image(other, gpu_check.FULL_RUN).shape == photo_shape
    assert gpu_check.cli_image(street, gpu_check.DRY_RUN).shape == (32, 48, 3)
