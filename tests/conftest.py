"""Fixtures of the whole suite: the synthetic models of tests/helpers.py, built once per session.

TensorFlow in the test process starts as the commands start it (thread pools, oneDNN,
quiet start-up), before any test module imports Keras.

Compiled networks go to a cache folder of the session's (compile_cache_folder).

The tests check what the commands print, which a user's TF_CPP_MIN_LOG_LEVEL changes on
purpose (runtime.py: TensorFlow's start-up lines are kept for a user who set it): the
suite takes it out of its environment, and so out of every command it starts.
"""

import json
import os
import signal
from pathlib import Path

import pytest

from pspnet_keras import compile_cache
from pspnet_keras import models
from pspnet_keras import runtime

os.environ.pop(runtime.LOG_LEVEL_VARIABLE, None)
runtime.import_keras()
if runtime.backend_name() == "torch":
    import torch

    # The tests that run on PyTorch call networks to compare their outputs, never to train: without
    # this, PyTorch records every call for gradients and keeps its activations (pytorch.org,
    # torch.set_grad_enabled).
    torch.set_grad_enabled(False)

from helpers import MODEL  # noqa: E402
from helpers import OPENCV_REFERENCES_VARIABLE  # noqa: E402
from helpers import SyntheticModel  # noqa: E402
from helpers import converter_process  # noqa: E402

# The crop and base size of the small user model (small_weights).
SMALL_CROP = {"crop_size": 41, "base_size": 48}
# Seconds after which a test that blocks (a FIFO opened, say) fails instead of hanging the suite.
HANG_LIMIT_S = 60


def pytest_report_header(config):
    """The Keras backend the suite runs on (KERAS_BACKEND; tests/test_backends.py runs parts of it on each)."""
    return f"Keras backend: {runtime.backend_name()}"


@pytest.fixture(scope="session", autouse=True)
def compile_cache_folder(tmp_path_factory):
    """The persistent compilation cache of every command the suite runs: a folder of the session's,
    never the user's ~/.cache (pspnet_keras/compile_cache.py)."""
    folder = tmp_path_factory.mktemp("compile_cache")
    previous = os.environ.get(compile_cache.CACHE_DIR_VARIABLE)
    os.environ[compile_cache.CACHE_DIR_VARIABLE] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(compile_cache.CACHE_DIR_VARIABLE, None)
    else:
        os.environ[compile_cache.CACHE_DIR_VARIABLE] = previous


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
def opencv_references(tmp_path_factory):
    """The folder of OpenCV's reference logits (test_parity.py): the one a parent pytest process names in
    OPENCV_REFERENCES_VARIABLE (test_backends.py), else a folder of the session's."""
    inherited = os.environ.get(OPENCV_REFERENCES_VARIABLE)
    return Path(inherited) if inherited else tmp_path_factory.mktemp("opencv_references")


@pytest.fixture(scope="session")
def small_weights(tmp_path_factory, synthetic_model):
    """small.h5, the synthetic pspnet50_ade20k weights, with small.json beside it: a user model of the same
    layers with 41-pixel crops, quick to run (the page's tests)."""
    weights = tmp_path_factory.mktemp("small_model") / "small.h5"
    weights.symlink_to(synthetic_model(MODEL).converted_h5)
    description = {**models.RELEASED_MODELS[MODEL].description(), **SMALL_CROP}
    weights.with_suffix(".json").write_text(json.dumps(description))
    return weights


@pytest.fixture(scope="session")
def run_converter():
    """run_converter(*args, cwd=None) -> CompletedProcess of `python weight_converter.py *args`."""
    return converter_process


@pytest.fixture
def hang_guard():
    """Fails the test, instead of letting it hang, when it runs longer than HANG_LIMIT_S (SIGALRM)."""

    def hung(signum, frame):
        raise TimeoutError(f"the test blocked for {HANG_LIMIT_S} s: something opened a path that is no regular file")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(HANG_LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
