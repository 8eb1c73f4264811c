"""Fixtures of the whole suite: the synthetic models of tests/helpers.py, built once per session.

TensorFlow in the test process starts as the commands start it (thread pools, oneDNN,
quiet start-up), before any test module imports Keras.
"""

import pytest

from pspnet_keras import runtime

runtime.import_tensorflow()

from helpers import SyntheticModel  # noqa: E402
from helpers import converter_process  # noqa: E402


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
