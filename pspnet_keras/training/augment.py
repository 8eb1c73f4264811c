"""The recipe's augmentation of one training example (paper §4; hszhao/semseg util/transform.py).

Images are float32 RGB minus the mean until network_input, so padding with 0 is
padding with the mean colour; labels are uint8 with IGNORE_LABEL unlabelled.
"""

import math

from pspnet_keras import runtime

tf = runtime.import_tensorflow()

from pspnet_keras.datasets import IGNORE_LABEL
from pspnet_keras.training.recipe import BLUR_KERNEL
from pspnet_keras.training.recipe import BLUR_PROBABILITY
from pspnet_keras.training.recipe import MIRROR_PROBABILITY
from pspnet_keras.training.recipe import ROTATION_DEGREES
from pspnet_keras.training.recipe import SCALE_RANGE

# The stateless seeds `augment` draws from an example's seed: scale, rotation, blur, mirror, crop.
AUGMENTATION_DRAWS = 5


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
