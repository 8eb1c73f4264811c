"""What the tests share: synthetic models converted by weight_converter.py, test images, runs of
pspnet.py in this process or in a child, and the checks of its output files."""

import io
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from functools import cached_property
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

import pspnet
from pspnet_keras import caffe_net
from pspnet_keras import models
from synthetic_caffe import caffemodel_layers, synthetic_weights, write_caffemodel

CONVERTER = Path(__file__).resolve().parents[1] / "weight_converter.py"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
MODEL = "pspnet50_ade20k"
CROP_SIZE = 473
ADE20K_CLASSES = 150
# The Caffe release's training mean (evaluation/eval_all.m), subtracted from RGB before the channels become BGR.
MEAN_RGB = np.array([123.68, 116.779, 103.939])
# A few ADE20K palette entries (color150.mat of the MIT Scene Parsing benchmark), 0-based class id -> colour.
ADE20K_COLOURS = {0: (120, 120, 120), 2: (6, 230, 230), 12: (150, 5, 61), 149: (92, 0, 255)}
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


WEIGHT_SEEDS = {"pspnet50_ade20k": 50, "pspnet101_voc2012": 101, "pspnet101_cityscapes": 713}


def converter_process(*args, cwd=None, converter=CONVERTER, **options):
    """Runs `python weight_converter.py *args` with the project on the module path; returns the CompletedProcess."""
    environment = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run(
        [sys.executable, str(converter), *map(str, args)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        **options,
    )


def write_deploy_prototxt(name, directory):
    """Writes caffe_net's rendering of the deploy prototxt of `name` under the release's file name; returns its path."""
    path = Path(directory) / models.RELEASED_MODELS[name].caffe_prototxt
    path.write_text(caffe_net.deploy_prototxt(name))
    return path


class SyntheticModel:
    """One released PSPNet with synthetic weights; every artefact is built on first use.

    `converted_h5` is made by running a copy of the converter placed in `directory`
    on the caffemodel alone, without -o, so it also exercises recognising the model
    from its weights and the default output path weights/keras/<model>.h5 beside the
    script.
    """

    def __init__(self, name, directory):
        self.name = name
        self.directory = directory

    @cached_property
    def prototxt(self):
        """Path of the rendered deploy prototxt."""
        return write_deploy_prototxt(self.name, self.directory)

    @cached_property
    def weights(self):
        """{Caffe layer name: [float32 blobs in Caffe shapes]}."""
        return synthetic_weights(self.prototxt, WEIGHT_SEEDS[self.name])

    @cached_property
    def caffemodel(self):
        """Path of a .caffemodel in the release's encoding (LayerParameter, `shape`, packed float data)."""
        path = self.directory / f"{self.name}.caffemodel"
        write_caffemodel(path, caffemodel_layers(self.prototxt, self.weights))
        return path

    @cached_property
    def conversion(self):
        """The CompletedProcess of `weight_converter.py <caffemodel>` for a copy in `directory`."""
        converter = shutil.copy(CONVERTER, self.directory)
        return converter_process(self.caffemodel, converter=converter)

    @cached_property
    def converted_h5(self):
        """Path of the converter's output for this model."""
        result = self.conversion
        assert result.returncode == 0, result.stderr
        return self.directory / "weights" / "keras" / f"{self.name}.h5"
