"""Shared, lazily built test artefacts: synthetic Caffe weights and their conversions per model."""

import shutil
import subprocess
import sys
from functools import cached_property
from pathlib import Path

import pytest

from synthetic_caffe import caffemodel_layers, synthetic_weights, write_caffemodel

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CAFFE_DIR = PROJECT_ROOT.parent / "shared" / "caffe"
CONVERTER = PROJECT_ROOT / "weight_converter.py"
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

PROTOTXTS = {
    "pspnet50_ade20k": CAFFE_DIR / "pspnet50_ADE20K_473.prototxt",
    "pspnet101_voc2012": CAFFE_DIR / "pspnet101_VOC2012_473.prototxt",
    "pspnet101_cityscapes": CAFFE_DIR / "pspnet101_cityscapes_713.prototxt",
}
WEIGHT_SEEDS = {"pspnet50_ade20k": 50, "pspnet101_voc2012": 101, "pspnet101_cityscapes": 713}


def converter_process(*args, cwd=None):
    """Runs `python weight_converter.py *args`; returns the CompletedProcess (text output)."""
    return subprocess.run(
        [sys.executable, str(CONVERTER), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300
    )


class SyntheticModel:
    """One released PSPNet with synthetic weights; every artefact is built on first use.

    `converted_h5` is made by running a copy of the converter placed in `directory`
    without -o, so it also exercises the default output path weights/keras/<model>.h5
    beside the script.
    """

    def __init__(self, name, directory):
        self.name = name
        self.directory = directory
        self.prototxt = PROTOTXTS[name]

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
        """The CompletedProcess of `weight_converter.py <prototxt> <caffemodel>` for a copy in `directory`."""
        converter = shutil.copy(CONVERTER, self.directory)
        return subprocess.run(
            [sys.executable, converter, self.prototxt, self.caffemodel], capture_output=True, text=True, timeout=300
        )

    @cached_property
    def converted_h5(self):
        """Path of the converter's output for this model."""
        result = self.conversion
        assert result.returncode == 0, result.stderr
        return self.directory / "weights" / "keras" / f"{self.name}.h5"


@pytest.fixture(scope="session")
def synthetic_model(tmp_path_factory):
    """synthetic_model(name) -> the session's SyntheticModel for `name`, built lazily and cached."""
    models = {}

    def get(name):
        if name not in models:
            models[name] = SyntheticModel(name, tmp_path_factory.mktemp(name))
        return models[name]

    return get


@pytest.fixture(scope="session")
def run_converter():
    """run_converter(*args, cwd=None) -> CompletedProcess of `python weight_converter.py *args`."""
    return converter_process
