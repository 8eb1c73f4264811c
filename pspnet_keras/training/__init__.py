"""Training PSPNet with the paper's recipe: the pieces train.py is made of, importable.

Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, and hszhao/semseg (the
authors' re-implementation: config/*/*_pspnet*.yaml, util/transform.py,
model/pspnet.py, tool/train.py), which agree on:

- the loss: softmax cross-entropy of the main output plus 0.4 times that of an
  auxiliary classifier on stage 4's output (paper §3.4 and §5.1), unlabelled pixels
  (255) left out of sums and means (`segmentation_losses`);
- the optimiser: SGD with momentum 0.9, base learning rate 0.01 decayed by the
  "poly" policy (1 - iter / max_iter)^0.9, weight decay 1e-4 (paper §4), the new
  layers (pyramid module, conv5_4, conv6, auxiliary head) at 10x the learning rate
  (`CaffeSGD`, `PolyDecay`);
- augmentation: random scale 0.5-2, rotation -10..10 degrees, Gaussian blur, mirror,
  random crop (paper §4; util/transform.py), as a tf.data pipeline (`training_dataset`).

From Python, with a dataset of your own yielding (image, label) batches, images as
the network takes them (BGR minus the model's mean, `network_input`), labels uint8
class ids with 255 unlabelled:

    model, network = training.build_training_model(config, crop_size=473)
    model.compile(optimizer=training.recipe_optimizer(model, iterations=30000))
    model.fit(dataset, steps_per_epoch=1000, epochs=30)
    layers_builder.save_weights(network, "mine.h5")

`Trainer` runs the loop of train.py: checkpoints, logs, validation, interruption.

Training is a function of the seed and the data alone: the order of the samples,
every augmentation and every dropout mask are drawn, statelessly, from the seed and
the sample's position in the order. Resuming a run, or splitting its batches over
more replicas, computes the same thing.
"""

import csv
import dataclasses
import hashlib
import json
import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
from pspnet_keras import runtime

runtime.import_tensorflow()  # before Keras: TensorFlow starts as the commands start it

import keras
import numpy as np
import tensorflow as tf
from keras import layers
from tensorflow.core.framework import summary_pb2
from tqdm import tqdm

from pspnet_keras import cli
from pspnet_keras import datasets
from pspnet_keras import keras2_weights
import layers_builder
from pspnet_keras import metrics
from pspnet_keras import models
import utils
from pspnet_keras.inference import Predictor
from layers_builder import Interp
from pspnet_keras.training.recipe import AUX_WEIGHT
from pspnet_keras.training.recipe import BASE_LR
from pspnet_keras.training.recipe import BLUR_KERNEL
from pspnet_keras.training.recipe import BLUR_PROBABILITY
from pspnet_keras.training.recipe import HEAD_LR_MULTIPLIER
from pspnet_keras.training.recipe import MIRROR_PROBABILITY
from pspnet_keras.training.recipe import MOMENTUM
from pspnet_keras.training.recipe import POLY_POWER
from pspnet_keras.training.recipe import ROTATION_DEGREES
from pspnet_keras.training.recipe import SCALE_RANGE
from pspnet_keras.training.recipe import WEIGHT_DECAY
from pspnet_keras.runtime import PRECISION_POLICIES

# Auxiliary head (hszhao/semseg model/pspnet.py, `self.aux`): 3x3 conv 256, BN, ReLU,
# dropout 0.1, 1x1 conv to the classes, upsampled as the main head.
AUX_PREFIX = "aux"
AUX_CHANNELS = 256
AUX_DROPOUT_RATE = 0.1
# Layers trained at HEAD_LR_MULTIPLIER x the learning rate (hszhao/semseg tool/train.py,
# `modules_new`: the pyramid module, the classifier and the auxiliary head).
HEAD_LAYER_PREFIXES = ("conv5_3_pool", "conv5_4", "conv6", AUX_PREFIX)

IGNORE_LABEL = datasets.IGNORE_LABEL
# The stateless seeds `augment` draws from an example's seed: scale, rotation, blur, mirror, crop.
AUGMENTATION_DRAWS = 5

CHECKPOINT_NAME = "checkpoint.h5"
CHECKPOINT_FORMAT = "pspnet-keras-checkpoint"
CHECKPOINT_VERSION = 1
RUN_NAME = "run.json"
LOG_NAME = "log.csv"
TENSORBOARD_DIR = "tensorboard"
FINAL_STEM = "final"
# TensorBoard's scalar summaries (tensorboard/plugins/scalar/summary_v2.py: plugin "scalars",
# empty content for version 0), written with TensorFlow's own tf.summary.write so that
# the tensorboard package is needed only to view them.
SCALAR_METADATA = summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
)
LOG_COLUMNS = ("iteration", "loss", "main_loss", "aux_loss", "lr", "images_per_s", "val_miou")
CHECK_THREADS = max(1, min(8, os.cpu_count() or 1))


class TrainingError(Exception):
    """A training run that cannot go on; the message is one line saying why and what to do."""


class NonFiniteWeights(TrainingError):
    """Weights holding NaN or infinity, which are never written; `path` names the variable."""

    def __init__(self, path):
        super().__init__(f"the weights are not finite ({path}); nothing was written")
        self.path = path


# ---------------------------------------------------------------------------------------
# Loss


def pixel_loss_sum(labels, logits):
    """(sum of the softmax cross-entropy over the labelled pixels, number of labelled pixels).

    `labels` (B, H, W) class ids with IGNORE_LABEL where unlabelled; `logits` (B, H, W, classes).
    """
    labels = tf.cast(labels, tf.int32)
    labelled = tf.not_equal(labels, IGNORE_LABEL)
    cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(
        tf.where(labelled, labels, 0), tf.cast(logits, tf.float32)
    )
    return tf.reduce_sum(tf.where(labelled, cross_entropy, 0.0)), tf.reduce_sum(tf.cast(labelled, tf.float32))


def replica_sum(value):
    """`value` summed over the replicas of the distribution strategy in whose step this runs."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def segmentation_losses(labels, logits, aux_logits, aux_weight=AUX_WEIGHT):
    """The recipe's loss of one step: {"loss", "main_loss", "aux_loss"}.

    Each is the mean cross-entropy over the labelled pixels of the whole (global)
    batch, as Caffe's SoftmaxWithLoss with ignore_label 255 and normalization VALID
    and torch's CrossEntropyLoss(ignore_index=255) compute it; "loss" is
    main_loss + aux_weight * aux_loss. Under a distribution strategy each replica
    returns its share (its pixels' sum over the global count) in "loss", whose
    gradients the optimiser sums over replicas, and the global values of the two
    parts for logging.
    """
    main_sum, labelled = pixel_loss_sum(labels, logits)
    aux_sum, _ = pixel_loss_sum(labels, aux_logits)
    labelled = tf.stop_gradient(tf.maximum(replica_sum(labelled), 1.0))
    loss = (main_sum + aux_weight * aux_sum) / labelled
    return {
        "loss": loss,
        "main_loss": replica_sum(main_sum) / labelled,
        "aux_loss": replica_sum(aux_sum) / labelled,
    }


# ---------------------------------------------------------------------------------------
# The training network


class SampleDropout(layers.Layer):
    """Dropout (inverted, as Keras' and Caffe's) whose mask is drawn from each sample's own seed.

    Takes [features, seeds], seeds (B, 2) int64 stateless seeds; `salt` tells the
    layers of one network apart. The masks, like every other random draw of a step,
    depend only on the samples, not on how the batch is split over replicas.
    """

    def __init__(self, rate, salt, **kwargs):
        super().__init__(**kwargs)
        self.rate = rate
        self.salt = salt

    def call(self, inputs, training=None):
        features, seeds = inputs
        if not training:
            return features
        shape = tf.shape(features)[1:]

        def keep(seed):
            salted = tf.random.experimental.stateless_split(seed, self.salt + 1)[self.salt]
            return tf.random.stateless_uniform(shape, salted) >= self.rate

        mask = tf.map_fn(keep, seeds, fn_output_signature=tf.TensorSpec(None, tf.bool))
        return tf.where(mask, features / tf.cast(1.0 - self.rate, features.dtype), tf.zeros_like(features))

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, salt=self.salt)
        return config


def auxiliary_head(x, seeds, classes):
    """The training-only classifier on stage 4's output: 3x3 conv 256 + BN + ReLU, dropout 0.1,
    1x1 conv to the classes, x8 align-corners Interp (as conv6_interp)."""
    x = layers_builder.conv_bn(x, AUX_CHANNELS, 3, f"{AUX_PREFIX}_3x3")
    x = SampleDropout(AUX_DROPOUT_RATE, salt=1, name=f"{AUX_PREFIX}_dropout")([x, seeds])
    x = layers.Conv2D(classes, 1, name=f"{AUX_PREFIX}_conv6")(x)
    return Interp(zoom_factor=models.OUTPUT_STRIDE, name=f"{AUX_PREFIX}_interp")(x)


class TrainingModel(keras.Model):
    """PSPNet with the auxiliary head; `fit` minimises the recipe's loss (segmentation_losses).

    Inputs [image batch (B, S, S, 3), dropout seeds (B, 2) int64]; outputs the main
    and the auxiliary logits (B, S, S, classes). A training step takes batches of
    (images, labels) or ((images, seeds), labels); without seeds, they are drawn
    from the model's own seed generator.
    """

    def __init__(self, *args, aux_weight=AUX_WEIGHT, **kwargs):
        super().__init__(*args, **kwargs)
        self.aux_weight = aux_weight
        self.dropout_seeds = keras.random.SeedGenerator(0, name="dropout_seeds")

    def train_step(self, data):
        inputs, labels = data
        if isinstance(inputs, (tuple, list)):
            images, seeds = inputs
        else:
            images = inputs
            seeds = keras.random.randint((tf.shape(images)[0], 2), 0, 2**31 - 1, seed=self.dropout_seeds, dtype="int64")
        with tf.GradientTape() as tape:
            logits, aux_logits = self([images, seeds], training=True)
            losses = segmentation_losses(labels, logits, aux_logits, self.aux_weight)
            scaled = self.optimizer.scale_loss(losses["loss"])
        variables = self.trainable_variables
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        losses["loss"] = losses["main_loss"] + self.aux_weight * losses["aux_loss"]
        return losses


def stage4_output(network, depth):
    """The output of the last block of stage 4 (conv4_6 of ResNet-50, conv4_23 of ResNet-101)."""
    blocks = models.BLOCKS_PER_STAGE[depth][2]
    return network.get_layer(f"conv4_{blocks}_relu").output


def build_training_model(config, crop_size=None, train_bn=False, precision="float32", aux_weight=AUX_WEIGHT):
    """(training model, inference network) of a models.ModelConfig at `crop_size` (default its crop).

    The inference network is layers_builder.build_pspnet's; the training model
    shares its layers, adds the auxiliary head on stage 4's output and draws the
    dropout of conv5_4 per sample (SampleDropout). BN layers are set by
    set_batch_norm_training.
    """
    network = layers_builder.build_pspnet(config, crop_size, precision)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(PRECISION_POLICIES[precision])
    try:
        seeds = keras.Input((2,), dtype="int64", name="dropout_seeds")
        x = network.get_layer("conv5_4_relu").output
        x = SampleDropout(models.DROPOUT_RATE, salt=0, name="conv5_4_sample_dropout")([x, seeds])
        x = network.get_layer("conv6")(x)
        logits = network.get_layer("conv6_interp")(x)
        aux_logits = auxiliary_head(stage4_output(network, config.depth), seeds, config.classes)
    finally:
        keras.config.set_dtype_policy(policy)
    model = TrainingModel(
        [network.input, seeds], [logits, aux_logits], aux_weight=aux_weight, name=f"{network.name}_training"
    )
    set_batch_norm_training(model, train_bn)
    return model, network


def set_batch_norm_training(model, train_bn):
    """Freezes or trains the BN layers of a training model.

    Frozen (the default): a BN layer normalises with its stored statistics and its
    scale and offset (gamma, beta) stay as loaded; it is a fixed per-channel affine
    map, as Keras makes a BatchNormalization with trainable=False. The auxiliary
    head's BN, which has no stored statistics, always normalises with batch
    statistics. Trained (`train_bn`): every BN normalises with the statistics of
    the global batch, synchronised across replicas (synchronized=True), updates its
    moving averages and trains gamma and beta.
    """
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            trains = train_bn or layer.name.startswith(AUX_PREFIX)
            layer.trainable = trains
            layer.synchronized = trains


def is_head_layer(name):
    """Whether the layer `name` is one of the new layers trained at the head learning rate."""
    return name.startswith(HEAD_LAYER_PREFIXES)


# ---------------------------------------------------------------------------------------
# Optimiser


@keras.saving.register_keras_serializable(package="pspnet")
class PolyDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Caffe's "poly" learning rate policy: base_lr * (1 - iteration / iterations) ^ power.

    Computed in double precision, as Caffe's SGDSolver::GetLearningRate does, and
    returned as float32.
    """

    def __init__(self, base_lr, iterations, power=POLY_POWER):
        self.base_lr = base_lr
        self.iterations = iterations
        self.power = power

    def __call__(self, step):
        progress = tf.minimum(tf.cast(step, tf.float64) / self.iterations, 1.0)
        return tf.cast(self.base_lr * (1.0 - progress) ** self.power, tf.float32)

    def get_config(self):
        return {"base_lr": self.base_lr, "iterations": self.iterations, "power": self.power}


@keras.saving.register_keras_serializable(package="pspnet")
class CaffeSGD(keras.optimizers.SGD):
    """SGD as Caffe's SGDSolver computes it, with per-layer learning rate multipliers.

    For a variable w with gradient g, learning rate lr and multiplier m:
        g' = m * (g + weight_decay * w)         (Regularize, L2: the decay is in the gradient)
        v  = momentum * v - lr * g'             (ComputeUpdateValue, with lr_mult = m)
        w  = w + v
    Keras' own `weight_decay` argument is decoupled instead (w -= lr * wd * w after
    the update, not through the momentum nor the multiplier), which is left unset.
    `lr_multipliers` maps variable paths (keras.Variable.path) to multipliers, 1 for
    the others.
    """

    def __init__(self, learning_rate=BASE_LR, momentum=MOMENTUM, l2_decay=WEIGHT_DECAY, lr_multipliers=None, **kwargs):
        super().__init__(learning_rate=learning_rate, momentum=momentum, **kwargs)
        self.l2_decay = l2_decay
        self.lr_multipliers = dict(lr_multipliers or {})

    def build(self, variables):
        super().build(variables)
        self.multipliers = [float(self.lr_multipliers.get(variable.path, 1.0)) for variable in variables]

    def update_step(self, gradient, variable, learning_rate):
        multiplier = self.multipliers[self._get_variable_index(variable)]
        gradient = tf.cast(gradient, variable.dtype) + tf.cast(self.l2_decay, variable.dtype) * variable
        super().update_step(gradient * tf.cast(multiplier, variable.dtype), variable, learning_rate)

    def get_config(self):
        config = super().get_config()
        config.update(l2_decay=self.l2_decay, lr_multipliers=self.lr_multipliers)
        return config


def head_lr_multipliers(model, multiplier=HEAD_LR_MULTIPLIER):
    """{variable path: multiplier} for the variables of the head layers of `model` (is_head_layer)."""
    return {
        variable.path: multiplier for layer in model.layers if is_head_layer(layer.name) for variable in layer.weights
    }


def recipe_optimizer(
    model,
    iterations,
    base_lr=BASE_LR,
    momentum=MOMENTUM,
    weight_decay=WEIGHT_DECAY,
    power=POLY_POWER,
    head_lr_multiplier=HEAD_LR_MULTIPLIER,
    precision="float32",
):
    """The recipe's optimiser for `model`, with the poly schedule over `iterations`.

    float16 training wraps it in Keras' dynamic loss scaling (LossScaleOptimizer),
    which skips the steps whose scaled gradients overflow.
    """
    optimizer = CaffeSGD(
        learning_rate=PolyDecay(base_lr, iterations, power),
        momentum=momentum,
        l2_decay=weight_decay,
        lr_multipliers=head_lr_multipliers(model, head_lr_multiplier),
    )
    if precision == "float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


# ---------------------------------------------------------------------------------------
# Augmentation. Images are float32 RGB minus the mean until network_input, so padding
# with 0 is padding with the mean colour; labels are uint8 with IGNORE_LABEL unlabelled.


def scale_pair(image, label, factor):
    """Image and label resized by `factor` (sides rounded): the image bilinearly, the label by nearest neighbour."""
    size = tf.cast(tf.shape(image)[:2], tf.float32)
    scaled = tf.maximum(tf.cast(tf.round(size * factor), tf.int32), 1)
    image = tf.image.resize(image, scaled, method="bilinear")
    label = tf.image.resize(label[..., tf.newaxis], scaled, method="nearest")[..., 0]
    return image, label


def rotate_pair(image, label, degrees):
    """Image and label rotated by `degrees` about the image centre, same size.

    The image is sampled bilinearly and filled with 0 (the mean colour) where the
    rotation brings in no pixel; the label by nearest neighbour, filled with
    IGNORE_LABEL (util/transform.py RandRotate).
    """
    shape = tf.shape(image)[:2]
    centre_y = (tf.cast(shape[0], tf.float32) - 1) / 2
    centre_x = (tf.cast(shape[1], tf.float32) - 1) / 2
    angle = degrees * math.pi / 180
    cos, sin = tf.cos(angle), tf.sin(angle)
    # Output pixel (x, y) samples the input at the point rotated about the centre.
    transform = tf.stack(
        [
            cos, -sin, centre_x - cos * centre_x + sin * centre_y,
            sin, cos, centre_y - sin * centre_x - cos * centre_y,
            0.0, 0.0,
        ]
    )[tf.newaxis]

    def warp(pixels, fill, interpolation):
        return tf.raw_ops.ImageProjectiveTransformV3(
            images=pixels[tf.newaxis], transforms=transform, output_shape=shape, fill_value=fill,
            interpolation=interpolation, fill_mode="CONSTANT",
        )[0]

    image = warp(image, 0.0, "BILINEAR")
    label = warp(tf.cast(label[..., tf.newaxis], tf.float32), float(IGNORE_LABEL), "NEAREST")[..., 0]
    return image, tf.cast(label, tf.uint8)


def blur(image):
    """Gaussian blur of a (H, W, 3) image by BLUR_KERNEL along rows and columns, with OpenCV's
    default mirrored border (BORDER_REFLECT_101), as cv2.GaussianBlur; images of at most
    len(BLUR_KERNEL) // 2 rows or columns are left as they are."""
    taps = len(BLUR_KERNEL)
    radius = taps // 2
    kernel = tf.constant(BLUR_KERNEL, tf.float32)
    rows = tf.tile(tf.reshape(kernel, (taps, 1, 1, 1)), (1, 1, 3, 1))
    columns = tf.tile(tf.reshape(kernel, (1, taps, 1, 1)), (1, 1, 3, 1))

    def blurred():
        padded = tf.pad(image, [[radius, radius], [radius, radius], [0, 0]], mode="REFLECT")[tf.newaxis]
        padded = tf.nn.depthwise_conv2d(padded, rows, (1, 1, 1, 1), "VALID")
        return tf.nn.depthwise_conv2d(padded, columns, (1, 1, 1, 1), "VALID")[0]

    return tf.cond(tf.reduce_min(tf.shape(image)[:2]) > radius, blurred, lambda: image)


def mirror_pair(image, label):
    """Image and label mirrored left to right."""
    return image[:, ::-1], label[:, ::-1]


def pad_and_crop(image, label, crop_size, top_fraction, left_fraction):
    """A crop_size x crop_size crop of image and label, padded first where they are smaller.

    Padding is split evenly above and below, left and right, with 0 (the mean colour)
    for the image and IGNORE_LABEL for the label (util/transform.py Crop); the crop's
    offset is the given fraction (0..1) of the room left, rounded down.
    """
    shape = tf.shape(image)[:2]
    pad = tf.maximum(crop_size - shape, 0)
    paddings = tf.stack([pad // 2, pad - pad // 2], axis=1)
    image = tf.pad(image, tf.concat([paddings, [[0, 0]]], axis=0))
    label = tf.pad(label, paddings, constant_values=IGNORE_LABEL)
    room = tf.shape(image)[:2] - crop_size
    fractions = tf.stack([top_fraction, left_fraction])
    offsets = tf.minimum(tf.cast(fractions * tf.cast(room + 1, tf.float32), tf.int32), room)
    image = tf.slice(image, tf.concat([offsets, [0]], axis=0), [crop_size, crop_size, 3])
    label = tf.slice(label, offsets, [crop_size, crop_size])
    return image, label


def network_input(image):
    """An RGB-minus-mean image as the network takes it: BGR minus the mean (inference.preprocess)."""
    return image[..., ::-1]


def augment(image, label, seed, crop_size):
    """One training example: the recipe's augmentation of an RGB-minus-mean image and its label.

    In the order of util/transform.py: random scale in SCALE_RANGE, rotation within
    +-ROTATION_DEGREES, Gaussian blur with BLUR_PROBABILITY, mirror with
    MIRROR_PROBABILITY, random crop_size crop (padded where smaller). Every draw
    comes from the stateless `seed` (2 integers). Returns (network input, label).
    """
    draws = tf.random.experimental.stateless_split(seed, AUGMENTATION_DRAWS)
    factor = tf.random.stateless_uniform((), draws[0], *SCALE_RANGE)
    image, label = scale_pair(image, label, factor)
    degrees = tf.random.stateless_uniform((), draws[1], -ROTATION_DEGREES, ROTATION_DEGREES)
    image, label = rotate_pair(image, label, degrees)
    image = tf.cond(tf.random.stateless_uniform((), draws[2]) < BLUR_PROBABILITY, lambda: blur(image), lambda: image)
    image, label = tf.cond(
        tf.random.stateless_uniform((), draws[3]) < MIRROR_PROBABILITY,
        lambda: mirror_pair(image, label),
        lambda: (image, label),
    )
    top_fraction, left_fraction = tf.unstack(tf.random.stateless_uniform((2,), draws[4]))
    image, label = pad_and_crop(image, label, crop_size, top_fraction, left_fraction)
    return network_input(image), label


# ---------------------------------------------------------------------------------------
# Data


class SampleReader:
    """Sample i of a list as (uint8 RGB image, uint8 class ids with IGNORE_LABEL unlabelled).

    Images are read as pspnet.py and evaluate.py read them (utils.read_image), labels
    by datasets.read_label. Raises datasets.SampleError for a file that cannot be used.
    """

    def __init__(self, samples):
        self.samples = samples

    def __call__(self, index):
        sample = self.samples[int(index)]
        try:
            image = utils.read_image(sample.image)
        except utils.ImageError as error:
            raise datasets.SampleError(sample.image, str(error).removeprefix(f"{sample.image}: ")) from None
        label, _ = datasets.read_label(sample)
        if label.shape != image.shape[:2]:
            raise datasets.SampleError(sample.label, size_problem(label.shape, image.shape, sample.image))
        return image, label


def size_problem(label_shape, image_shape, image_path):
    """What a label whose size differs from its image's is, in words."""
    return (
        f"label is {label_shape[1]}x{label_shape[0]} but its image {Path(image_path).name} "
        f"is {image_shape[1]}x{image_shape[0]}"
    )


def sample_order(count, seed, start_position=0):
    """(position, sample index) pairs from `start_position` on, without end.

    Position p is the p-th sample the run takes; epoch e (positions e*count ..
    (e+1)*count - 1) visits the samples in the permutation drawn from (seed, e).
    """
    first_epoch = start_position // count

    def epoch(number):
        positions = tf.data.Dataset.range(number * count, (number + 1) * count)
        permutation = tf.random.experimental.stateless_shuffle(
            tf.range(count, dtype=tf.int64), tf.stack([tf.constant(seed, tf.int64), number])
        )
        return tf.data.Dataset.zip(positions, tf.data.Dataset.from_tensor_slices(permutation))

    return tf.data.Dataset.counter(first_epoch).flat_map(epoch).skip(start_position - first_epoch * count)


def training_dataset(
    samples, mean_rgb, crop_size, global_batch, seed, start_iteration=0, pipeline=0, pipelines=1, replica_batch=None
):
    """The tf.data pipeline of training batches ((images, dropout seeds), labels), without end.

    Step i of the run takes positions i*global_batch .. (i+1)*global_batch - 1 of
    sample_order. Input pipeline `pipeline` of `pipelines` (one per worker) reads
    its share of each step's positions, in order, in batches of `replica_batch`
    (default: the whole share), one per local replica. Images are read and
    augmented in parallel (AUTOTUNE), in a fixed order, and prefetched.
    """
    share = global_batch // pipelines
    replica_batch = replica_batch or share
    reader = SampleReader(samples)
    mean = tf.constant(mean_rgb, tf.float32)
    base_seed = tf.constant(seed, tf.int64)

    def mine(position, index):
        return tf.equal((position % global_batch) // share, pipeline)

    def example(position, index):
        image, label = tf.numpy_function(reader, [index], (tf.uint8, tf.uint8), stateful=False)
        image.set_shape((None, None, 3))
        label.set_shape((None, None))
        augmentation_seed, dropout_seed = tf.unstack(
            tf.random.experimental.stateless_split(tf.stack([base_seed, position]), 2)
        )
        image, label = augment(tf.cast(image, tf.float32) - mean, label, augmentation_seed, crop_size)
        return (image, dropout_seed), label

    dataset = sample_order(len(samples), seed, start_iteration * global_batch).filter(mine)
    dataset = dataset.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(replica_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def distributed_dataset(strategy, samples, mean_rgb, crop_size, global_batch, seed, start_iteration=0):
    """training_dataset for every input pipeline of `strategy`, the global batch split over its replicas."""

    def dataset_function(context):
        return training_dataset(
            samples, mean_rgb, crop_size, global_batch, seed, start_iteration,
            pipeline=context.input_pipeline_id, pipelines=context.num_input_pipelines,
            replica_batch=context.get_per_replica_batch_size(global_batch),
        )

    return strategy.distribute_datasets_from_function(dataset_function)


def sample_problems(sample):
    """The problems of one sample, one line each (file: problem): unreadable image, missing or
    unreadable label, label of another size, label values neither a class nor unlabelled."""
    problems = []
    image = None
    try:
        image = utils.read_image(sample.image)
    except utils.ImageError as error:
        problems.append(f"unreadable image: {error}")
    try:
        label, undefined = datasets.read_label(sample)
    except datasets.SampleError as error:
        problem = "missing label" if error.problem == "label file missing" else error.problem
        return problems + [f"{error.path}: {problem}"]
    if image is not None and label.shape != image.shape[:2]:
        problems.append(f"{sample.label}: {size_problem(label.shape, image.shape, sample.image)}")
    if undefined:
        shown = ", ".join(map(str, undefined[: datasets.LISTED_VALUES]))
        more = f" and {len(undefined) - datasets.LISTED_VALUES} more" if len(undefined) > datasets.LISTED_VALUES else ""
        problems.append(
            f"{sample.label}: label values {shown}{more} are neither a class nor unlabelled "
            f"(this layout defines {sample.coding.defined_values()})"
        )
    return problems


def check_samples(samples, description="checking", quiet=False):
    """{sample: [problem lines]} of the samples that cannot be trained on, after reading every one.

    The files are read in CHECK_THREADS threads with a progress bar (none if `quiet`).
    """
    problems = {}
    with ThreadPoolExecutor(CHECK_THREADS) as pool, tqdm(
        total=len(samples), desc=description, unit="img", disable=quiet, leave=False, dynamic_ncols=True
    ) as bar:
        for sample, found in zip(samples, pool.map(sample_problems, samples)):
            if found:
                problems[sample] = found
            bar.update()
    return problems


def samples_fingerprint(samples, root):
    """A digest of the ordered list of samples (paths relative to the root), which fixes the data order."""
    digest = hashlib.sha256()
    for sample in samples:
        for path in (sample.image, sample.label):
            digest.update(os.path.relpath(path, root).encode("utf-8") + b"\0")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------
# Initial weights


def released_config_of_weights(path, arrays):
    """The released model whose layout the weights in `arrays` (read from `path`) have."""
    depth = 101 if "conv4_23_1x1_reduce" in arrays else 50
    conv6 = arrays.get("conv6")
    classes = conv6[0].shape[-1] if conv6 else None
    for config in models.RELEASED_MODELS.values():
        if (config.depth, config.classes) == (depth, classes):
            return config
    raise TrainingError(
        f"{path}: the weights of a ResNet-{depth} PSPNet of {classes} classes, which is no released model, "
        f"and no description {models.description_path(path).name} beside them"
    )


def init_model(init):
    """(ModelConfig, weights path) of --init: a released model's name, or a weights file (.h5)
    with its description beside it (a user model such as a run's final.h5) or without one (a
    released model's weights, recognised by their layers)."""
    if init in models.RELEASED_MODELS:
        config = models.RELEASED_MODELS[init]
        return config, None
    path = Path(init)
    problem = utils.file_problem(path)
    if problem:
        raise TrainingError(f"{path}: {problem}")
    try:
        config = models.model_of_weights(path)
    except models.ModelDescriptionError as error:
        raise TrainingError(str(error)) from None
    if config is None:
        config = released_config_of_weights(path, read_init_arrays(path))
    return config, path


def read_init_arrays(path):
    """The arrays of a weights file by layer name; TrainingError naming the file otherwise."""
    try:
        return keras2_weights.read_weights(path)
    except keras2_weights.WeightsError as error:
        raise TrainingError(str(error)) from None


def load_init_weights(network, path):
    """Fills the inference network from the weights file `path`; returns the layers that start fresh.

    Every weighted layer comes from the file, except conv6 when the file's has
    another number of classes: it keeps its fresh initialisation (Keras' defaults,
    as a new layer in hszhao/semseg starts from torch's). TrainingError names the
    file and the layer of a weights file that does not fit.
    """
    arrays = read_init_arrays(path)
    expected = layers_builder.file_weight_shapes(network)
    fresh = []
    if "conv6" in arrays and [a.shape for a in arrays["conv6"]] != expected["conv6"]:
        fresh.append("conv6")
    unknown = sorted(set(arrays) - set(expected))
    if unknown:
        raise TrainingError(f"{path}: layer {unknown[0]} is not in a PSPNet-{network_depth(network)}")
    for name, shapes in expected.items():
        if name in fresh:
            continue
        if name not in arrays:
            raise TrainingError(f"{path}: no weights for layer {name} of a PSPNet-{network_depth(network)}")
        given = [array.shape for array in arrays[name]]
        if given != shapes:
            raise TrainingError(f"{path}: layer {name} has weights of shapes {given}, the network expects {shapes}")
        network.get_layer(name).set_weights(arrays[name])
    return fresh


def network_depth(network):
    """The ResNet depth of a PSPNet network."""
    return 101 if any(layer.name == "conv4_23" for layer in network.layers) else 50


# ---------------------------------------------------------------------------------------
# Checkpoints


def unique_paths(variables):
    """The paths of `variables`, which must tell them apart."""
    paths = [variable.path for variable in variables]
    if len(set(paths)) != len(paths):
        raise ValueError("variables with the same path cannot be checkpointed by path")
    return paths


def variable_arrays(variables):
    """The values of `variables` as NumPy arrays; NonFiniteWeights when one is not finite."""
    arrays = [np.asarray(variable.numpy()) for variable in variables]
    for variable, array in zip(variables, arrays):
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            raise NonFiniteWeights(variable.path)
    return arrays


def write_checkpoint(path, model, optimizer, state):
    """Writes model and optimiser variables and `state` (a JSON-able dict) to `path`, atomically.

    Model variables are stored by path, the optimiser's in order with the paths of
    the variables it trains. NonFiniteWeights, writing nothing, when a value is not finite.
    """
    model_paths = unique_paths(model.variables)
    model_arrays = variable_arrays(model.variables)
    optimizer_arrays = variable_arrays(optimizer.variables)
    trained = [variable.path for variable in model.trainable_variables]

    def write(temporary):
        with h5py.File(temporary, "w") as handle:
            handle.attrs["format"] = CHECKPOINT_FORMAT
            handle.attrs["version"] = CHECKPOINT_VERSION
            handle.attrs["state"] = json.dumps(state)
            handle.attrs["trained"] = json.dumps(trained)
            weights = handle.create_group("model")
            for variable_path, array in zip(model_paths, model_arrays):
                weights.create_dataset(variable_path, data=array)
            slots = handle.create_group("optimizer")
            for index, array in enumerate(optimizer_arrays):
                slots.create_dataset(str(index), data=array)

    utils.write_atomic(path, write)


def read_checkpoint_state(path):
    """The state dict stored in a checkpoint; TrainingError naming the file when it is not one."""
    try:
        with h5py.File(path, "r") as handle:
            if handle.attrs.get("format") != CHECKPOINT_FORMAT:
                raise TrainingError(f"{path}: not a checkpoint of train.py")
            return json.loads(handle.attrs["state"])
    except (OSError, KeyError, ValueError) as error:
        raise TrainingError(f"{path}: unreadable checkpoint ({error})") from None


def restore_checkpoint(path, model, optimizer):
    """Loads a checkpoint written by write_checkpoint into `model` and its built `optimizer`; returns its state."""
    try:
        with h5py.File(path, "r") as handle:
            state = json.loads(handle.attrs["state"])
            trained = json.loads(handle.attrs["trained"])
            if trained != [variable.path for variable in model.trainable_variables]:
                raise TrainingError(f"{path}: trains other variables than this run (another model or --train-bn)")
            for variable, variable_path in zip(model.variables, unique_paths(model.variables)):
                stored = handle["model"].get(variable_path)
                if stored is None or stored.shape != tuple(variable.shape):
                    raise TrainingError(f"{path}: no value of shape {tuple(variable.shape)} for {variable_path}")
                variable.assign(np.asarray(stored))
            slots = handle["optimizer"]
            if len(slots) != len(optimizer.variables):
                raise TrainingError(f"{path}: optimiser state of another optimiser")
            for index, variable in enumerate(optimizer.variables):
                variable.assign(np.asarray(slots[str(index)]))
    except (OSError, KeyError, ValueError) as error:
        raise TrainingError(f"{path}: unreadable checkpoint ({error})") from None
    return state


# ---------------------------------------------------------------------------------------
# The loop


class Interruptions:
    """SIGINT and SIGTERM recorded instead of raised while training, so a step and its
    bookkeeping finish before the run stops; a second signal stops at once."""

    def __init__(self):
        self.received = None
        self.previous = {}

    def handle(self, signum, frame):
        if self.received is not None:
            raise cli.Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        self.received = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self.handle)
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        return False

    def raise_received(self):
        """Raises what the recorded signal stands for: cli.Terminated for SIGTERM, KeyboardInterrupt for SIGINT."""
        raise cli.Terminated() if self.received == signal.SIGTERM else KeyboardInterrupt()


def validation_miou(predictor, samples, classes, quiet=True):
    """mIoU (metrics.py) of the predictor's default mode (one crop, flip) over `samples`."""
    confusion = np.zeros((classes, classes), np.int64)
    for sample in tqdm(samples, desc="validating", unit="img", disable=quiet, leave=False, dynamic_ncols=True):
        image, label = SampleReader([sample])(0)
        class_ids, _ = predictor.class_map(image)
        confusion += metrics.confusion_matrix(label, class_ids, classes)
    return metrics.summary(confusion)["miou"]


@dataclasses.dataclass
class Settings:
    """What a run trains: the recipe's hyper-parameters and the run's bookkeeping intervals."""

    iterations: int
    batch: int
    crop_size: int
    lr: float = BASE_LR
    momentum: float = MOMENTUM
    weight_decay: float = WEIGHT_DECAY
    power: float = POLY_POWER
    aux_weight: float = AUX_WEIGHT
    head_lr_mult: float = HEAD_LR_MULTIPLIER
    train_bn: bool = False
    seed: int = 0
    precision: str = "float32"
    val_every: int = 0
    checkpoint_every: int = 1000


class RunLog:
    """OUT/log.csv and OUT/tensorboard/ of a run (the chief's; a no-op elsewhere).

    A resumed run drops the rows after its checkpoint (a killed run may have logged
    iterations it did not checkpoint) and appends from there; every row is flushed.
    TensorBoard gets each column as a scalar at the row's iteration.
    """

    def __init__(self, out, start, enabled=True):
        self.out = Path(out)
        self.start = start
        self.enabled = enabled
        self.file = self.writer = self.board = None

    def __enter__(self):
        if self.enabled:
            path = self.out / LOG_NAME
            rows = read_log_rows(path, self.start)
            utils.write_atomic(path, lambda temporary: write_log_rows(temporary, rows))
            self.file = open(path, "a", newline="", encoding="utf-8")
            self.writer = csv.DictWriter(self.file, LOG_COLUMNS)
            self.board = tf.summary.create_file_writer(str(self.out / TENSORBOARD_DIR))
        return self

    def __exit__(self, *exc_info):
        if self.enabled:
            self.file.close()
            self.board.close()
        return False

    def write(self, row):
        """Appends one iteration's row (LOG_COLUMNS; val_miou None when not measured)."""
        if not self.enabled:
            return
        self.writer.writerow({column: "" if row[column] is None else row[column] for column in LOG_COLUMNS})
        self.file.flush()
        with self.board.as_default(step=row["iteration"]):
            for column in LOG_COLUMNS[1:]:
                if row[column] is not None:
                    tf.summary.write(column, tf.constant(row[column], tf.float32), metadata=SCALAR_METADATA)


def read_log_rows(path, last_iteration):
    """The complete rows of a log.csv up to `last_iteration`."""
    rows = []
    try:
        with open(path, newline="", encoding="utf-8") as file:
            for row in csv.DictReader(file):
                try:
                    iteration = int(row["iteration"])
                except (TypeError, ValueError, KeyError):
                    continue
                if iteration <= last_iteration and None not in row.values():
                    rows.append(row)
    except FileNotFoundError:
        pass
    return rows


def write_log_rows(path, rows):
    """Writes log.csv's header and `rows` (dicts by LOG_COLUMNS) to `path`."""
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, LOG_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


class Trainer:
    """The training loop of train.py around a training model, with its files in `out`.

    Each iteration: one step on the distributed batch, a row of log.csv and
    TensorBoard scalars (RunLog), validation mIoU every `val_every` iterations and
    at the end (on `val_samples`, in the inference protocol's default mode), a
    checkpoint every `checkpoint_every` iterations. Only the chief writes files.
    SIGINT or SIGTERM finishes the step, writes a checkpoint and raises
    KeyboardInterrupt (or cli.Terminated). A non-finite loss or weights raise
    TrainingError naming the iteration; nothing with non-finite weights is written.
    """

    def __init__(self, strategy, model, network, optimizer, settings, config, out, samples, val_samples=(),
                 fingerprint=None, chief=True, quiet=False):
        self.strategy = strategy
        self.model = model
        self.network = network
        self.optimizer = optimizer
        self.settings = settings
        self.config = config
        self.out = Path(out)
        self.samples = samples
        self.val_samples = list(val_samples)
        self.fingerprint = fingerprint
        self.chief = chief
        self.quiet = quiet or not chief
        self.predictor = None
        self.checkpointed = None

    @property
    def iteration(self):
        """The number of steps taken, as the optimiser counts them."""
        return int(self.optimizer.iterations.numpy())

    def learning_rate(self, iteration):
        """The base learning rate of (0-based) step `iteration`."""
        return float(PolyDecay(self.settings.lr, self.settings.iterations, self.settings.power)(iteration))

    def resume(self):
        """Restores OUT/checkpoint.h5 when there is one; returns the iteration training goes on from."""
        path = self.out / CHECKPOINT_NAME
        if not path.exists():
            return 0
        state = restore_checkpoint(path, self.model, self.optimizer)
        if state.get("fingerprint") != self.fingerprint:
            raise TrainingError(
                f"{path}: the training samples are not those of the run being resumed (files added, removed "
                "or renamed, or other samples skipped); resume with the same data, or start a new run"
            )
        return state["iteration"]

    def failure(self, what, iteration):
        """TrainingError: `what` went wrong at `iteration`, what is kept, and what to try."""
        kept = f"the last checkpoint is at iteration {self.checkpointed}" if self.checkpointed else "no checkpoint"
        return TrainingError(
            f"{what} at iteration {iteration}; nothing more was written ({kept}); "
            f"try a lower --lr than {self.settings.lr:g}"
        )

    def checkpoint(self):
        """Writes OUT/checkpoint.h5 (chief only); TrainingError when the weights are not finite."""
        iteration = self.iteration
        if self.chief:
            state = {"iteration": iteration, "position": iteration * self.settings.batch,
                     "seed": self.settings.seed, "fingerprint": self.fingerprint}
            try:
                write_checkpoint(self.out / CHECKPOINT_NAME, self.model, self.optimizer, state)
            except NonFiniteWeights as error:
                raise self.failure(f"the weights are not finite ({error.path})", iteration) from None
        self.checkpointed = iteration

    def step_function(self):
        """The compiled step: the next distributed batch through model.train_step on every replica."""

        @tf.function
        def step(iterator):
            results = self.strategy.run(self.model.train_step, args=(next(iterator),))
            return {name: self.strategy.experimental_local_results(value)[0] for name, value in results.items()}

        return step

    def take_step(self, step, iterator):
        """One iteration: its losses, as floats; TrainingError when they are not finite or the data fails."""
        iteration = self.iteration + 1
        try:
            results = {name: float(value) for name, value in step(iterator).items()}
        except tf.errors.OpError as error:
            message = error.message.strip().splitlines()[0] if error.message else type(error).__name__
            raise TrainingError(
                f"training stopped at iteration {iteration}: {message} (the last checkpoint is at iteration "
                f"{self.checkpointed})"
            ) from None
        if not math.isfinite(results["loss"]):
            raise self.failure(f"the loss is not finite ({results['loss']})", iteration)
        return results

    def validate(self):
        """The validation mIoU of the current weights (chief only; None elsewhere)."""
        if not self.chief or not self.val_samples:
            return None
        if self.predictor is None:
            logits, upsampling = layers_builder.split_upsampling(self.network)
            self.predictor = Predictor(
                logits, self.settings.crop_size, self.config.base_size, upsampling, mean_rgb=self.config.mean_rgb
            )
        return validation_miou(self.predictor, self.val_samples, self.config.classes, quiet=self.quiet)

    def write_final(self):
        """Writes OUT/final.h5 (the inference network, Keras-2 layout) and OUT/final.json, together."""
        try:
            variable_arrays(self.network.weights)
        except NonFiniteWeights as error:
            raise self.failure(f"the weights are not finite ({error.path})", self.iteration) from None
        weights = self.out / f"{FINAL_STEM}.h5"
        with utils.AtomicFiles() as files:
            files.write(weights, lambda temporary: layers_builder.save_weights(self.network, temporary))
            files.write(models.description_path(weights), utils.json_writer(self.config.description()))
            files.commit()
        return weights

    def run(self, start):
        """Trains from iteration `start` to settings.iterations; writes and returns OUT/final.h5 (chief; None
        elsewhere)."""
        settings = self.settings
        dataset = distributed_dataset(
            self.strategy, self.samples, self.config.mean_rgb, settings.crop_size, settings.batch, settings.seed, start
        )
        iterator = iter(dataset)
        step = self.step_function()
        self.checkpointed = start
        with RunLog(self.out, start, self.chief) as log, Interruptions() as interruptions, tqdm(
            total=settings.iterations, initial=start, desc="training", unit="it", disable=self.quiet,
            dynamic_ncols=True,
        ) as bar:
            clock = time.perf_counter()
            while self.iteration < settings.iterations and interruptions.received is None:
                results = self.take_step(step, iterator)
                iteration = self.iteration
                now = time.perf_counter()
                row = {**results, "iteration": iteration, "lr": self.learning_rate(iteration - 1),
                       "images_per_s": settings.batch / (now - clock), "val_miou": None}
                last = iteration == settings.iterations
                if settings.val_every and (iteration % settings.val_every == 0 or last):
                    row["val_miou"] = self.validate()
                log.write(row)
                if iteration % settings.checkpoint_every == 0 or last:
                    self.checkpoint()
                bar.set_postfix(loss=f"{results['loss']:.4f}", refresh=False)
                bar.update()
                clock = time.perf_counter()
            if interruptions.received is not None:
                if self.iteration != self.checkpointed:
                    self.checkpoint()
                interruptions.raise_received()
        return self.write_final() if self.chief else None
