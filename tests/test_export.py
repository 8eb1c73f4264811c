"""export.py and pspnet_keras/export: every format opened in its own runtime against the Keras network,
and the command's refusals.

References are independent of pspnet_keras/export: the Keras network built here with its
weights (layers_builder), each file opened here with its runtime (ONNX Runtime, the LiteRT
interpreter, TensorFlow, a fresh Python process for the Keras archive), PSPNet's default
mode for the SavedModel's `segment` signature, and MATLAB's imresize 'bilinear' written
out with NumPy for the graph's resizes. The full-size pspnet50_ade20k (473) goes through
ONNX and LiteRT; the other formats use a 5-class user model at crop 89 made from the same
synthetic weights. The tests that write a file are marked slow.
"""

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr
from contextlib import redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

import export
import layers_builder
import utils
from pspnet_keras import cli
from pspnet_keras import inference
from pspnet_keras import models
from pspnet_keras import runtime
from pspnet_keras.export import graph
from pspnet_keras.export import runtimes
from pspnet_keras.export import transaction
from pspnet_keras.segmenter import PSPNet

PROJECT_ROOT = Path(__file__).resolve().parents[1]
EXPORT = PROJECT_ROOT / "export.py"
PHOTO = PROJECT_ROOT / "example_images" / "rocket.jpg"
RELEASED = "pspnet50_ade20k"
USER_CROP = 89
USER_CLASSES = 5
USER_MEAN_RGB = [110.0, 115.0, 100.0]
USER_DESCRIPTION = {
    "format": "pspnet-keras", "version": 1, "depth": 50, "classes": USER_CLASSES,
    "crop_size": USER_CROP, "base_size": 96,
    "class_names": ["background", "road", "roof", "tree", "water"],
    "palette": [[0, 0, 0], [200, 10, 10], [10, 200, 10], [10, 10, 200], [250, 250, 0]],
    "mean_rgb": USER_MEAN_RGB,
}
CLASSIFIER_SEED = 5
# The bar of every format, and of `segment` against pspnet.py's default mode.
MAX_RELATIVE_DELTA = 1e-4
MIN_ARGMAX_AGREEMENT = 0.999
BN_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")


# ---------------------------------------------------------------------------------------
# Helpers and fixtures


def run_export(*args, cwd=None):
    """Runs `python export.py *args` as a user would; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(EXPORT), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=900
    )


def run_main(*args):
    """Runs export.main in this process; returns its exit code, stdout and stderr."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = export.main([str(arg) for arg in args])
    return SimpleNamespace(code=code, stdout=stdout.getvalue(), stderr=stderr.getvalue())


def only_error_line(stderr):
    """The one line export.py printed on stderr, after checking that it is one `export.py: error:` line."""
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("export.py: error: "), stderr
    return lines[0]


def listing(directory):
    """The names of everything under `directory`, hidden temporary files included."""
    return sorted(str(path.relative_to(directory)) for path in Path(directory).rglob("*"))


def write_user_model(directory, released_h5):
    """<directory>/mine.h5 (the released backbone, a seeded 5-class conv6) and mine.json at crop 89."""
    arrays = layers_builder.read_weights(released_h5)
    rng = np.random.default_rng(CLASSIFIER_SEED)
    arrays["conv6"] = [
        rng.normal(0, 0.33, (1, 1, 512, USER_CLASSES)).astype(np.float32),
        rng.normal(0, 0.5, USER_CLASSES).astype(np.float32),
    ]
    names = {4: BN_NAMES, 2: ("kernel", "bias"), 1: ("kernel",)}
    layers = [(name, list(zip(names[len(values)], values))) for name, values in arrays.items()]
    weights = Path(directory) / "mine.h5"
    layers_builder.write_weights(weights, layers)
    weights.with_suffix(".json").write_text(json.dumps(USER_DESCRIPTION))
    return weights


def keras_network(config, weights):
    """The Keras network of `config` with the weights file loaded, built here."""
    network = layers_builder.build_pspnet(config)
    layers_builder.load_weights(network, weights)
    return network


def photo_crop(side, mean_rgb):
    """A photograph squeezed to side x side, as the network takes it (mean subtracted, BGR), batch of one."""
    photo = utils.read_image(PHOTO)
    return inference.preprocess(inference.resize_image(photo, side, side), mean_rgb)[np.newaxis].copy()


def assert_same_logits(logits, reference):
    """The bar every format must meet: largest |difference| <= 1e-4 of the reference's logit range, argmax >= 99.9 %."""
    assert logits.shape == reference.shape
    delta = np.max(np.abs(logits - reference)) / np.ptp(reference)
    agreement = np.mean(logits.argmax(axis=-1) == reference.argmax(axis=-1))
    assert delta <= MAX_RELATIVE_DELTA and agreement >= MIN_ARGMAX_AGREEMENT, (delta, agreement)
    assert len(np.unique(reference.argmax(axis=-1))) > 1


@pytest.fixture(scope="module")
def released_h5(synthetic_model):
    return synthetic_model(RELEASED).converted_h5


@pytest.fixture(scope="module")
def released_network(released_h5):
    return keras_network(models.RELEASED_MODELS[RELEASED], released_h5)


@pytest.fixture(scope="module")
def user_h5(tmp_path_factory, released_h5):
    return write_user_model(tmp_path_factory.mktemp("user_model"), released_h5)


@pytest.fixture(scope="module")
def user_config(user_h5):
    return models.read_description(user_h5.with_suffix(".json"))


@pytest.fixture(scope="module")
def user_network(user_config, user_h5):
    return keras_network(user_config, user_h5)


@pytest.fixture(scope="module")
def user_saved_model(tmp_path_factory, user_h5):
    """(the CompletedProcess, the output path) of export.py --format saved_model for the user model."""
    path = tmp_path_factory.mktemp("saved_model") / "exports" / "mine"
    return run_export("-w", user_h5, "--format", "saved_model", "-o", path), path


# ---------------------------------------------------------------------------------------
# MATLAB's imresize 'bilinear' in NumPy: the reference for the `segment` graph's resizes


def imresize_weights(in_size, out_size):
    """(out_size, in_size) float64 weights of imresize 'bilinear' along one axis.

    Output pixel x samples the input at (x + 0.5) * in / out - 0.5 with a triangle
    kernel, widened by in / out when shrinking; indices beyond the edge are mirrored
    (symmetric), and each row is normalised to sum 1.
    """
    scale = out_size / in_size
    width = max(1.0, 1.0 / scale)
    weights = np.zeros((out_size, in_size))
    for x in range(out_size):
        centre = (x + 0.5) / scale - 0.5
        for source in range(int(np.floor(centre - width)), int(np.ceil(centre + width)) + 1):
            weight = max(0.0, 1.0 - abs(source - centre) / width)
            folded = source % (2 * in_size)
            weights[x, folded if folded < in_size else 2 * in_size - 1 - folded] += weight
    return weights / weights.sum(axis=1, keepdims=True)


def imresize(array, height, width):
    """An (h, w, channels) array resized to (height, width) by imresize 'bilinear', in float64."""
    rows = np.tensordot(imresize_weights(array.shape[0], height), np.asarray(array, dtype=np.float64), axes=1)
    return np.tensordot(imresize_weights(array.shape[1], width), rows, axes=([1], [1])).transpose(1, 0, 2)


# ---------------------------------------------------------------------------------------
# The layers: what the exporters see


def test_traced_network_captures_nothing_but_its_variables():
    network = layers_builder.build_pspnet(RELEASED, input_size=USER_CROP)
    spec = tf.TensorSpec((None, USER_CROP, USER_CROP, 3), tf.float32)
    traced = tf.function(lambda data: network(data, training=False)).get_concrete_function(spec)
    captured = {tensor.dtype for tensor in traced.captured_inputs}
    assert captured == {tf.resource}
    assert len(traced.captured_inputs) == len(network.weights)


def test_keras_archive_is_refused_for_another_model_and_for_a_file_that_is_not_one(tmp_path, user_network):
    path = tmp_path / "mine.keras"
    user_network.save(path)
    with pytest.raises(layers_builder.WeightsError) as error:
        layers_builder.load_keras_archive(path, RELEASED)
    assert str(error.value) == (
        f"{path}: holds a network of 89 px crops and 5 classes; pspnet50_ade20k has 473 px crops and 150 classes"
    )
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(layers_builder.WeightsError, match=r"garbage.keras: not a Keras archive \(a .keras file is"):
        layers_builder.load_keras_archive(garbage, RELEASED)


# ---------------------------------------------------------------------------------------
# The protocol graph's pieces against independent references


@pytest.mark.parametrize("length, margin", [(1, 3), (2, 5), (5, 3), (7, 7), (4, 11), (10, 0)])
def test_mirrored_indices_are_numpys_symmetric_padding(length, margin):
    expected = np.pad(np.arange(length), margin, mode="symmetric")
    np.testing.assert_array_equal(graph.mirrored_indices(tf.constant(length), tf.constant(margin)), expected)


def test_scaled_size_is_the_protocols_for_many_shapes():
    rng = np.random.default_rng(3)
    shapes = [(1, 1), (1, 3000), (3000, 1), (473, 473), (500, 500), (427, 640), (640, 427)]
    shapes += [tuple(map(int, shape)) for shape in rng.integers(1, 4000, (200, 2))]
    for long_side in (89, 473, 713):
        for height, width in shapes:
            found = graph.scaled_size(tf.constant(height), tf.constant(width), long_side)
            assert tuple(int(side) for side in found) == inference.scaled_size(height, width, long_side)


@pytest.mark.parametrize("height, width", [(59, 89), (89, 13), (40, 30), (473, 316), (1, 89), (89, 1)])
def test_image_resize_is_matlabs_and_pillows_within_a_grey_level(height, width):
    photo = utils.read_image(PHOTO)[:300, 100:400]
    resized = graph.resize_image(tf.constant(photo), tf.constant(height), tf.constant(width)).numpy()
    assert resized.shape == (height, width, 3)
    assert np.max(np.abs(resized - imresize(photo, height, width))) <= 1.0
    assert np.max(np.abs(resized - inference.resize_image(photo, height, width))) <= 1.0


@pytest.mark.parametrize(
    "size, out", [((11, 7), (89, 40)), ((89, 59), (427, 640)), ((30, 20), (7, 5)), ((1, 9), (4, 9))]
)
def test_probability_resize_is_matlabs_imresize(size, out):
    probabilities = np.random.default_rng(4).dirichlet(np.ones(6), size).astype(np.float32)
    resized = graph.resize_probabilities(tf.constant(probabilities), tf.constant(out[0]), tf.constant(out[1]))
    np.testing.assert_allclose(resized.numpy(), imresize(probabilities, *out), atol=1e-5)


# ---------------------------------------------------------------------------------------
# Every format, opened in its runtime here


@pytest.mark.slow
def test_full_size_onnx_runs_in_onnx_runtime_with_the_keras_networks_logits(tmp_path, released_h5, released_network):
    path = tmp_path / "deploy" / "pspnet50_ade20k.onnx"
    result = run_export("-m", RELEASED, "-w", released_h5, "--format", "onnx", "-o", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"export.py: wrote {path} (onnx opset 17); opened in ONNX Runtime, its logits ")
    assert listing(tmp_path) == ["deploy", "deploy/pspnet50_ade20k.onnx"]
    assert onnx.load(path, load_external_data=False).opset_import[0].version == 17
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    (data,), (logits,) = session.get_inputs(), session.get_outputs()
    assert (data.name, data.shape[1:], logits.name) == ("data", [473, 473, 3], "logits")
    crop = photo_crop(473, models.RELEASE_MEAN_RGB)
    reference = np.asarray(released_network(crop, training=False))
    assert_same_logits(session.run(["logits"], {"data": crop})[0], reference)
    mirrored = session.run(["logits"], {"data": np.concatenate([crop, crop[:, :, ::-1]])})[0]
    assert_same_logits(mirrored[:1], reference)


@pytest.mark.slow
def test_full_size_litert_runs_in_the_litert_interpreter_with_the_keras_networks_logits(
    tmp_path, released_h5, released_network
):
    path = tmp_path / "pspnet50_ade20k.tflite"
    result = run_export("-w", released_h5, "--format", "litert", "-o", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"export.py: wrote {path} (litert); opened in LiteRT, its logits on a random ")
    assert listing(tmp_path) == ["pspnet50_ade20k.tflite"]
    interpreter = Interpreter(model_path=str(path))
    assert interpreter.get_signature_list() == {"logits": {"inputs": ["data"], "outputs": ["logits"]}}
    assert list(interpreter.get_input_details()[0]["shape"]) == [1, 473, 473, 3]
    crop = photo_crop(473, models.RELEASE_MEAN_RGB)
    logits = interpreter.get_signature_runner("logits")(data=crop)["logits"]
    assert_same_logits(logits, np.asarray(released_network(crop, training=False)))


@pytest.mark.slow
def test_keras_archive_opens_in_a_fresh_keras_program_with_the_networks_logits(tmp_path, user_h5, user_network):
    path = tmp_path / "mine.keras"
    result = run_export("-w", user_h5, "--format", "keras", "-o", path)
    assert result.returncode == 0, result.stderr
    assert sorted(listing(tmp_path)) == ["mine.json", "mine.keras"]
    assert json.loads((tmp_path / "mine.json").read_text()) == USER_DESCRIPTION
    crop = photo_crop(USER_CROP, USER_MEAN_RGB)
    np.save(tmp_path / "crop.npy", crop)
    program = (
        "import sys, numpy, keras, layers_builder; "
        "network = keras.saving.load_model(sys.argv[1]); "
        "numpy.save(sys.argv[3], keras.ops.convert_to_numpy(network(numpy.load(sys.argv[2]), training=False)))"
    )
    for backend in runtime.BACKENDS:  # written on TensorFlow, opened on each backend
        opened = subprocess.run(
            [sys.executable, "-c", program, path, tmp_path / "crop.npy", tmp_path / f"logits_{backend}.npy"],
            capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300,
            env=os.environ | {runtime.KERAS_BACKEND_VARIABLE: backend},
        )
        assert opened.returncode == 0, opened.stderr
        assert_same_logits(np.load(tmp_path / f"logits_{backend}.npy"), np.asarray(user_network(crop, training=False)))
    photo = utils.read_image(PHOTO)
    archive_ids, archive_probabilities = PSPNet(weights=path).class_map(photo)
    weights_ids, weights_probabilities = PSPNet(weights=user_h5).class_map(photo)
    np.testing.assert_array_equal(archive_ids, weights_ids)
    np.testing.assert_allclose(archive_probabilities, weights_probabilities, atol=1e-6)


@pytest.mark.slow
def test_onnx_at_opset_18_of_a_user_model(tmp_path, user_h5, user_network):
    path = tmp_path / "mine.onnx"
    result = run_export("-w", user_h5, "--format", "onnx", "--opset", "18", "-o", path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"export.py: wrote {path} and {tmp_path / 'mine.json'} (onnx opset 18); ")
    assert onnx.load(path, load_external_data=False).opset_import[0].version == 18
    assert json.loads((tmp_path / "mine.json").read_text()) == USER_DESCRIPTION
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    crop = photo_crop(USER_CROP, USER_MEAN_RGB)
    assert_same_logits(session.run(["logits"], {"data": crop})[0], np.asarray(user_network(crop, training=False)))


@pytest.mark.slow
def test_saved_model_logits_signature_is_the_keras_networks(user_saved_model, user_network):
    result, path = user_saved_model
    assert result.returncode == 0, result.stderr
    assert json.loads(path.with_suffix(".json").read_text()) == USER_DESCRIPTION
    loaded = tf.saved_model.load(str(path))
    assert set(loaded.signatures) == {"segment", "logits", "serving_default"}
    crop = photo_crop(USER_CROP, USER_MEAN_RGB)
    logits = loaded.signatures["logits"](data=tf.constant(np.concatenate([crop, crop])))["logits"].numpy()
    reference = np.asarray(user_network(crop, training=False))
    assert_same_logits(logits[:1], reference)
    assert_same_logits(logits[1:], reference)


@pytest.mark.slow
def test_saved_model_segment_is_pspnets_default_mode(user_saved_model, user_h5):
    result, path = user_saved_model
    assert result.returncode == 0, result.stderr
    segment = tf.saved_model.load(str(path)).signatures["serving_default"]
    net = PSPNet(weights=user_h5)
    photo = utils.read_image(PHOTO)
    images = {"photo": photo, "small": photo[:50, :37], "thin": photo[:143, :20]}
    for name, image in images.items():
        outputs = segment(image=tf.constant(image))
        class_ids, max_probability = outputs["class_ids"].numpy(), outputs["max_probability"].numpy()
        assert class_ids.dtype == np.uint8 and max_probability.dtype == np.float32
        assert class_ids.shape == max_probability.shape == image.shape[:2]
        probabilities = net.predict(image)
        expected = probabilities.argmax(axis=-1)
        assert len(np.unique(expected)) > 1
        agreement = np.mean(class_ids == expected)
        # A thin image is shrunk 23 times across; Pillow may take the passes of that resize
        # in the other order, which moves more grey levels by one (see graph.resize_image).
        assert agreement >= (MIN_ARGMAX_AGREEMENT if name != "thin" else 0.99), (name, agreement)
        assert np.mean(np.abs(max_probability - probabilities.max(axis=-1))) <= 2e-3, name


class Doubler(tf.Module):
    """A one-operation model with the exported signature: logits = 2 * data, for a (1, 4, 4, 3) crop."""

    @tf.function(input_signature=[tf.TensorSpec((1, 4, 4, 3), tf.float32, name="data")])
    def logits(self, data):
        return {"logits": data * 2.0}


# Runs the LiteRT runtime on sys.argv[1] in a fresh process (the interpreter's notice comes
# once a process), its interpreter writing one more line of its own on file descriptor 2.
LITERT_PROGRAM = """
import os, sys
import numpy
from ai_edge_litert import interpreter
from pspnet_keras.export import runtimes

class Noisy(interpreter.Interpreter):
    def __init__(self, *args, **kwargs):
        os.write(2, b"native: kept\\n")
        super().__init__(*args, **kwargs)

interpreter.Interpreter = Noisy
logits = runtimes.litert_logits(sys.argv[1], numpy.ones((2, 4, 4, 3), numpy.float32), None)
print(logits.shape, float(logits.max()))
"""


def test_litert_runtime_hides_the_interpreters_delegate_notice_and_nothing_else(tmp_path):
    doubler = Doubler()
    tf.saved_model.save(doubler, tmp_path / "saved", signatures={"logits": doubler.logits})
    content = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "saved"), signature_keys=["logits"]).convert()
    path = tmp_path / "doubler.tflite"
    path.write_bytes(content)
    unfiltered = (
        "import sys, numpy; from ai_edge_litert.interpreter import Interpreter; "
        "Interpreter(model_path=sys.argv[1]).get_signature_runner('logits')(data=numpy.ones((1, 4, 4, 3), 'float32'))"
    )
    opened = subprocess.run(
        [sys.executable, "-c", unfiltered, path], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
    )
    assert "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." in opened.stderr.splitlines()
    result = subprocess.run(
        [sys.executable, "-c", LITERT_PROGRAM, path], capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "(2, 4, 4, 3) 2.0\n"
    assert result.stderr == "native: kept\n"


# ---------------------------------------------------------------------------------------
# Refusals: one line, exit 1, nothing written


def shifted_logits(opened):
    """A runtime whose logits are `opened`'s with one value moved by 2e-4 of the logit range."""

    def shifted(path, crops, config):
        logits = np.array(opened(path, crops, config))
        logits[0, 0, 0, 0] += 2e-4 * np.ptp(logits)
        return logits

    return shifted


def failing_runtime(opened):
    """A runtime that cannot run the file."""

    def fail(path, crops, config):
        raise RuntimeError("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Required inputs are missing\nand more")

    return fail


@pytest.mark.parametrize(
    "runtime, problem",
    [
        (shifted_logits, "opened in Keras, its logits on a random crop differ from the Keras network's by 2.0e-04 "
                         "of the logit range (at most 1e-04) and their argmax agrees on "),
        (failing_runtime, "Keras cannot run the file ([ONNXRuntimeError] : 2 : INVALID_ARGUMENT : Required inputs "
                          "are missing); nothing was written"),
    ],
)
def test_file_failing_the_check_is_not_left_behind(tmp_path, monkeypatch, user_h5, runtime, problem):
    monkeypatch.setitem(runtimes.RUNTIMES, "keras", runtime(runtimes.RUNTIMES["keras"]))
    path = tmp_path / "out" / "mine.keras"
    result = run_main("-w", user_h5, "--format", "keras", "-o", path)
    assert result.code == 1
    line = only_error_line(result.stderr)
    assert line.startswith(f"export.py: error: {path}: {problem}") and line.endswith("; nothing was written")
    assert listing(tmp_path) == []


@pytest.mark.parametrize("module", ["onnxruntime", "tf2onnx", "ai_edge_litert"])
def test_missing_dependency_names_the_pip_command(tmp_path, monkeypatch, user_h5, module):
    monkeypatch.setitem(sys.modules, module, None)
    file_format = "litert" if module == "ai_edge_litert" else "onnx"
    result = run_main("-w", user_h5, "--format", file_format, "-o", tmp_path / "mine.out")
    assert result.code == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: --format {file_format} needs {module}, not installed: "
        f"python -m pip install -r {PROJECT_ROOT / 'requirements-export.txt'}"
    )
    assert listing(tmp_path) == []


def test_swap_puts_the_new_folder_and_file_in_place_and_the_old_ones_aside(tmp_path):
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "saved_model.pb").write_text("old")
    (tmp_path / "served.json").write_text("old description")
    staging = tmp_path / ".served.tmp"
    (staging / "served").mkdir(parents=True)
    (staging / "served" / "saved_model.pb").write_text("new")
    (staging / "served.json").write_text("new description")
    staged_targets = [(staging / "served", tmp_path / "served"), (staging / "served.json", tmp_path / "served.json")]
    transaction.swap_in(staged_targets, staging / "previous")
    assert (tmp_path / "served" / "saved_model.pb").read_text() == "new"
    assert (tmp_path / "served.json").read_text() == "new description"
    assert (staging / "previous" / "0" / "saved_model.pb").read_text() == "old"
    assert (staging / "previous" / "1").read_text() == "old description"
    assert listing(tmp_path) == [
        ".served.tmp", ".served.tmp/previous", ".served.tmp/previous/0", ".served.tmp/previous/0/saved_model.pb",
        ".served.tmp/previous/1", "served", "served.json", "served/saved_model.pb",
    ]


def test_missing_weights_are_named(tmp_path):
    result = run_export("-w", tmp_path / "absent.h5", "--format", "keras", cwd=tmp_path)
    assert result.returncode == 1
    assert only_error_line(result.stderr) == f"export.py: error: {tmp_path / 'absent.h5'}: no such weights file"
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    "file_format, output, problem",
    [
        ("onnx", "blocker/model.onnx", "cannot create the output directory ({}/blocker is not a directory)"),
        ("onnx", "folder", "is a directory"),
        ("saved_model", "folder", "holds files that it would lose (keep.txt); refusing to replace it"),
        ("onnx", "blocker", "exists; pass --overwrite to replace it, or choose another path"),
        ("keras", "model.h5", "a Keras archive's name must end in .keras (keras.saving.load_model goes by it)"),
    ],
)
def test_unwritable_output_is_refused_before_any_work(tmp_path, released_h5, file_format, output, problem):
    (tmp_path / "blocker").write_text("a file")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "keep.txt").write_text("kept")
    before = listing(tmp_path)
    result = run_main("-w", released_h5, "--format", file_format, "-o", tmp_path / output)
    assert result.code == 1
    assert only_error_line(result.stderr) == f"export.py: error: {tmp_path / output}: {problem.format(tmp_path)}"
    assert listing(tmp_path) == before


def test_export_named_like_the_description_is_refused(tmp_path, user_h5):
    result = run_main("-w", user_h5, "--format", "onnx", "-o", tmp_path / "mine.json")
    assert result.code == 1
    assert only_error_line(result.stderr) == (
        f"export.py: error: {tmp_path / 'mine.json'}: is where the model's description goes; name the export otherwise"
    )


def test_released_model_flag_with_a_user_model_is_refused(tmp_path, user_h5):
    result = run_main("-m", RELEASED, "-w", user_h5, "--format", "keras", "-o", tmp_path / "mine.keras")
    assert result.code == 1
    assert "leave out -m pspnet50_ade20k" in only_error_line(result.stderr)
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--format", "tensorrt"], "argument --format: invalid choice: 'tensorrt'"),
        (["--format", "onnx", "--opset", "12"], "argument --opset: invalid choice: 12 (choose from 17, 18)"),
        (["--format", "litert", "--opset", "18"], "--opset applies to --format onnx, not litert"),
        ([], "the following arguments are required: --format"),
        (["-m", "pspnet18_mnist", "--format", "onnx"], "argument -m/--model: invalid choice: 'pspnet18_mnist'"),
    ],
)
def test_wrong_command_line_is_a_usage_error(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main(args)
    assert exit_info.value.code == cli.EXIT_USAGE
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"export.py: error: {message}")


def test_help_names_every_option():
    text = export.argument_parser().format_help()
    for option in (
        "--model", "--weights", "--format", "--output-path", "--overwrite", "--opset", "--quiet", "segment", "logits"
    ):
        assert option in text
