"""The network, the protocol and the commands on JAX and PyTorch as on TensorFlow.

A process runs one Keras backend, chosen when Keras is imported (KERAS_BACKEND). This suite runs
on the backend its environment names (TensorFlow by default); for each other backend, the tests
that hold on every backend run again in a pytest process of their own: the parity of each model
family with OpenCV's Caffe (test_parity.py: PSPNet-50 at crop 473, PSPNet-101 at 713; the third
model, PSPNet-101 at 473, adds no layer and no crop size to them), the protocol against the MATLAB
reference (test_inference.py), pspnet.py's outputs end to end and its GPU and precision checks
(test_pspnet.py). Then pspnet.py on each backend is compared with pspnet.py on TensorFlow on a
photo, at full size; and the commands that need TensorFlow refuse another backend in one line.
"""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from helpers import MODEL
from helpers import OPENCV_REFERENCES_VARIABLE
from helpers import PROJECT_ROOT
from helpers import decoded
from pspnet_keras import runtime

OTHER_BACKENDS = ("jax", "torch")
TESTS_ON_EVERY_BACKEND = (
    "tests/test_parity.py::test_keras_model_matches_caffe_reference[pspnet50_ade20k]",
    "tests/test_parity.py::test_keras_model_matches_caffe_reference[pspnet101_cityscapes]",
    "tests/test_inference.py",
    "tests/test_pspnet.py::test_batch_outputs_follow_the_saved_probabilities",
    "tests/test_pspnet.py::test_crop_sized_image_gets_the_plain_network_softmax",
    "tests/test_pspnet.py::test_flip_adds_the_mirrored_logits_and_verbose_lists_every_class",
    "tests/test_pspnet.py::test_class_map_is_the_argmax_and_max_of_predict",
    "tests/test_pspnet.py::test_missing_gpu_is_a_warning",
    "tests/test_pspnet.py::test_mixed_precision_without_a_gpu_is_refused",
)
PHOTO = PROJECT_ROOT / "example_images" / "rocket.jpg"
# The same network on two backends: float32 sums in another order (other convolution algorithms).
# Measured on the photo with -s on a 2-core AVX2 machine: 9.5e-6 (JAX) and 9.8e-6 (PyTorch); other
# CPU kinds take other convolution kernels, hence twice that.
PROBABILITY_TOLERANCE = 2e-5
# A pixel may take another class only where its best two classes are this close on TensorFlow...
NEAR_TIE = 2 * PROBABILITY_TOLERANCE
# ...and at no more than this share of the pixels.
MAX_NEAR_TIE_SHARE = 1e-4


def backend_environment(backend):
    """This process's environment with KERAS_BACKEND set to `backend`."""
    return os.environ | {runtime.KERAS_BACKEND_VARIABLE: backend}


@pytest.mark.slow
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_tests_of_every_backend_pass_on(backend, opencv_references):
    """Each run reads OpenCV's reference logits from the suite's folder, where the first run to need one
    computes it."""
    environment = backend_environment(backend) | {OPENCV_REFERENCES_VARIABLE: str(opencv_references)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
         *TESTS_ON_EVERY_BACKEND],
        capture_output=True, text=True, cwd=PROJECT_ROOT, env=environment, timeout=1800,
    )
    summary = result.stdout.strip().splitlines()[-1]
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert f"Keras backend: {backend}" in result.stdout
    assert "skipped" not in summary and "deselected" not in summary, summary


@pytest.fixture(scope="module")
def photo_runs(tmp_path_factory, synthetic_model):
    """run(backend) -> (CompletedProcess, output folder) of pspnet.py -s -v --save-probs on the photo with
    converted synthetic weights at full size (473), each backend's run made once."""
    weights = synthetic_model(MODEL).converted_h5
    runs = {}

    def run(backend):
        if backend not in runs:
            out = tmp_path_factory.mktemp(f"photo_{backend}")
            result = subprocess.run(
                [sys.executable, PROJECT_ROOT / "pspnet.py", "-m", MODEL, "-w", weights, "-i", PHOTO,
                 "-o", out / "rocket.png", "-s", "-v", "--save-probs", "--backend", backend],
                capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=600,
            )
            runs[backend] = result, out
        return runs[backend]

    return run


@pytest.mark.slow
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_pspnet_writes_what_it_writes_on_tensorflow(photo_runs, backend):
    (reference, reference_out), (result, out) = photo_runs("tensorflow"), photo_runs(backend)
    assert reference.returncode == 0, reference.stderr
    assert result.returncode == 0, result.stderr
    title = runtime.BACKEND_TITLES[backend]
    assert f"pspnet.py: Keras {keras.version()} on {title} " in result.stderr
    assert "(--backend), devices: CPU\n" in result.stderr
    expected = np.load(reference_out / "rocket_probs.npy")
    probabilities = np.load(out / "rocket_probs.npy")
    np.testing.assert_allclose(probabilities, expected, rtol=0, atol=PROBABILITY_TOLERANCE)
    ranked = np.sort(expected, axis=2)
    near_tie = ranked[..., -1] - ranked[..., -2] <= NEAR_TIE
    ids, expected_ids = decoded(out / "rocket_seg_read.png"), decoded(reference_out / "rocket_seg_read.png")
    differing = ids != expected_ids
    assert not (differing & ~near_tie).any(), f"{(differing & ~near_tie).sum()} pixels differ away from a near tie"
    assert differing.mean() <= MAX_NEAR_TIE_SHARE
    assert len(np.unique(expected_ids)) > 1
    if not differing.any():
        assert result.stdout == reference.stdout


@pytest.mark.parametrize("command", ["train.py", "export.py"])
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_tensorflow_only_commands_refuse_another_backend_in_one_line(tmp_path, command, backend):
    result = subprocess.run(
        [sys.executable, PROJECT_ROOT / command, *REQUIRED_ARGUMENTS[command](tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=backend_environment(backend), timeout=120,
    )
    reason = TENSORFLOW_REASONS[command]
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"{command}: error: {command} runs on TensorFlow only ({reason}), but the Keras backend is {backend} "
        f"(from KERAS_BACKEND): set KERAS_BACKEND=tensorflow\n"
    )
    assert list(tmp_path.iterdir()) == []


REQUIRED_ARGUMENTS = {
    "train.py": lambda folder: ["--dataset", "ade20k", "--data", str(folder / "ade"), "--out", str(folder / "run")],
    "export.py": lambda folder: ["-m", MODEL, "--format", "keras", "-o", str(folder / "model.keras")],
}
TENSORFLOW_REASONS = {
    "train.py": "tf.data and tf.distribute are TensorFlow's",
    "export.py": "SavedModel, tf2onnx and LiteRT convert TensorFlow graphs",
}


@pytest.mark.parametrize("backend", ["openvino", ""])  # a Keras backend this project does not run on; an empty one
@pytest.mark.parametrize("command", ["pspnet.py", "evaluate.py"])
def test_an_unsupported_backend_is_one_line(tmp_path, command, backend):
    result = subprocess.run(
        [sys.executable, PROJECT_ROOT / command, *INFERENCE_ARGUMENTS[command](tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=backend_environment(backend), timeout=120,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"{command}: error: Keras backend {backend!r} (from KERAS_BACKEND) is not supported; "
        "choose one of tensorflow, jax, torch\n"
    )


INFERENCE_ARGUMENTS = {
    "pspnet.py": lambda folder: ["-i", str(PHOTO), "-o", str(folder / "out.png")],
    "evaluate.py": lambda folder: ["--dataset", "ade20k", "--data", str(folder)],
}


@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_a_backend_that_is_not_installed_says_what_to_install(tmp_path, backend):
    """The backend's module hidden from the import system (sys.modules[name] = None) stands for a
    machine without it."""
    program = (
        f"import sys; sys.modules[{runtime.BACKEND_MODULES[backend]!r}] = None; import pspnet; "
        f"sys.exit(pspnet.main(['-i', {str(PHOTO)!r}, '-o', {str(tmp_path / 'out.png')!r}, '--backend', {backend!r}]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (
        f"pspnet.py: error: the Keras backend {backend} (from --backend) needs {runtime.BACKEND_TITLES[backend]}, "
        f"which is not installed: pip install -r {runtime.BACKEND_REQUIREMENTS[backend]}\n"
    )
    assert not Path(tmp_path / "out.png").exists()
