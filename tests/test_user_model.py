"""A user's own model (weights + JSON description beside them) through pspnet.py.

The model is a synthetic 5-class ResNet-50 at crop 233: the converted synthetic
pspnet50_ade20k weights (conftest) with a new seeded 5-class conv6, written in
the Keras-2 layout, with its description. Expected outputs come from the Keras
network called directly, the description's palette and names.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import layers_builder
from bench.synthetic_caffe import write_classifier_only_weights
from helpers import check_outputs
from helpers import decoded
from helpers import error_lines
from helpers import output_files
from helpers import run_cli
from helpers import run_main
from helpers import save_image
from helpers import smooth_image
from helpers import softmax
from pspnet_keras import models

CLASSES = 5
CROP_SIZE = 233
CLASS_NAMES = ["background", "road", "roof", "tree", "water"]
PALETTE = [[0, 0, 0], [200, 10, 10], [10, 200, 10], [10, 10, 200], [250, 250, 0]]
MEAN_RGB = [110.0, 115.0, 100.0]
CLASSIFIER_SEED = 5
CLASSIFIER_STD = 0.33


def description(**changes):
    """The JSON object describing the test's model, with `changes` applied (None removes a field)."""
    data = {
        "format": "pspnet-keras", "version": 1, "depth": 50, "classes": CLASSES,
        "crop_size": CROP_SIZE, "base_size": 256, "class_names": CLASS_NAMES, "palette": PALETTE,
        "mean_rgb": MEAN_RGB,
    }
    data.update(changes)
    return {key: value for key, value in data.items() if value is not None}


def write_user_model(directory, source_h5, stem="mine"):
    """Writes <stem>.h5 (released backbone + a seeded 5-class conv6) and <stem>.json; returns the .h5 path."""
    arrays = layers_builder.read_weights(source_h5)
    rng = np.random.default_rng(CLASSIFIER_SEED)
    arrays["conv6"] = [
        rng.normal(0, CLASSIFIER_STD, (1, 1, 512, CLASSES)).astype(np.float32),
        rng.normal(0, 0.5, CLASSES).astype(np.float32),
    ]
    names = {"conv6": ["kernel", "bias"]}
    layers = [
        (name, list(zip(names.get(name) or bn_or_conv_names(len(values)), values))) for name, values in arrays.items()
    ]
    weights = Path(directory) / f"{stem}.h5"
    layers_builder.write_weights(weights, layers)
    weights.with_suffix(".json").write_text(json.dumps(description()))
    return weights


def bn_or_conv_names(count):
    """Keras weight names of a BN layer (4 arrays) or a bias-free convolution (1)."""
    return ["gamma", "beta", "moving_mean", "moving_variance"] if count == 4 else ["kernel"]


@pytest.fixture(scope="module")
def user_weights(tmp_path_factory, synthetic_model):
    return write_user_model(tmp_path_factory.mktemp("user_model"), synthetic_model("pspnet50_ade20k").converted_h5)


@pytest.fixture(scope="module")
def user_logits(user_weights):
    """The Keras network of the user model, called directly on a crop-sized image: (image, logits)."""
    config = models.read_description(user_weights.with_suffix(".json"))
    model = layers_builder.build_pspnet(config)
    layers_builder.load_weights(model, user_weights)
    image = smooth_image(CROP_SIZE, CROP_SIZE, 11)
    network_input = (image - np.array(MEAN_RGB))[..., ::-1].astype(np.float32)
    return image, np.asarray(model(network_input[np.newaxis], training=False), dtype=np.float64)[0]


@pytest.mark.slow
def test_single_image_gets_the_networks_softmax_and_the_descriptions_colours(tmp_path, user_weights, user_logits):
    image, logits = user_logits
    source = save_image(tmp_path / "crop.png", image)
    result = run_main("-w", user_weights, "-i", source, "-o", tmp_path / "out" / "crop.png", "--save-probs",
                      "--no-flip", "-v")
    assert result.code == 0, result.stderr
    probabilities = np.load(tmp_path / "out" / "crop_probs.npy")
    assert probabilities.shape == (CROP_SIZE, CROP_SIZE, CLASSES)
    np.testing.assert_allclose(probabilities, softmax(logits), atol=1e-5)
    assert len(np.unique(probabilities.argmax(axis=-1))) >= 2
    outputs = {kind: tmp_path / "out" / path for kind, path in output_files("crop", ".png").items()}
    check_outputs(image, probabilities, outputs, palette=np.array(PALETTE))
    listed = result.stdout.splitlines()[1:]
    for class_id in np.unique(probabilities.argmax(axis=-1)):
        assert any(line.split()[0] == str(class_id) and CLASS_NAMES[class_id] in line for line in listed)


@pytest.mark.slow
def test_glob_run_of_a_user_model(tmp_path, user_weights):
    for name, (height, width) in {"wide.png": (60, 150), "tall.jpg": (140, 50)}.items():
        save_image(tmp_path / "in" / name, smooth_image(height, width, 12))
    result = run_main("-w", user_weights, "-g", tmp_path / "in" / "*", "-o", tmp_path / "out", "--save-probs", "-q")
    assert result.code == 0, result.stderr
    for stem, ext, shape in (("wide", ".png", (60, 150)), ("tall", ".jpg", (140, 50))):
        probabilities = np.load(tmp_path / "out" / f"{stem}_probs.npy")
        assert probabilities.shape == (*shape, CLASSES)
        np.testing.assert_allclose(probabilities.sum(axis=-1), 1, atol=1e-5)
        class_ids = decoded(tmp_path / "out" / f"{stem}_seg_read.png")
        np.testing.assert_array_equal(class_ids, probabilities.argmax(axis=-1))
        if ext == ".png":
            np.testing.assert_array_equal(decoded(tmp_path / "out" / f"{stem}_seg.png"), np.array(PALETTE)[class_ids])


def test_model_flag_with_a_user_model_is_refused(tmp_path, user_weights):
    source = save_image(tmp_path / "a.png", smooth_image(30, 40, 1))
    result = run_main("-m", "pspnet50_ade20k", "-w", user_weights, "-i", source)
    assert result.code == 1
    (line,) = error_lines(result.stderr)
    assert str(user_weights.with_suffix(".json")) in line and "leave out -m pspnet50_ade20k" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.png"]


@pytest.mark.parametrize(
    "changes, field, problem",
    [
        ({"classes": 4}, "class_names", "has 5 names for 4 classes"),
        ({"crop_size": 240}, "crop_size", "48k - 7 (for example 233 or 281)"),
        ({"palette": PALETTE[:4] + [[0, 0, 256]]}, "palette", "integer 0-255"),
        ({"depth": 34}, "depth", "one of 50, 101"),
        ({"class_names": None}, "class_names", "list of non-empty strings"),
        ({"format": "keras"}, "format", "pspnet-keras"),
        ({"base_size": "512"}, "base_size", "must be an integer"),
        ({"mean_rbg": MEAN_RGB}, "mean_rbg", "is not a field of a model description (did you mean 'mean_rgb'?)"),
        # float32 input and 5 logits at 95993^2, conv5's 2048 channels at 1/8: 4 * (95993^2 * 8 + 12000^2 * 2048) B
        ({"crop_size": 95993}, "crop_size", "95993: a forward pass of 95993 px needs at least 1373.3 GiB of memory"),
        ({"base_size": 10**9}, "base_size", "an image scaled to 1000000000 x 1000000000 needs at least"),
    ],
)
def test_invalid_description_is_one_line_naming_file_and_field(tmp_path, changes, field, problem):
    weights = write_classifier_only_weights(tmp_path / "bad.h5", CLASSES)
    weights.with_suffix(".json").write_text(json.dumps(description(**changes)))
    source = save_image(tmp_path / "a.png", smooth_image(30, 40, 1))
    result = run_cli("-w", weights, "-i", source, "-o", tmp_path / "out" / "a.png")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [result.stderr.strip()]
    line = result.stderr.strip()
    assert line.startswith(f"pspnet.py: error: {weights.with_suffix('.json')}: field '{field}' ") and problem in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply for a model description"),
        (b" " * (models.MAX_DESCRIPTION_BYTES + 1), "larger than 1024 KiB, too large for a model description"),
        (b'{"format": "pspnet-keras\xff"}', "not UTF-8 text (invalid start byte at byte 24)"),
        (b"[1, 2]", "not a model description (a JSON object is expected)"),
    ],
)
def test_description_that_is_no_description_is_one_line(tmp_path, content, problem):
    weights = write_classifier_only_weights(tmp_path / "bad.h5", CLASSES)
    weights.with_suffix(".json").write_bytes(content)
    source = save_image(tmp_path / "a.png", smooth_image(30, 40, 1))
    result = run_main("-w", weights, "-i", source, "-o", tmp_path / "out" / "a.png")
    assert (result.code, result.stderr) == (1, f"pspnet.py: error: {weights.with_suffix('.json')}: {problem}\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "changes, weights_classes, problem",
    [
        ({}, 7, "field 'classes' says 5, but the weights {weights} hold 7 classes (layer conv6)"),
        ({"depth": 101}, CLASSES, "field 'depth' says 101, but the weights {weights} are a ResNet-50's"),
    ],
)
def test_description_that_lies_about_the_weights_is_named(tmp_path, changes, weights_classes, problem):
    weights = write_classifier_only_weights(tmp_path / "mine.h5", weights_classes)
    weights.with_suffix(".json").write_text(json.dumps(description(crop_size=41, **changes)))
    source = save_image(tmp_path / "a.png", smooth_image(30, 40, 1))
    result = run_main("-w", weights, "-i", source, "-o", tmp_path / "out" / "a.png")
    expected = problem.format(weights=weights)
    assert (result.code, result.stderr) == (1, f"pspnet.py: error: {weights.with_suffix('.json')}: {expected}\n")


KERAS2_MODEL_CONFIG = {"class_name": "Model", "config": {"name": "model_1", "layers": []}, "keras_version": "2.1.5"}


def test_keras2_model_config_as_weights_is_refused(tmp_path):
    config = tmp_path / "pspnet50_ade20k.json"
    config.write_text(json.dumps(KERAS2_MODEL_CONFIG))
    source = save_image(tmp_path / "a.png", smooth_image(30, 40, 1))
    result = run_cli("-w", config, "-i", source)
    assert result.returncode == 1
    assert result.stderr == (
        f"pspnet.py: error: {config}: a Keras-2 model config; the architecture is built in code, "
        "pass the weights (.h5) with -w instead\n"
    )


def test_keras2_model_config_beside_released_weights_is_ignored(tmp_path):
    weights = tmp_path / "pspnet50_ade20k.h5"
    weights.with_suffix(".json").write_text(json.dumps(KERAS2_MODEL_CONFIG))
    assert models.resolve_model(None, weights) is models.RELEASED_MODELS["pspnet50_ade20k"]
    assert models.resolve_model("pspnet101_voc2012", weights) is models.RELEASED_MODELS["pspnet101_voc2012"]


def test_description_round_trips_through_model_config(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps(description()))
    config = models.read_description(path)
    assert (config.name, config.depth, config.classes, config.crop_size, config.base_size) == ("m", 50, 5, 233, 256)
    assert config.description() == description()
    assert not config.released and config.dataset is None
