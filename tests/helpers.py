"""What the tests share: test images, runs of pspnet.py in this process or in a child, and the
checks of its output files; and, from bench/synthetic_caffe.py (shared with the benchmarks),
synthetic models converted by weight_converter.py."""

import contextlib
import io
import os
import resource
import signal
import subprocess
import sys
from contextlib import redirect_stderr
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

import pspnet
from bench.synthetic_caffe import CONVERTER  # noqa: F401  (re-exported for the tests)
from bench.synthetic_caffe import WEIGHT_SEEDS  # noqa: F401
from bench.synthetic_caffe import SyntheticModel  # noqa: F401
from bench.synthetic_caffe import converter_process  # noqa: F401
from bench.synthetic_caffe import write_deploy_prototxt  # noqa: F401
from pspnet_keras import models

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL = "pspnet50_ade20k"
CROP_SIZE = 473
ADE20K_CLASSES = 150
# The Caffe release's training mean (evaluation/eval_all.m), subtracted from RGB before the channels become BGR.
MEAN_RGB = np.array([123.68, 116.779, 103.939])
# A few ADE20K palette entries (color150.mat of the MIT Scene Parsing benchmark), 0-based class id -> colour.
ADE20K_COLOURS = {0: (120, 120, 120), 2: (6, 230, 230), 12: (150, 5, 61), 149: (92, 0, 255)}
# The folder of OpenCV's reference logits of test_parity.py, shared by the suite with the pytest processes
# test_backends.py starts on the other backends, so that each reference is computed once (conftest.py).
OPENCV_REFERENCES_VARIABLE = "PSPNET_TEST_OPENCV_REFERENCES"
EVERY_FLAG = (
    "-m", "--model", "-w", "--weights", "-i", "--input_path", "-g", "--glob_path", "-o", "--output_path",
    "--id", "-s", "--sliding", "-ms", "--multi_scale", "-f", "--flip", "--no-flip", "--save-probs",
    "-q", "--quiet", "-v", "--verbose", "--precision",
)


def smooth_image(height, width, seed):
    """A uint8 RGB image of smooth colour blobs, so the network sees some structure."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8))
    return np.asarray(coarse.resize((width, height), Image.BICUBIC))


def save_image(path, pixels):
    """Writes uint8 pixels with Pillow and returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def decoded(path):
    """The pixels of an image file, as Pillow decodes them."""
    with Image.open(path) as image:
        return np.asarray(image)


def softmax(logits):
    """Softmax over the last axis, in float64."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def run_main(*args):
    """Runs pspnet.main in this process; returns its exit code, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = pspnet.main([str(arg) for arg in args])
    return SimpleNamespace(code=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def run_cli(*args, cwd=None):
    """Runs `python pspnet.py *args` as a user would; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "pspnet.py"), *map(str, args)],
        capture_output=True, text=True, cwd=cwd, timeout=300,
    )


def error_lines(stderr):
    """The error lines pspnet.py printed."""
    return [line for line in stderr.splitlines() if line.startswith("pspnet.py: error:")]


def check_outputs(image, probabilities, outputs, exact_pictures=True, palette=None):
    """Asserts that the output files of one image are what its probabilities make them.

    `palette` defaults to ADE20K's, checked against a few entries of color150.mat.
    """
    class_ids = probabilities.argmax(axis=-1)
    with Image.open(outputs["seg_read"]) as seg_read:
        assert seg_read.format == "PNG" and seg_read.mode == "L"
        np.testing.assert_array_equal(np.asarray(seg_read), class_ids)
    if not exact_pictures:
        for kind in ("seg", "seg_blended", "probs"):
            assert decoded(outputs[kind]).shape[:2] == image.shape[:2]
        return
    if palette is None:
        palette = np.array(models.RELEASED_MODELS[MODEL].palette)
        for class_id, colour in ADE20K_COLOURS.items():
            assert tuple(palette[class_id]) == colour
    colour = decoded(outputs["seg"])
    np.testing.assert_array_equal(colour, palette[class_ids])
    expected_blend = np.floor((image.astype(np.float64) + colour) / 2 + 0.5)
    np.testing.assert_array_equal(decoded(outputs["seg_blended"]), expected_blend)
    expected_grey = np.floor(255 * probabilities.max(axis=-1).astype(np.float64) + 0.5)
    np.testing.assert_array_equal(decoded(outputs["probs"]), expected_grey)


def output_files(stem, ext, probs=True):
    """The output files pspnet.py writes for an output stem and picture extension."""
    files = {
        "seg": f"{stem}_seg{ext}", "seg_blended": f"{stem}_seg_blended{ext}",
        "probs": f"{stem}_probs{ext}", "seg_read": f"{stem}_seg_read.png",
    }
    if probs:
        files["probs_npy"] = f"{stem}_probs.npy"
    return {kind: Path(name) for kind, name in files.items()}


def folder_snapshot(folder):
    """What `folder` holds, to compare before and after: {relative path: a file's bytes, a link's target,
    or the kind of anything else ("folder", "not a regular file")}, hidden files included."""
    found = {}
    for directory, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(directory) / name
            key = str(path.relative_to(folder))
            if path.is_symlink():
                found[key] = ("link", os.readlink(path))
            elif path.is_dir():
                found[key] = "folder"
            elif path.is_file():
                found[key] = path.read_bytes()
            else:
                found[key] = "not a regular file"
    return found


@contextlib.contextmanager
def file_size_limit(size):
    """Caps the size of the files this process writes at `size` bytes inside the `with` block only
    (RLIMIT_FSIZE; SIGXFSZ ignored, so that a write beyond fails with EFBIG). Only inside it: pytest's
    own output, to a log file larger than `size`, comes after the test's body."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
