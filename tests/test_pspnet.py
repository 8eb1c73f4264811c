"""Tests of pspnet.py: the command line, its output files and its Python API.

End-to-end runs use pspnet50_ade20k with synthetic weights converted by
weight_converter.py (conftest), on small images. Expected outputs are computed
here from the saved probabilities, the palette of color150.mat and the output formulas, and from
the Keras network called directly (not through inference.py). Argument, file
and progress handling is checked quickly with a stand-in network.
"""

import errno
import io
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import pspnet
import utils
from bench.synthetic_caffe import write_classifier_only_weights
from helpers import ADE20K_CLASSES
from helpers import CROP_SIZE
from helpers import EVERY_FLAG
from helpers import MEAN_RGB
from helpers import MODEL
from helpers import PROJECT_ROOT
from helpers import check_outputs
from helpers import decoded
from helpers import error_lines
from helpers import file_size_limit
from helpers import output_files
from helpers import run_cli
from helpers import run_main
from helpers import save_image
from helpers import smooth_image
from helpers import softmax
from pspnet_keras import cpu
from pspnet_keras import models
from pspnet_keras import runtime
from pspnet_keras import segmenter

# ---------------------------------------------------------------------------------------
# End to end, with the real network and converted synthetic weights


@pytest.fixture(scope="module")
def weights_h5(synthetic_model):
    return synthetic_model(MODEL).converted_h5


@pytest.fixture(scope="module")
def network(weights_h5):
    """The network the cached end-to-end runs share (built once)."""
    return pspnet.PSPNet(MODEL, weights=weights_h5)


@pytest.fixture
def reuse_network(monkeypatch, network):
    """Makes pspnet.main use the already built network instead of building its own."""
    def construct(model, weights=None, show_progress=True, precision="float32"):
        assert (model.name, precision) == (MODEL, "float32")
        return network

    monkeypatch.setattr(segmenter, "PSPNet", construct)


@pytest.fixture(scope="module")
def batch(tmp_path_factory, weights_h5):
    """One -g run over a folder of two small images, a crop-sized one and a broken file."""
    folder = tmp_path_factory.mktemp("batch")
    images = {
        "small.png": smooth_image(90, 120, 1),
        "portrait.jpg": smooth_image(120, 90, 2),
        "square.png": smooth_image(CROP_SIZE, CROP_SIZE, 3),
    }
    for name, pixels in images.items():
        save_image(folder / "in" / name, pixels)
    (folder / "in" / "broken.png").write_bytes(b"this is not an image\n")
    result = run_main(
        "-m", MODEL, "-w", weights_h5, "-g", folder / "in" / "*", "-o", folder / "out", "--save-probs", "--no-flip",
        "-q",
    )
    return SimpleNamespace(result=result, folder=folder, out=folder / "out")


@pytest.mark.slow
def test_batch_skips_the_broken_file_and_fails_at_the_end(batch):
    assert batch.result.code == 1
    assert error_lines(batch.result.stderr) == [
        f"pspnet.py: error: {batch.folder / 'in' / 'broken.png'}: neither an image Pillow can read nor a video PyAV can open"
    ]
    assert batch.result.stdout == ""
    written = sorted(path.name for path in batch.out.iterdir())
    expected = sorted(
        path.name
        for stem, ext in (("small", ".png"), ("portrait", ".jpg"), ("square", ".png"))
        for path in output_files(stem, ext).values()
    )
    assert written == expected


@pytest.mark.slow
@pytest.mark.parametrize("stem, ext, shape", [("small", ".png", (90, 120)), ("portrait", ".jpg", (120, 90))])
def test_batch_outputs_follow_the_saved_probabilities(batch, stem, ext, shape):
    probabilities = np.load(batch.out / f"{stem}_probs.npy")
    assert probabilities.dtype == np.float32 and probabilities.shape == (*shape, ADE20K_CLASSES)
    assert np.all(probabilities >= 0)
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1, atol=1e-5)
    image = decoded(batch.folder / "in" / f"{stem}{ext}")
    outputs = {kind: batch.out / path for kind, path in output_files(stem, ext).items()}
    check_outputs(image, probabilities, outputs, exact_pictures=ext == ".png")
    if ext == ".jpg":
        for kind in ("seg", "seg_blended", "probs"):
            with Image.open(outputs[kind]) as picture:
                assert picture.format == "JPEG"


@pytest.fixture(scope="module")
def square_logits(network):
    """Logits of the crop-sized test image and of its mirror image, from the Keras model itself."""
    image = smooth_image(CROP_SIZE, CROP_SIZE, 3)
    network_input = (image - MEAN_RGB)[..., ::-1].astype(np.float32)
    logits = network.model(np.stack([network_input, network_input[:, ::-1]]), training=False)
    return np.asarray(logits, dtype=np.float64)


@pytest.mark.slow
def test_crop_sized_image_gets_the_plain_network_softmax(batch, square_logits):
    image = decoded(batch.folder / "in" / "square.png")
    np.testing.assert_array_equal(image, smooth_image(CROP_SIZE, CROP_SIZE, 3))
    probabilities = np.load(batch.out / "square_probs.npy")
    np.testing.assert_allclose(probabilities, softmax(square_logits[0]), atol=1e-5)
    outputs = {kind: batch.out / path for kind, path in output_files("square", ".png").items()}
    check_outputs(image, probabilities, outputs)


@pytest.mark.slow
def test_flip_adds_the_mirrored_logits_and_verbose_lists_every_class(tmp_path, reuse_network, square_logits):
    image = smooth_image(CROP_SIZE, CROP_SIZE, 3)
    source = save_image(tmp_path / "square.png", image)
    result = run_main("-i", source, "-o", tmp_path / "out" / "square.png", "--save-probs", "-v")
    assert result.code == 0, result.stderr
    probabilities = np.load(tmp_path / "out" / "square_probs.npy")
    flipped = softmax(square_logits[0] + square_logits[1, :, ::-1])
    # The CLI adds the two passes' logits before the x8 upsampling, in float32: 1.2e-5 at 4 of 33
    # million probabilities on PyTorch, within 1e-5 on TensorFlow and JAX.
    np.testing.assert_allclose(probabilities, flipped, atol=2e-5)
    assert np.abs(flipped - softmax(square_logits[0])).max() > 0.01
    outputs = {kind: tmp_path / "out" / path for kind, path in output_files("square", ".png").items()}
    check_outputs(image, probabilities, outputs)

    class_ids = probabilities.argmax(axis=-1)
    present, counts = np.unique(class_ids, return_counts=True)
    names = models.RELEASED_MODELS[MODEL].class_names
    lines = result.stdout.splitlines()
    assert lines[0] == f"{source}: {len(present)} classes"
    listed = {int(line.split()[0]): line for line in lines[1:]}
    assert sorted(listed) == sorted(present.tolist())
    for class_id, count in zip(present, counts):
        assert names[class_id] in listed[class_id]
        assert f"{count / class_ids.size:.2%}" in listed[class_id]


@pytest.mark.slow
def test_predict_passes_the_protocol_to_the_predictor(network, monkeypatch):
    calls = []

    class RecordingPredictor:
        def predict(self, img, **protocol):
            calls.append((img, protocol))
            return "probabilities"

    monkeypatch.setattr(network, "predictor", RecordingPredictor())
    image = smooth_image(9, 12, 5)
    assert network.predict(image, sliding=True, flip=False, multi_scale=True) == "probabilities"
    assert network.predict(image) == "probabilities"
    assert calls[0][0] is image
    assert calls[0][1] == {"sliding": True, "flip": False, "multi_scale": True, "progress": None}
    assert calls[1][1] == {"sliding": False, "flip": True, "multi_scale": False, "progress": None}


@pytest.mark.slow
def test_api_attributes(network):
    assert (network.model_name, network.dataset) == (MODEL, "ade20k")
    assert network.config is models.RELEASED_MODELS[MODEL]
    assert (network.classes, network.crop_size, network.base_size) == (150, 473, 512)
    assert network.forward_count(90, 120, sliding=True, flip=True) == 4
    assert network.forward_count(90, 120) == 2


@pytest.mark.slow
def test_class_map_is_the_argmax_and_max_of_predict(network):
    image = smooth_image(50, 70, 4)
    probabilities = network.predict(image, flip=False)
    streamed = np.zeros_like(probabilities)
    class_ids, confidence = network.class_map(image, flip=False, probabilities=streamed)
    assert class_ids.dtype == np.uint8 and confidence.dtype == np.float32
    np.testing.assert_array_equal(class_ids, probabilities.argmax(axis=-1))
    np.testing.assert_allclose(confidence, probabilities.max(axis=-1), atol=1e-6)
    np.testing.assert_allclose(streamed, probabilities, atol=1e-6)


def test_missing_weights_file_is_one_clear_error(tmp_path):
    source = save_image(tmp_path / "a.png", smooth_image(30, 40, 6))
    result = run_main("-i", source, "-w", tmp_path / "absent.h5", "-q")
    assert result.code == 1
    assert result.stderr == f"pspnet.py: error: {tmp_path / 'absent.h5'}: no such weights file\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.png"]


def test_weights_that_do_not_fit_are_one_clear_error(tmp_path):
    source = save_image(tmp_path / "a.png", smooth_image(30, 40, 6))
    weights = write_classifier_only_weights(tmp_path / "voc_classifier.h5", 21)
    result = run_main("-i", source, "-w", weights, "-q")
    assert result.code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"pspnet.py: error: {weights}: ") and "conv1_1_3x3_s2" in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.png", "voc_classifier.h5"]


# ---------------------------------------------------------------------------------------
# Arguments, files and progress, with a stand-in network


class StandInNetwork:
    """Stands in for pspnet.PSPNet: ADE20K class 2 (sky) where red >= 128, else 12 (person).

    The winning class gets probability 0.7, the others share the rest. Every
    construction and prediction is recorded on the class.
    """

    constructions = []
    predictions = []

    def __init__(self, model=None, weights=None, show_progress=True, precision="float32"):
        config = model if isinstance(model, models.ModelConfig) else models.resolve_model(model, weights)
        StandInNetwork.constructions.append((config.name, weights))
        self.model_name, self.dataset, self.classes = config.name, config.dataset, config.classes
        self.class_names, self.palette = config.class_names, np.array(config.palette, np.uint8)

    def forward_count(self, height, width, sliding=False, flip=True, multi_scale=False):
        return (12 if multi_scale else 4 if sliding else 1) * (2 if flip else 1)

    def class_map(self, img, sliding=False, flip=True, multi_scale=False, progress=None, probabilities=None):
        StandInNetwork.predictions.append({"sliding": sliding, "flip": flip, "multi_scale": multi_scale})
        for _ in range(self.forward_count(*img.shape[:2], sliding, flip, multi_scale)):
            progress(1)
        winner = np.where(img[..., 0] >= 128, 2, 12).astype(np.uint8)
        if probabilities is not None:
            probabilities[:] = 0.3 / (self.classes - 1)
            np.put_along_axis(probabilities, winner[..., np.newaxis].astype(np.intp), 0.7, axis=-1)
        return winner, np.full(img.shape[:2], 0.7, np.float32)


@pytest.fixture
def stand_in(monkeypatch):
    monkeypatch.setattr(StandInNetwork, "constructions", [])
    monkeypatch.setattr(StandInNetwork, "predictions", [])
    monkeypatch.setattr(segmenter, "PSPNet", StandInNetwork)
    return StandInNetwork


def sky_and_person(height=40, width=60, sky_columns=45):
    """An image whose left `sky_columns` columns the stand-in calls sky, the rest person."""
    pixels = np.full((height, width, 3), 40, np.uint8)
    pixels[:, :sky_columns, 0] = 200
    return pixels


@pytest.mark.parametrize(
    "flags, protocol",
    [
        ([], (False, True, False)),
        (["-f"], (False, True, False)),
        (["--no-flip"], (False, False, False)),
        (["-s"], (True, True, False)),
        (["--sliding", "--no-flip"], (True, False, False)),
        (["-ms"], (False, True, True)),
        (["-s", "--multi_scale", "--flip"], (True, True, True)),
    ],
)
def test_protocol_flags_reach_the_network(tmp_path, stand_in, flags, protocol):
    source = save_image(tmp_path / "a.png", sky_and_person())
    result = run_main("-i", source, "-q", *flags)
    assert result.code == 0, result.stderr
    assert stand_in.predictions == [dict(zip(("sliding", "flip", "multi_scale"), protocol))]


def test_model_and_weights_flags_reach_the_network(tmp_path, stand_in):
    source = save_image(tmp_path / "a.png", sky_and_person())
    assert run_main("-i", source, "-q").code == 0
    assert run_main("-i", source, "-q", "-m", "pspnet101_voc2012", "-w", "mine.h5").code == 0
    assert stand_in.constructions == [(MODEL, None), ("pspnet101_voc2012", "mine.h5")]


def test_glob_loads_the_network_once_and_names_outputs_after_inputs(tmp_path, stand_in):
    save_image(tmp_path / "in" / "one.png", sky_and_person())
    save_image(tmp_path / "in" / "two.jpg", sky_and_person())
    save_image(tmp_path / "in" / "sub" / "three.bmp", sky_and_person())
    out = tmp_path / "deep" / "new" / "out"
    result = run_main("-g", tmp_path / "in" / "**" / "*", "-o", out, "-q")
    assert result.code == 1  # the folder "sub" matches the pattern too and is not an image
    assert error_lines(result.stderr) == [
        f"pspnet.py: error: {tmp_path / 'in' / 'sub'}: is a directory, not a file"
    ]
    assert len(stand_in.constructions) == 1 and len(stand_in.predictions) == 3
    expected = [path.name for stem, ext in (("one", ".png"), ("two", ".jpg"), ("three", ".bmp"))
                for path in output_files(stem, ext, probs=False).values()]
    assert sorted(path.name for path in out.iterdir()) == sorted(expected)


def test_outputs_next_to_the_input_by_default(tmp_path, stand_in):
    source = save_image(tmp_path / "photo.png", sky_and_person())
    assert run_main("-i", source, "-q", "--save-probs").code == 0
    expected = ["photo.png"] + [path.name for path in output_files("photo", ".png").values()]
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(expected)


def test_output_without_extension_takes_the_input_one(tmp_path, stand_in):
    source = save_image(tmp_path / "photo.jpg", sky_and_person())
    assert run_main("-i", source, "-o", tmp_path / "out" / "result", "-q").code == 0
    expected = [path.name for path in output_files("result", ".jpg", probs=False).values()]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(expected)


def test_output_directory_with_single_input(tmp_path, stand_in):
    source = save_image(tmp_path / "photo.png", sky_and_person())
    (tmp_path / "out").mkdir()
    assert run_main("-i", source, "-o", tmp_path / "out", "-q").code == 0
    expected = [path.name for path in output_files("photo", ".png", probs=False).values()]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(expected)


def test_stand_in_outputs_are_exact(tmp_path, stand_in):
    image = sky_and_person()
    source = save_image(tmp_path / "a.png", image)
    assert run_main("-i", source, "-o", tmp_path / "b.png", "-q", "--save-probs").code == 0
    outputs = {kind: tmp_path / path for kind, path in output_files("b", ".png").items()}
    probabilities = np.load(outputs["probs_npy"])
    np.testing.assert_array_equal(probabilities.argmax(axis=-1), np.where(image[..., 0] >= 128, 2, 12))
    check_outputs(image, probabilities, outputs)
    np.testing.assert_array_equal(decoded(outputs["probs"]), np.full(image.shape[:2], 178))  # round(0.7 * 255)


def test_default_summary_is_one_line_per_image(tmp_path, stand_in):
    save_image(tmp_path / "a.png", sky_and_person(sky_columns=45))
    save_image(tmp_path / "b.png", sky_and_person(sky_columns=15))
    result = run_main("-g", tmp_path / "*.png", "-o", tmp_path / "out")
    assert result.code == 0
    assert result.stdout.splitlines() == [
        f"{tmp_path / 'a.png'}: sky 75.0%, person 25.0%",
        f"{tmp_path / 'b.png'}: person 75.0%, sky 25.0%",
    ]


def test_quiet_prints_nothing(tmp_path, stand_in):
    save_image(tmp_path / "a.png", sky_and_person())
    save_image(tmp_path / "b.png", sky_and_person())
    result = run_main("-g", tmp_path / "*.png", "-o", tmp_path / "out", "-ms", "-q")
    assert (result.code, result.stdout, result.stderr) == (0, "", "")


def test_an_image_is_written_while_the_next_goes_through_the_network(tmp_path, stand_in, monkeypatch):
    """The outputs of a.png are written once b.png is in the network: a's writer waits (up to 10 s) for
    b's prediction, which a run writing each image before segmenting the next would never reach."""
    for name in ("a", "b", "c"):
        save_image(tmp_path / f"{name}.png", sky_and_person())
    second_prediction = threading.Event()
    predict = StandInNetwork.class_map

    def class_map(self, img, **protocol):
        if len(StandInNetwork.predictions) == 1:
            second_prediction.set()
        return predict(self, img, **protocol)

    writer = utils.image_writer
    waits = []

    def image_writer(path, array):
        if Path(path).name.startswith("a_"):
            waits.append(second_prediction.wait(timeout=10))
        return writer(path, array)

    monkeypatch.setattr(StandInNetwork, "class_map", class_map)
    monkeypatch.setattr(utils, "image_writer", image_writer)
    result = run_main("-g", tmp_path / "*.png", "-o", tmp_path / "out")
    assert result.code == 0, result.stderr
    assert waits == [True] * 4
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [
        str(tmp_path / f"{name}.png") for name in ("a", "b", "c")
    ]


def test_an_image_whose_outputs_cannot_be_written_is_reported_in_its_turn(tmp_path, stand_in, monkeypatch):
    for name in ("a", "b", "c"):
        save_image(tmp_path / f"{name}.png", sky_and_person())
    writer = utils.image_writer

    def full_disk(temporary):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def image_writer(path, array):
        return full_disk if Path(path).name == "b_seg_blended.png" else writer(path, array)

    monkeypatch.setattr(utils, "image_writer", image_writer)
    result = run_main("-g", tmp_path / "*.png", "-o", tmp_path / "out")
    assert result.code == 1
    assert error_lines(result.stderr) == [
        f"pspnet.py: error: {tmp_path / 'out' / 'b_seg_blended.png'}: cannot write (No space left on device)"
    ]
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [
        str(tmp_path / "a.png"), str(tmp_path / "c.png")
    ]
    expected = [path.name for stem in ("a", "c") for path in output_files(stem, ".png", probs=False).values()]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(expected)


def test_progress_counts_images_and_forward_passes(tmp_path, stand_in):
    save_image(tmp_path / "a.png", sky_and_person())
    save_image(tmp_path / "b.png", sky_and_person())
    result = run_main("-g", tmp_path / "*.png", "-o", tmp_path / "out", "-ms")
    assert result.code == 0
    assert "2/2" in result.stderr and "image" in result.stderr
    assert "forward passes:" in result.stderr and "/24 [" in result.stderr
    few_passes = run_main("-i", tmp_path / "a.png", "-o", tmp_path / "out2" / "a.png")
    assert "forward passes" not in few_passes.stderr and "image/s" not in few_passes.stderr


def test_unwritable_output_is_one_clear_error(tmp_path, stand_in):
    source = save_image(tmp_path / "a.png", sky_and_person())
    (tmp_path / "out" / "b_seg.png").mkdir(parents=True)
    result = run_main("-i", source, "-o", tmp_path / "out" / "b.png", "-q")
    assert result.code == 1
    (line,) = result.stderr.splitlines()
    assert line == f"pspnet.py: error: {tmp_path / 'out' / 'b_seg.png'}: is a directory; choose another -o"
    assert [path.name for path in (tmp_path / "out").iterdir()] == ["b_seg.png"]
    assert stand_in.predictions == []


def test_outputs_of_two_inputs_colliding_are_refused(tmp_path, stand_in):
    save_image(tmp_path / "a.png", sky_and_person())
    save_image(tmp_path / "a.jpg", sky_and_person())
    result = run_main("-g", tmp_path / "a.*", "-o", tmp_path / "out", "-q")
    assert result.code == 1
    (line,) = result.stderr.splitlines()
    assert "a.png" in line and "a.jpg" in line
    assert stand_in.constructions == [] and not (tmp_path / "out").exists()


def test_pspnet50_and_pspnet101_conveniences(stand_in):
    pspnet.PSPNet50(weights="a.h5")
    pspnet.PSPNet101(weights="b.h5")
    pspnet.PSPNet101("cityscapes")
    assert stand_in.constructions == [
        ("pspnet50_ade20k", "a.h5"), ("pspnet101_voc2012", "b.h5"), ("pspnet101_cityscapes", None),
    ]


# ---------------------------------------------------------------------------------------
# The command line as a user runs it (errors found before TensorFlow is imported)


def test_help_lists_every_flag():
    result = run_cli("--help")
    assert result.returncode == 0
    options = {word.strip(",") for line in result.stdout.splitlines() for word in line.split()}
    for flag in EVERY_FLAG:
        assert flag in options, flag


def zero_pixel_png():
    """A PNG whose header declares 0 x 0 pixels."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def truncated_png():
    """The first half of a valid PNG."""
    buffer = io.BytesIO()
    Image.fromarray(smooth_image(60, 80, 7)).save(buffer, format="PNG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.mark.parametrize(
    "name, content, problem",
    [
        ("missing.png", None, "no such file"),
        ("text.png", b"hello\n", "neither an image"),
        ("truncated.png", "truncated", "truncated"),
        ("zero.png", "zero", "neither an image"),
        ("empty.jpg", b"", "empty file"),
        ("folder.png", "folder", "directory"),
    ],
)
def test_bad_input_is_one_line_naming_the_file(tmp_path, name, content, problem):
    source = tmp_path / name
    if content == "folder":
        source.mkdir()
    elif content == "truncated":
        source.write_bytes(truncated_png())
    elif content == "zero":
        source.write_bytes(zero_pixel_png())
    elif content is not None:
        source.write_bytes(content)
    before = sorted(tmp_path.iterdir())
    result = run_cli("-i", source, "-o", tmp_path / "out" / "x.png")
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"pspnet.py: error: {source}: ") and problem in line
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("glob_mode", [False, True])
def test_run_that_would_overwrite_its_input_is_refused(tmp_path, glob_mode):
    source = save_image(tmp_path / "a_seg.png", smooth_image(30, 40, 8))
    content = source.read_bytes()
    if glob_mode:
        save_image(tmp_path / "a.png", smooth_image(30, 40, 9))
        result = run_cli("-g", tmp_path / "*.png", "-o", tmp_path)
    else:
        result = run_cli("-i", source, "-o", tmp_path / "a.png")
    assert result.returncode == 1
    assert result.stderr == (
        f"pspnet.py: error: {source}: is the input image {source}, which this command reads; it is never replaced; "
        "choose another -o\n"
    )
    assert source.read_bytes() == content
    assert sorted(path.name for path in tmp_path.iterdir()) == (["a.png", "a_seg.png"] if glob_mode else ["a_seg.png"])


@pytest.mark.parametrize("named", ["a_seg_read.png", "a_probs.npy"])
def test_outputs_never_replace_the_weights_or_their_description(tmp_path, named):
    """Weights (read by content, whatever their name) and their description named like an output."""
    source = save_image(tmp_path / "a.png", smooth_image(30, 40, 8))
    weights = tmp_path / named
    weights.write_bytes(b"the user's weights")
    result = run_cli("-w", weights, "-i", source, "--save-probs")
    assert result.returncode == 1
    assert result.stderr == (
        f"pspnet.py: error: {weights}: is the weights file {weights}, which this command reads; it is never "
        "replaced; choose another -o\n"
    )
    assert weights.read_bytes() == b"the user's weights"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["a.png", named])


def test_overwrite_refusal_sees_through_relative_paths(tmp_path):
    source = save_image(tmp_path / "a_seg.png", smooth_image(30, 40, 8))
    (tmp_path / "sub").mkdir()
    result = run_cli("-i", "a_seg.png", "-o", "sub/../a.png", cwd=tmp_path)
    assert result.returncode == 1 and "is the input image a_seg.png, which this command reads" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_seg.png", "sub"]
    assert decoded(source).shape == (30, 40, 3)


@pytest.mark.parametrize(
    "output, problem",
    [("out.xyz", "cannot write images with the extension '.xyz'"), ("file.txt/out.png", "is not a directory")],
)
def test_bad_output_path_is_refused_before_any_work(tmp_path, output, problem):
    source = save_image(tmp_path / "a.png", smooth_image(30, 40, 8))
    (tmp_path / "file.txt").write_text("a file\n")
    result = run_cli("-i", source, "-o", tmp_path / output)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("pspnet.py: error: ") and problem in line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.png", "file.txt"]


def test_glob_output_must_be_a_directory(tmp_path):
    save_image(tmp_path / "a.png", smooth_image(30, 40, 8))
    (tmp_path / "file.txt").write_text("a file\n")
    result = run_cli("-g", tmp_path / "*.png", "-o", tmp_path / "file.txt")
    assert result.returncode == 1 and "-o names a directory" in result.stderr
    assert "Traceback" not in result.stderr


def test_glob_matching_nothing_is_an_error(tmp_path):
    result = run_cli("-g", tmp_path / "*.png", "-o", tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr == f"pspnet.py: error: {tmp_path / '*.png'}: no files match\n"


@pytest.mark.parametrize("flags", [[], ["-i", "a.png", "-g", "*.png"], ["-i", "a.png", "-q", "-v"]])
def test_wrong_command_lines_are_usage_errors(tmp_path, flags):
    result = run_cli(*flags, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: pspnet.py") and "Traceback" not in result.stderr


@pytest.mark.slow
def test_missing_gpu_is_a_warning(tmp_path):
    source = tmp_path / "absent.png"
    result = run_cli("-i", source, "--id", "97")
    assert result.returncode == 1
    assert "pspnet.py: warning: GPU 97 not found; running on the CPU" in result.stderr.splitlines()
    assert error_lines(result.stderr) == [f"pspnet.py: error: {source}: no such file"]


@pytest.mark.slow
def test_mixed_precision_without_a_gpu_is_refused(tmp_path, weights_h5, monkeypatch):
    """On a CPU-only machine whose CPU lacks AVX512_BF16 and AMX (as this one), bfloat16/float16 stop with
    one clear line and exit 1, writing nothing."""
    monkeypatch.setattr(cpu, "computes_bfloat16", lambda flags=None: False)
    source = tmp_path / "photo.png"
    Image.fromarray(smooth_image(40, 50, 3)).save(source)
    refusals = {
        "bfloat16": f"precision bfloat16 on the CPU needs AVX512_BF16 or AMX, and {cpu.bfloat16_absence()}; "
                    "use float32 or a GPU",
        "float16": "precision float16 needs a GPU and none is visible (the backends emulate float16 on the CPU, "
                   "slower than float32); use float32 on the CPU",
    }
    for precision, refusal in refusals.items():
        result = run_main("-i", source, "-o", tmp_path / "out" / "photo.png", "-w", weights_h5, "--precision", precision)
        assert result.code == 1
        assert error_lines(result.stderr) == [f"pspnet.py: error: {refusal}"]
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------
# Hostile input: nothing a user can pass gives a traceback, a hang or a lost file


@pytest.fixture
def restore_sigterm():
    """Puts back the SIGTERM handler that pspnet.main installs."""
    import signal

    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_fifo_as_input_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = run_cli("-i", fifo, "-o", tmp_path / "out" / "x.png")
    assert result.returncode == 1
    assert error_lines(result.stderr) == [f"pspnet.py: error: {fifo}: is a FIFO, not a regular file"]
    assert not (tmp_path / "out").exists()


def test_device_as_input_is_not_called_empty(tmp_path):
    result = run_cli("-i", "/dev/zero", "-o", tmp_path / "x.png")
    assert result.returncode == 1
    assert error_lines(result.stderr) == ["pspnet.py: error: /dev/zero: is a device, not a regular file"]


def test_glob_skips_symlink_loops_and_fifos_and_goes_on(tmp_path, stand_in):
    save_image(tmp_path / "in" / "good.png", sky_and_person())
    os.symlink(tmp_path / "in" / "loop.png", tmp_path / "in" / "loop.png")
    os.mkfifo(tmp_path / "in" / "pipe.png")
    result = run_main("-g", tmp_path / "in" / "*.png", "-o", tmp_path / "out", "-q")
    assert result.code == 1
    assert sorted(error_lines(result.stderr)) == [
        f"pspnet.py: error: {tmp_path / 'in' / 'loop.png'}: symbolic link loop",
        f"pspnet.py: error: {tmp_path / 'in' / 'pipe.png'}: is a FIFO, not a regular file",
    ]
    assert len(stand_in.predictions) == 1
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == sorted(
        path.name for path in output_files("good", ".png", probs=False).values()
    )


def test_symlink_loop_as_input_is_one_line(tmp_path, stand_in):
    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    result = run_main("-i", tmp_path / "loop.png", "-o", tmp_path / "out" / "x.png", "-q")
    assert result.code == 1
    assert error_lines(result.stderr) == [f"pspnet.py: error: {tmp_path / 'loop.png'}: symbolic link loop"]


def test_empty_output_path_is_refused_before_any_work(tmp_path, stand_in):
    source = save_image(tmp_path / "a.png", sky_and_person())
    result = run_main("-i", source, "-o", "")
    assert (result.code, error_lines(result.stderr)) == (1, ["pspnet.py: error: -o: the output path is empty"])
    assert stand_in.constructions == [] and sorted(path.name for path in tmp_path.iterdir()) == ["a.png"]


def test_trailing_slash_names_a_new_directory(tmp_path, stand_in):
    source = save_image(tmp_path / "photo.png", sky_and_person())
    assert run_main("-i", source, "-o", f"{tmp_path / 'newdir'}/", "-q").code == 0
    assert sorted(path.name for path in (tmp_path / "newdir").iterdir()) == sorted(
        path.name for path in output_files("photo", ".png", probs=False).values()
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["newdir", "photo.png"]


def test_special_file_as_output_is_refused(tmp_path, stand_in):
    source = save_image(tmp_path / "a.png", sky_and_person())
    os.mkfifo(tmp_path / "b_seg.png")
    result = run_main("-i", source, "-o", tmp_path / "b.png", "-q")
    assert result.code == 1
    assert error_lines(result.stderr) == [
        f"pspnet.py: error: {tmp_path / 'b_seg.png'}: exists and is not a regular file; refusing to replace it; "
        "choose another -o"
    ]
    assert stand_in.predictions == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.png", "b_seg.png"]


def test_extension_that_cannot_store_every_output_is_refused_before_predicting(tmp_path, stand_in):
    source = save_image(tmp_path / "a.png", sky_and_person())
    result = run_main("-i", source, "-o", tmp_path / "out" / "x.qoi", "-q")
    assert result.code == 1
    (line,) = error_lines(result.stderr)
    assert line.startswith(f"pspnet.py: error: {tmp_path / 'out' / 'x.qoi'}: the QOI format") and "cannot store L" in line
    assert stand_in.predictions == [] and not (tmp_path / "out").exists()


def test_failure_on_a_later_output_leaves_no_output_of_the_image(tmp_path, stand_in, monkeypatch):
    source = save_image(tmp_path / "a.png", sky_and_person())
    writer = utils.image_writer

    def failing_on_probs(path, array):
        if str(path).endswith("_probs.png"):
            def fail(temporary):
                raise OSError(28, "No space left on device")
            return fail
        return writer(path, array)

    monkeypatch.setattr(utils, "image_writer", failing_on_probs)
    result = run_main("-i", source, "-o", tmp_path / "out" / "b.png", "--save-probs", "-q")
    assert result.code == 1
    assert error_lines(result.stderr) == [
        f"pspnet.py: error: {tmp_path / 'out' / 'b_probs.png'}: cannot write (No space left on device)"
    ]
    assert list((tmp_path / "out").iterdir()) == []


def test_probabilities_past_a_file_size_limit_are_one_line_and_leave_nothing(tmp_path, stand_in):
    source = save_image(tmp_path / "a.png", sky_and_person(height=80, width=90))
    with file_size_limit(1 << 20):  # the .npy is 80 x 90 x 150 x 4 bytes = 4.3 MB
        result = run_main("-i", source, "-o", tmp_path / "out" / "b.png", "--save-probs", "-q")
    assert result.code == 1
    assert result.stderr == f"pspnet.py: error: {tmp_path / 'out' / 'b_probs.npy'}: cannot write (File too large)\n"
    assert list((tmp_path / "out").iterdir()) == []


def test_probabilities_on_a_full_disk_are_one_line_and_leave_nothing(tmp_path, stand_in, monkeypatch):
    source = save_image(tmp_path / "a.png", sky_and_person())

    def full_disk(descriptor, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    result = run_main("-i", source, "-o", tmp_path / "out" / "b.png", "--save-probs", "-q")
    assert result.code == 1
    assert result.stderr == (
        f"pspnet.py: error: {tmp_path / 'out' / 'b_probs.npy'}: cannot write (No space left on device)\n"
    )
    assert list((tmp_path / "out").iterdir()) == []


def test_sigterm_while_predicting_cleans_up_and_exits_143(tmp_path, stand_in, monkeypatch, restore_sigterm):
    import signal

    source = save_image(tmp_path / "a.png", sky_and_person())

    def terminated(self, img, probabilities=None, **protocol):
        assert probabilities is not None
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the prediction")

    monkeypatch.setattr(StandInNetwork, "class_map", terminated)
    result = run_main("-i", source, "-o", tmp_path / "out" / "b.png", "--save-probs", "-q")
    assert (result.code, result.stderr) == (143, "pspnet.py: terminated\n")
    assert list((tmp_path / "out").iterdir()) == []


def test_outputs_follow_the_umask(tmp_path, stand_in):
    source = save_image(tmp_path / "a.png", sky_and_person())
    previous = os.umask(0o027)
    try:
        assert run_main("-i", source, "-o", tmp_path / "out" / "b.png", "--save-probs", "-q").code == 0
    finally:
        os.umask(previous)
    for path in (tmp_path / "out").iterdir():
        assert path.stat().st_mode & 0o777 == 0o640, path


@pytest.mark.parametrize(
    "flags",
    [["--input-path", "{a}", "--output-path", "{out}", "--save_probs", "--multi-scale"],
     ["--input_path={a}", "--output_path={out}", "--save-probs", "--multi_scale"]],
)
def test_long_flags_take_either_spelling(tmp_path, stand_in, flags):
    source = save_image(tmp_path / "a.png", sky_and_person())
    flags = [flag.format(a=source, out=tmp_path / "out" / "b.png") for flag in flags]
    assert run_main(*flags, "-q").code == 0
    assert stand_in.predictions == [{"sliding": False, "flip": True, "multi_scale": True}]
    assert (tmp_path / "out" / "b_probs.npy").is_file()


def test_help_shows_one_spelling_of_each_flag():
    result = run_cli("--help")
    assert "--input_path" in result.stdout and "--input-path" not in result.stdout
    assert "--save-probs" in result.stdout and "--save_probs" not in result.stdout


@pytest.mark.slow
def test_a_default_run_prints_no_tensorflow_start_up_line(tmp_path, weights_h5):
    source = save_image(tmp_path / "a.png", smooth_image(40, 50, 3))
    result = run_cli("-w", weights_h5, "-i", source, "-o", tmp_path / "out" / "a.png", "--no-flip", "-q")
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")
    assert run_cli("--help").stderr == ""


@pytest.mark.slow
def test_verbose_keeps_tensorflow_start_up_lines(tmp_path):
    result = run_cli("-i", tmp_path / "absent.png", "--id", "0", "-v")
    assert result.returncode == 1
    assert any(runtime.START_UP_LINE.match(line) for line in result.stderr.splitlines())


def test_quiet_start_up_passes_on_a_broken_tensorflow(tmp_path):
    broken = tmp_path / "site" / "tensorflow"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        "import os\nos.write(2, b'native: libtensorflow_framework.so.2: cannot open shared object file\\n')\n"
        "raise ImportError('libtensorflow_framework.so.2: cannot open shared object file')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", "from pspnet_keras import runtime; runtime.import_tensorflow()"],
        capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=60,
        env={**{k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}, "PYTHONPATH": str(tmp_path / "site")},
    )
    assert result.returncode == 1
    assert "native: libtensorflow_framework.so.2: cannot open shared object file" in result.stderr
    assert "ImportError: libtensorflow_framework.so.2" in result.stderr
