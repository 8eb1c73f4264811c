"""Tests of train.py and training.py: the recipe's pieces, and training end to end.

The pieces are checked against formulas computed here: the augmentation keeps each
label a function of its image's colours, the loss is a NumPy cross-entropy, the
gradients through Interp and PyramidConvolution are those of TensorFlow's own
align-corners resize, concatenation and convolution, the learning rate and one
weight-decay step are the poly and Caffe SGD formulas, the data pipeline is
deterministic, resumable and split over replicas without changing a batch.

End to end, a PSPNet-50 starts from the synthetic pspnet50_ade20k weights (conftest)
with each BN's stored statistics set from the activations of natural-looking images
(synthetic weights with arbitrary statistics blow up in training), and learns a
dataset of coloured shapes on noisy backgrounds through train.py, interrupted by
SIGTERM and SIGKILL and resumed; its final.h5 runs in pspnet.py and evaluate.py.
Two worker processes on 127.0.0.1 reach the weights of one process.
"""

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2
import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from PIL import ImageDraw

import datasets
import evaluate
import inference
import layers_builder
import models
import pspnet
import recipe
import train
import training
from test_cli import run_main as run_pspnet
from test_cli import smooth_image

PROJECT_ROOT = Path(__file__).resolve().parents[1]
MEAN_RGB = np.array(models.RELEASE_MEAN_RGB, dtype=np.float32)

# Colours of the alignment test: far apart from each other and from the mean colour,
# which is what padding and rotation fill images with.
ALIGNMENT_COLOURS = np.array([(230, 30, 30), (30, 200, 40), (40, 50, 230), (240, 230, 40), (20, 20, 20)], np.float32)
# A pixel is away from edges when the label is one value in the window of this radius around it.
EDGE_RADIUS = 3
CHAIN_EDGE_RADIUS = 6

# The learning test: shapes of three classes on noisy grey, PSPNet-50 at crop 89.
SHAPE_CLASSES = ("background", "disc", "square", "triangle")
SHAPE_COLOURS = {1: (220, 40, 40), 2: (40, 190, 40), 3: (40, 60, 220)}
SHAPE_IMAGE_SIZE = 96
TRAIN_IMAGES = 40
HELD_OUT_IMAGES = 10
CROP = 89
BATCH = 4
# The iterations the learning run trains for; it reached the accuracy below in these
# (ITERATIONS at the recipe's learning rate 0.01, head 10x, frozen BN).
ITERATIONS = 60
CHECKPOINT_EVERY = 10
LEARNED_PIXEL_ACCURACY = 0.90
SEED = 3


def run_train(*args):
    """Runs train.main in this process; returns (exit code, stdout, stderr)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = train.main([str(arg) for arg in args])
    return code, stdout.getvalue(), stderr.getvalue()


def train_process(*args, env=None):
    """`python train.py *args` as a user starts it (a Popen, output to pipes)."""
    return subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "train.py"), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def log_rows(out):
    """The rows of OUT/log.csv as dicts."""
    with open(out / "log.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def wait_for_iteration(process, out, iteration, timeout=600):
    """Waits until log.csv holds `iteration` (or the process ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if (out / "log.csv").exists() and any(int(row["iteration"]) >= iteration for row in log_rows(out)):
            return
        time.sleep(0.2)
    raise AssertionError(f"the run did not reach iteration {iteration}: {process.communicate()}")


def checkpoint_iteration(out):
    """The iteration OUT/checkpoint.h5 was written at."""
    return training.read_checkpoint_state(out / training.CHECKPOINT_NAME)["iteration"]


# ---------------------------------------------------------------------------------------
# Augmentation: the label stays a function of the image's colour


def region_image(height, width, seed):
    """(uint8 RGB image, uint8 label): random discs and boxes of the ALIGNMENT_COLOURS classes."""
    rng = np.random.default_rng(seed)
    label = Image.new("L", (width, height), int(rng.integers(len(ALIGNMENT_COLOURS))))
    draw = ImageDraw.Draw(label)
    for _ in range(8):
        cls = int(rng.integers(len(ALIGNMENT_COLOURS)))
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(6, 16)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x - r, y - r, x + r, y + r], fill=cls)
    label = np.asarray(label)
    return ALIGNMENT_COLOURS[label].astype(np.uint8), label


def colour_class(rgb):
    """f: the class of each pixel's colour (the nearest of the alignment colours), 255 for the mean colour."""
    candidates = np.concatenate([ALIGNMENT_COLOURS, MEAN_RGB[np.newaxis]])
    nearest = np.argmin(((rgb[..., np.newaxis, :] - candidates) ** 2).sum(axis=-1), axis=-1)
    return np.where(nearest == len(ALIGNMENT_COLOURS), training.IGNORE_LABEL, nearest)


def interior(label, radius):
    """The pixels whose label window of `radius` is one value (away from edges of any kind)."""
    padded = np.pad(label.astype(np.int32), radius, mode="edge")
    same = np.ones(label.shape, bool)
    height, width = label.shape
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            same &= padded[dy : dy + height, dx : dx + width] == label
    return same


def assert_aligned(image_minus_mean, label, radius=EDGE_RADIUS, minimum_share=0.3):
    """label == f(image) at every pixel away from edges, and such pixels are many."""
    image = np.asarray(image_minus_mean) + MEAN_RGB
    label = np.asarray(label)
    inside = interior(label, radius)
    assert inside.mean() > minimum_share
    wrong = inside & (colour_class(image) != label)
    assert not wrong.any(), f"{wrong.sum()} pixels away from edges have a label that is not their colour's class"


def as_pair(image, label):
    """Tensors of an RGB-minus-mean float image and a uint8 label."""
    return tf.constant(image.astype(np.float32) - MEAN_RGB), tf.constant(label)


@pytest.mark.parametrize("factor", [0.5, 0.73, 1.37, 2.0])
def test_scaling_keeps_labels_on_their_colours(factor):
    image, label = region_image(61, 83, seed=1)
    scaled_image, scaled_label = training.scale_pair(*as_pair(image, label), factor)
    assert scaled_label.dtype == tf.uint8
    assert tuple(scaled_label.shape) == (round(61 * factor), round(83 * factor)) == tuple(scaled_image.shape[:2])
    assert_aligned(scaled_image, scaled_label)
    assert set(np.unique(scaled_label)) <= set(range(len(ALIGNMENT_COLOURS)))


@pytest.mark.parametrize("degrees", [-10.0, -3.5, 10.0])
def test_rotation_fills_with_the_mean_colour_and_ignored_labels_only_outside_the_image(degrees):
    image, label = region_image(57, 75, seed=2)
    rotated_image, rotated_label = training.rotate_pair(*as_pair(image, label), degrees)
    rotated_label = np.asarray(rotated_label)
    assert_aligned(rotated_image, rotated_label)
    height, width = label.shape
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = math.radians(degrees)
    centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
    source_x = math.cos(angle) * (x - centre_x) - math.sin(angle) * (y - centre_y) + centre_x
    source_y = math.sin(angle) * (x - centre_x) + math.cos(angle) * (y - centre_y) + centre_y
    outside = (np.round(source_x) < 0) | (np.round(source_x) > width - 1)
    outside |= (np.round(source_y) < 0) | (np.round(source_y) > height - 1)
    sure = np.abs(np.round(source_x) - source_x) < 0.49
    sure &= np.abs(np.round(source_y) - source_y) < 0.49
    assert outside.sum() > 50
    np.testing.assert_array_equal((rotated_label == training.IGNORE_LABEL)[sure], outside[sure])


def test_blur_and_mirror_keep_labels_on_their_colours():
    image, label = region_image(50, 64, seed=3)
    image_minus_mean, label_tensor = as_pair(image, label)
    blurred = np.asarray(training.blur(image_minus_mean))
    assert not np.allclose(blurred, image_minus_mean)
    assert_aligned(blurred, label)
    opencv = cv2.GaussianBlur(np.asarray(image_minus_mean), (5, 5), 0)
    np.testing.assert_allclose(blurred, opencv, atol=1e-3)
    mirrored_image, mirrored_label = training.mirror_pair(image_minus_mean, label_tensor)
    np.testing.assert_array_equal(mirrored_label, label[:, ::-1])
    assert_aligned(mirrored_image, mirrored_label)


def test_crop_pads_with_the_mean_colour_and_ignored_labels_where_smaller():
    image, label = region_image(40, 120, seed=4)
    cropped_image, cropped_label = training.pad_and_crop(*as_pair(image, label), 89, 0.0, 1.0)
    cropped_label = np.asarray(cropped_label)
    assert cropped_label.shape == (89, 89) and tuple(cropped_image.shape) == (89, 89, 3)
    # 49 rows of padding, 24 above and 25 below; the crop's left edge is the last possible one.
    np.testing.assert_array_equal(cropped_label[24:64], label[:, 31:])
    assert (cropped_label[:24] == training.IGNORE_LABEL).all() and (cropped_label[64:] == training.IGNORE_LABEL).all()
    np.testing.assert_array_equal(np.asarray(cropped_image)[:24], 0.0)
    assert_aligned(cropped_image, cropped_label)


@pytest.mark.parametrize("seed", range(6))
def test_augmented_examples_are_aligned_in_the_network_convention(seed):
    image, label = region_image(70, 90, seed=10 + seed)
    network_image, augmented_label = training.augment(
        *as_pair(image, label), tf.constant([7, seed], tf.int64), CROP
    )
    assert tuple(network_image.shape) == (CROP, CROP, 3) and augmented_label.dtype == tf.uint8
    rgb_minus_mean = np.asarray(network_image)[..., ::-1]
    assert_aligned(rgb_minus_mean, augmented_label, radius=CHAIN_EDGE_RADIUS, minimum_share=0.1)


def test_network_input_is_the_inference_preprocessing():
    image, _ = region_image(20, 30, seed=5)
    np.testing.assert_array_equal(
        training.network_input(image.astype(np.float32) - MEAN_RGB), inference.preprocess(image, MEAN_RGB)
    )


def test_augmentation_draws_every_parameter_from_the_seed():
    image, label = region_image(70, 90, seed=6)
    pair = as_pair(image, label)
    first = training.augment(*pair, tf.constant([1, 2], tf.int64), CROP)
    again = training.augment(*pair, tf.constant([1, 2], tf.int64), CROP)
    other = training.augment(*pair, tf.constant([1, 3], tf.int64), CROP)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


# ---------------------------------------------------------------------------------------
# Loss, gradients, schedule


def numpy_cross_entropy(labels, logits):
    """(sum over labelled pixels, labelled pixels) of the softmax cross-entropy, in float64."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probabilities = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    labelled = labels != 255
    picked = np.take_along_axis(log_probabilities, np.where(labelled, labels, 0)[..., np.newaxis], axis=-1)[..., 0]
    return -(picked * labelled).sum(), labelled.sum()


def test_loss_is_the_cross_entropy_of_labelled_pixels_plus_weighted_aux():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (2, 5, 6, 4)).astype(np.float32)
    aux_logits = rng.normal(0, 3, (2, 5, 6, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (2, 5, 6)).astype(np.uint8)
    labels[rng.random(labels.shape) < 0.3] = 255
    losses = training.segmentation_losses(tf.constant(labels), tf.constant(logits), tf.constant(aux_logits), 0.4)
    main_sum, count = numpy_cross_entropy(labels, logits)
    aux_sum, _ = numpy_cross_entropy(labels, aux_logits)
    assert 0 < count < labels.size
    np.testing.assert_allclose(float(losses["main_loss"]), main_sum / count, rtol=1e-6)
    np.testing.assert_allclose(float(losses["aux_loss"]), aux_sum / count, rtol=1e-6)
    np.testing.assert_allclose(float(losses["loss"]), (main_sum + 0.4 * aux_sum) / count, rtol=1e-6)


def test_ignored_pixels_get_no_gradient_and_an_all_ignored_batch_no_loss():
    rng = np.random.default_rng(1)
    logits = tf.Variable(rng.normal(0, 1, (1, 4, 4, 3)).astype(np.float32))
    labels = np.full((1, 4, 4), 255, np.uint8)
    labels[0, :2] = 1
    with tf.GradientTape() as tape:
        loss = training.segmentation_losses(tf.constant(labels), logits, logits * 0.5)["loss"]
    gradient = np.asarray(tape.gradient(loss, logits))
    assert np.abs(gradient[0, :2]).min(axis=-1).max() > 0 and not gradient[0, 2:].any()
    nothing = training.segmentation_losses(tf.constant(np.full((1, 4, 4), 255, np.uint8)), logits, logits)
    assert float(nothing["loss"]) == 0.0


def plain_upsampling(tensor, height, width):
    """TensorFlow's own align-corners bilinear resize (the plain formulation of Caffe's Interp)."""
    return tf.compat.v1.image.resize_bilinear(tensor, (height, width), align_corners=True)


def gradient_arrays(tape, total, variables):
    """The gradients of `total` with respect to each of `variables`, as arrays."""
    return [np.asarray(gradient) for gradient in tape.gradient(total, variables)]


def assert_close_to_range(found, expected, name):
    """found == expected within 1e-5 of expected's largest magnitude."""
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-5 * np.abs(expected).max(), err_msg=name)


def test_gradients_through_pyramid_convolution_are_those_of_upsample_concatenate_convolve():
    rng = np.random.default_rng(2)
    side = 12
    features = tf.constant(rng.normal(0, 1, (2, side, side, 8)).astype(np.float32))
    branches = [tf.constant(rng.normal(0, 1, (2, b, b, 4)).astype(np.float32)) for b in models.PYRAMID_BINS]
    layer = layers_builder.PyramidConvolution(5)
    layer([features, *branches])
    layer.kernel.assign(rng.normal(0, 0.1, tuple(layer.kernel.shape)).astype(np.float32))
    plain_kernel = tf.Variable(layer.kernel.numpy())
    weights = tf.constant(rng.normal(0, 1, (2, side, side, 5)).astype(np.float32))
    inputs = [features, *branches]
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(inputs)
        ours = layer(inputs)
        upsampled = [plain_upsampling(branch, side, side) for branch in branches]
        plain = tf.nn.conv2d(tf.concat([features, *upsampled], axis=-1), plain_kernel, 1, "SAME")
        ours_total, plain_total = tf.reduce_sum(ours * weights), tf.reduce_sum(plain * weights)
    assert_close_to_range(np.asarray(ours), np.asarray(plain), "output")
    found = gradient_arrays(tape, ours_total, [layer.kernel.value, *inputs])
    expected = gradient_arrays(tape, plain_total, [plain_kernel, *inputs])
    names = ["kernel", "features", *(f"pool{bins}" for bins in models.PYRAMID_BINS)]
    for name, got, want in zip(names, found, expected):
        assert np.abs(want).max() > 0
        assert_close_to_range(got, want, name)


@pytest.mark.parametrize("zoom, size", [(8, None), (None, (23, 31))])
def test_gradients_through_interp_are_those_of_the_align_corners_resize(zoom, size):
    rng = np.random.default_rng(3)
    logits = tf.constant(rng.normal(0, 1, (2, 6, 7, 3)).astype(np.float32))
    layer = layers_builder.Interp(zoom_factor=zoom) if zoom else layers_builder.Interp(*size)
    height, width = layer.output_size(6, 7)
    weights = tf.constant(rng.normal(0, 1, (2, height, width, 3)).astype(np.float32))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(logits)
        ours = layer(logits)
        plain = plain_upsampling(logits, height, width)
        ours_total, plain_total = tf.reduce_sum(ours * weights), tf.reduce_sum(plain * weights)
    assert_close_to_range(np.asarray(ours), np.asarray(plain), "output")
    (found,) = gradient_arrays(tape, ours_total, [logits])
    (expected,) = gradient_arrays(tape, plain_total, [logits])
    assert_close_to_range(found, expected, "logits")


def poly(base_lr, iteration, iterations, power):
    """Caffe's poly learning rate at (0-based) `iteration`."""
    return base_lr * (1 - iteration / iterations) ** power


def test_poly_schedule_at_chosen_iterations():
    schedule = training.PolyDecay(0.01, 1000, 0.9)
    for iteration in (0, 1, 250, 500, 999, 1000):
        np.testing.assert_allclose(float(schedule(iteration)), poly(0.01, iteration, 1000, 0.9), rtol=1e-5, atol=1e-12)
    assert float(schedule(0)) == pytest.approx(0.01) and float(schedule(1000)) == 0.0


def test_sgd_steps_are_caffes_with_l2_decay_in_the_gradient_and_head_multiplier():
    """Three steps of CaffeSGD on a backbone and a head variable against Caffe's update formulas."""
    base_lr, iterations, power, momentum, decay = 0.02, 10, 0.9, 0.9, 0.05
    backbone = keras.Variable(np.array([1.0, -2.0, 0.5], np.float32), name="kernel")
    head = keras.Variable(np.array([0.3, 4.0], np.float32), name="bias")
    optimizer = training.CaffeSGD(
        learning_rate=training.PolyDecay(base_lr, iterations, power), momentum=momentum, l2_decay=decay,
        lr_multipliers={head.path: 10.0},
    )
    gradients = [np.array([0.5, 0.0, -1.0], np.float32), np.array([0.2, -0.1], np.float32)]
    values = [backbone.numpy().astype(np.float64), head.numpy().astype(np.float64)]
    velocities = [np.zeros(3), np.zeros(2)]
    for iteration in range(3):
        optimizer.apply([tf.constant(g) for g in gradients], [backbone, head])
        rate = poly(base_lr, iteration, iterations, power)
        for index, multiplier in enumerate((1.0, 10.0)):
            velocities[index] = momentum * velocities[index] - rate * multiplier * (gradients[index] + decay * values[index])
            values[index] = values[index] + velocities[index]
        np.testing.assert_allclose(backbone.numpy(), values[0], rtol=1e-5)
        np.testing.assert_allclose(head.numpy(), values[1], rtol=1e-5)
    # The zero-gradient component decays through the momentum, not as Keras' decoupled decay would.
    decoupled = 1.0 * np.prod([1 - poly(base_lr, i, iterations, power) * decay for i in range(3)])
    assert not np.isclose(backbone.numpy()[1] / -2.0, decoupled, rtol=1e-3)
    assert int(optimizer.iterations.numpy()) == 3
