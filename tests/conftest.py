"""Shared, lazily built test artefacts: synthetic Caffe weights and their conversions per model.

The deploy prototxts are caffe_net's renderings of the release's files, written here;
tests/test_weight_converter.py checks them against the release's own files when those
are beside the clone.
"""

import os
import shutil
import subprocess
import sys
from functools import cached_property
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONVERTER = PROJECT_ROOT / "weight_converter.py"
if str(PROJECT_ROOT) not in sys.path:
    sys.path.insert(0, str(PROJECT_ROOT))

import tf_runtime  # noqa: E402

# TensorFlow in the test process starts as in the commands it compares with (thread pools, oneDNN).
tf_runtime.import_tensorflow()

import caffe_net  # noqa: E402
import models  # noqa: E402
from synthetic_caffe import caffemodel_layers, synthetic_weights, write_caffemodel  # noqa: E402

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


@pytest.fixture(scope="session")
def synthetic_model(tmp_path_factory):
    """synthetic_model(name) -> the session's SyntheticModel for `name`, built lazily and cached."""
    synthetic_models = {}

    def get(name):
        if name not in synthetic_models:
            synthetic_models[name] = SyntheticModel(name, tmp_path_factory.mktemp(name))
        return synthetic_models[name]

    return get


@pytest.fixture(scope="session")
def run_converter():
    """run_converter(*args, cwd=None) -> CompletedProcess of `python weight_converter.py *args`."""
    return converter_process
