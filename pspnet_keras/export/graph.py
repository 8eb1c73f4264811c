"""pspnet.py's default protocol as a TensorFlow graph: the SavedModel's `segment` signature.

Each function is the one of pspnet_keras/inference.py with the same name, computed on
tensors (inference.py computes with NumPy and Pillow on known sizes; a signature's
image size is known only when it runs).
"""

from pspnet_keras import runtime
from pspnet_keras.export.formats import CLASS_IDS
from pspnet_keras.export.formats import MAX_PROBABILITY
from pspnet_keras.export.formats import PIXEL_RANGE

tf = runtime.import_tensorflow()

from layers_builder import split_upsampling


def scaled_size(height, width, long_side):
    """inference.scaled_size on int32 tensors: the (height, width) with the longer side `long_side` and
    the aspect ratio kept, the shorter side rounded from a float32 ratio as eval_sub.m does, at least 1."""
    side = tf.constant(long_side, tf.float32)
    height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    tall = height > width
    shorter = tf.where(tall, side / height_f * width_f, side / width_f * height_f)
    shorter = tf.maximum(1, tf.cast(tf.floor(shorter + 0.5), tf.int32))
    return tf.where(tall, long_side, shorter), tf.where(tall, shorter, long_side)


def mirrored_indices(length, margin):
    """inference.mirrored_indices on tensors: 0..length-1 with `margin` mirrored indices each side.

    NumPy's symmetric padding repeats the reflection for margins beyond the length,
    which makes the indices periodic with period 2 * length.
    """
    folded = tf.math.floormod(tf.range(-margin, length + margin), 2 * length)
    return tf.where(folded < length, folded, 2 * length - 1 - folded)


def resize_margin(in_size, out_size):
    """inference.resize_margin on int32 tensors: ceil(in / out) + 2."""
    return (in_size + out_size - 1) // out_size + 2


def resize_axis(images, axis, out_size, rounded):
    """A batch of one (1, H, W, C) float32 image resized along `axis` (1 rows, 2 columns) to out_size.

    MATLAB's imresize 'bilinear' on a mirrored border (inference.resize_image):
    TensorFlow's ScaleAndTranslate with a triangle kernel widened when shrinking, on
    the image padded with the border it reaches, the other axis at scale 1 (a copy).
    `rounded` rounds to whole grey levels in 0..255, as Pillow's 8-bit passes do.
    """
    in_size = tf.shape(images)[axis]
    margin = resize_margin(in_size, out_size)
    padded = tf.gather(images, mirrored_indices(in_size, margin), axis=axis)
    scale = tf.cast(out_size, tf.float32) / tf.cast(in_size, tf.float32)
    translation = -tf.cast(margin, tf.float32) * scale
    if axis == 1:
        size, scales, translations = tf.stack([out_size, tf.shape(images)[2]]), [scale, 1.0], [translation, 0.0]
    else:
        size, scales, translations = tf.stack([tf.shape(images)[1], out_size]), [1.0, scale], [0.0, translation]
    resized = tf.raw_ops.ScaleAndTranslate(
        images=padded, size=size, scale=tf.stack(scales), translation=tf.stack(translations),
        kernel_type="triangle", antialias=True,
    )
    return tf.clip_by_value(tf.floor(resized + 0.5), 0.0, PIXEL_RANGE) if rounded else resized


def resize_image(image, height, width):
    """A uint8 (H, W, 3) image resized as inference.resize_image does, as float32 grey levels.

    Pillow resizes in two passes, each rounded to 8 bits, horizontal then vertical
    (src/libImaging/Resample.c, ImagingResampleInner); so does this. A grey level
    can differ where Pillow's fixed-point weights round the other way, and where
    the Pillow installed takes the vertical pass first, as Pillow 13.0 does for some
    sizes (mostly when the height shrinks more than the width).
    """
    images = tf.cast(image, tf.float32)[tf.newaxis]
    images = resize_axis(images, 2, width, rounded=True)
    return resize_axis(images, 1, height, rounded=True)[0]


def resize_probabilities(probabilities, height, width):
    """An (h, w, classes) probability map resized to (height, width) as inference.py resizes it."""
    maps = resize_axis(probabilities[tf.newaxis], 1, height, rounded=False)
    return resize_axis(maps, 2, width, rounded=False)[0]


def segment_function(network, mean_rgb):
    """pspnet.py's default protocol for one uint8 (H, W, 3) RGB image, as a function of tensors.

    The image is scaled so that its longer side is the crop size (scaled_size,
    resize_image), its mean-subtracted BGR pixels are padded with zeros (the mean
    colour) at the bottom and right, the crop's logits plus the mirrored logits of
    its mirror are softmaxed, and the probabilities of the image's part of the crop
    are resized back to (H, W). The function returns {class_ids: uint8 (H, W),
    max_probability: float32 (H, W)}. As in inference.Predictor, the two passes stop
    at conv6 and the x8 Interp upsamples their sum, only over the image's part of the crop.
    """
    logits_network, upsampling = split_upsampling(network)
    crop_size = network.input_shape[1]
    mean_rgb = tf.constant(mean_rgb, tf.float32)

    def segment(image):
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        scaled_height, scaled_width = scaled_size(height, width, crop_size)
        data = (resize_image(image, scaled_height, scaled_width) - mean_rgb)[..., ::-1]
        data = tf.pad(data, [[0, crop_size - scaled_height], [0, crop_size - scaled_width], [0, 0]])
        crop = tf.ensure_shape(data, (crop_size, crop_size, 3))[tf.newaxis]
        logits = tf.cast(logits_network(crop, training=False), tf.float32)
        mirrored = tf.cast(logits_network(crop[:, :, ::-1], training=False), tf.float32)
        logits = upsampling.upsample(logits + mirrored[:, :, ::-1], scaled_height, scaled_width)
        probabilities = resize_probabilities(tf.nn.softmax(logits[0], axis=-1), height, width)
        return {
            CLASS_IDS: tf.cast(tf.argmax(probabilities, axis=-1), tf.uint8),
            MAX_PROBABILITY: tf.reduce_max(probabilities, axis=-1),
        }

    return segment
