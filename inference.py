"""The Caffe release's evaluation protocol around a PSPNet: crops, flip, sliding window, scales.

This follows evaluation/{eval_sub,scale_process,pre_img,caffe_process}.m of
hszhao/PSPNet: the image is scaled so that its longer side is a given length,
padded with the mean colour to the crop size, cut into overlapping crops, each
crop's probabilities are softmax(logits + mirrored logits of the mirrored crop),
overlaps are averaged, and the map is resized back to the image.
"""

import math

import numpy as np
import tensorflow as tf
from PIL import Image

DATA_MEAN_RGB = np.array([123.68, 116.779, 103.939], dtype=np.float32)
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
STRIDE_RATE = 2 / 3


def matlab_round(value):
    """Rounds half away from zero, as MATLAB's round does for positive values."""
    return int(math.floor(value + 0.5))


def scaled_size(height, width, long_side):
    """The (height, width) with the longer side `long_side` and the aspect ratio kept.

    The shorter side is rounded from a single-precision ratio, as eval_sub.m does,
    and is at least one pixel.
    """
    if height > width:
        return long_side, max(1, matlab_round(np.float32(long_side) / np.float32(height) * np.float32(width)))
    return max(1, matlab_round(np.float32(long_side) / np.float32(width) * np.float32(height))), long_side


def resize_margin(in_size, out_size):
    """Pixels of mirrored border that a bilinear resize from in_size to out_size can reach."""
    return math.ceil(in_size / out_size) + 2


def resize_image(image, height, width):
    """`image` (uint8 RGB) resized as MATLAB's imresize(..., 'bilinear') does.

    Half-pixel centres, a triangle kernel widened when shrinking (antialiasing), and
    a mirrored border, which Pillow reads from a symmetric pad around the box.
    """
    if image.shape[:2] == (height, width):
        return image
    rows, columns = resize_margin(image.shape[0], height), resize_margin(image.shape[1], width)
    padded = np.pad(image, ((rows, rows), (columns, columns), (0, 0)), mode="symmetric")
    box = (columns, rows, columns + image.shape[1], rows + image.shape[0])
    return np.asarray(Image.fromarray(padded).resize((width, height), Image.BILINEAR, box=box))


def preprocess(image):
    """The network input for a uint8 RGB image: float32 BGR with the training mean subtracted."""
    return (image.astype(np.float32) - DATA_MEAN_RGB)[..., ::-1]


def window_starts(length, crop_size, stride):
    """The start offsets of the sliding windows along a padded side of `length` pixels."""
    count = math.ceil((length - crop_size) / stride) + 1
    return [min(i * stride, length - crop_size) for i in range(count)]


def average_windows(windows):
    """The mean of overlapping windows at every pixel of the map they cover, from its top left.

    `windows` are (top, left, (rows, columns, classes) tensor). The map is cut
    where any window begins or ends; each piece is the mean of the windows over
    it, so every window is read once and the map written once.
    """
    if len(windows) == 1:
        return windows[0][2]
    row_cuts = sorted({top for top, _, _ in windows} | {top + w.shape[0] for top, _, w in windows})
    column_cuts = sorted({left for _, left, _ in windows} | {left + w.shape[1] for _, left, w in windows})
    bands = []
    for band_top, band_bottom in zip(row_cuts, row_cuts[1:]):
        pieces = []
        for piece_left, piece_right in zip(column_cuts, column_cuts[1:]):
            covering = [
                window[band_top - top : band_bottom - top, piece_left - left : piece_right - left]
                for top, left, window in windows
                if top <= band_top and band_bottom <= top + window.shape[0]
                and left <= piece_left and piece_right <= left + window.shape[1]
            ]
            pieces.append(covering[0] if len(covering) == 1 else tf.add_n(covering) / len(covering))
        bands.append(tf.concat(pieces, axis=1))
    return tf.concat(bands, axis=0)


def best_classes(probabilities):
    """The class id (uint8) and its probability (float32) at every pixel of an (H, W, classes) map."""
    class_ids = tf.argmax(probabilities, axis=-1, output_type=tf.int32)
    return tf.cast(class_ids, tf.uint8).numpy(), tf.reduce_max(probabilities, axis=-1).numpy()


def mirrored_indices(length, margin):
    """Indices 0..length-1 extended by `margin` on each side with MATLAB's mirrored border."""
    return np.pad(np.arange(length), margin, mode="symmetric")


def resize_probabilities(probabilities, height, width):
    """A (h, w, classes) probability map resized to (height, width), as a tensor.

    Resized as MATLAB's imresize(..., 'bilinear') does (see resize_image), by
    TensorFlow's ScaleAndTranslate on the map with a mirrored border. The release
    then renormalises each pixel to sum 1; as both resizes weight each output by
    weights that sum to 1, that changes nothing but rounding, and is left out.
    """
    in_height, in_width = probabilities.shape[:2]
    if (in_height, in_width) == (height, width):
        return tf.convert_to_tensor(probabilities)
    rows, columns = resize_margin(in_height, height), resize_margin(in_width, width)
    padded = tf.gather(probabilities, mirrored_indices(in_height, rows), axis=0)
    padded = tf.gather(padded, mirrored_indices(in_width, columns), axis=1)
    scale = (height / in_height, width / in_width)
    return tf.raw_ops.ScaleAndTranslate(
        images=padded[tf.newaxis],
        size=(height, width),
        scale=scale,
        translation=(-rows * scale[0], -columns * scale[1]),
        kernel_type="triangle",
        antialias=True,
    )[0]


class Predictor:
    """Class probabilities of whole images from a network that maps crops to logits.

    `network` maps (N, crop_size, crop_size, 3) preprocessed crops to
    (N, crop_size, crop_size, classes) logits, or, with `upsampling`, to logits that
    `upsampling.upsample(logits, height, width)` brings to the first height x width
    pixels of the crop (the network's final Interp, layers_builder.split_upsampling;
    it must commute with mirroring, as the x8 Interp does). `base_size` is the longer
    side the single-scale protocol rescales images to (plus one pixel, as the
    release does).
    """

    def __init__(self, network, crop_size, base_size, upsampling=None):
        self.upsampling = upsampling
        self.crop_size = crop_size
        self.base_size = base_size
        self.stride = math.ceil(crop_size * STRIDE_RATE)
        self._crop_functions = {}
        batch_spec = tf.TensorSpec((1, crop_size, crop_size, 3), tf.float32)
        self._network_function = tf.function(
            lambda batch: tf.cast(network(batch, training=False), tf.float32), input_signature=[batch_spec]
        )

    def crop_function(self, flip):
        """The compiled (crop, height, width) -> probabilities function, with or without the mirror.

        Returns the (height, width, classes) probabilities of the top-left part of
        the crop. The mirrored pass is a second batch-of-one call of the same
        compiled network, traced once for both (on the CPU one batch of two costs
        more than two calls, bench/README.md); its mirrored logits are added before
        the upsampling, which commutes with mirroring.
        """
        if flip not in self._crop_functions:
            crop_spec = tf.TensorSpec((self.crop_size, self.crop_size, 3), tf.float32)
            side_spec = tf.TensorSpec((), tf.int32)

            @tf.function(input_signature=[crop_spec, side_spec, side_spec])
            def crop_probabilities(crop, height, width):
                logits = self._network_function(crop[tf.newaxis])
                if flip:
                    logits += self._network_function(crop[tf.newaxis, :, ::-1])[:, :, ::-1]
                if self.upsampling is None:
                    logits = logits[:, :height, :width]
                else:
                    logits = self.upsampling.upsample(logits, height, width)
                return tf.nn.softmax(logits[0], axis=-1)

            self._crop_functions[flip] = crop_probabilities
        return self._crop_functions[flip]

    def long_sides(self, sliding, multi_scale):
        """The longer side of the image at each scale of the protocol."""
        if multi_scale:
            return [int(self.base_size * scale) + 1 for scale in MULTI_SCALES]
        if sliding:
            return [self.base_size + 1]
        return [self.crop_size]

    def crop_grid(self, height, width):
        """The (top, left) corners of the crops covering a (height, width) scaled image."""
        if max(height, width) <= self.crop_size:
            return [(0, 0)]
        rows = window_starts(max(height, self.crop_size), self.crop_size, self.stride)
        columns = window_starts(max(width, self.crop_size), self.crop_size, self.stride)
        return [(top, left) for top in rows for left in columns]

    def forward_count(self, height, width, sliding=False, flip=True, multi_scale=False):
        """The number of forward passes `predict` makes for an image of (height, width)."""
        crops = 0
        for long_side in self.long_sides(sliding, multi_scale):
            crops += len(self.crop_grid(*scaled_size(height, width, long_side)))
        return crops * (2 if flip else 1)

    def scale_probabilities(self, image, flip, progress):
        """The averaged crop probabilities of an image already at its protocol scale."""
        height, width = image.shape[:2]
        size = self.crop_size
        data = np.zeros((max(height, size), max(width, size), 3), dtype=np.float32)
        data[:height, :width] = preprocess(image)
        crop_probabilities = self.crop_function(flip)
        windows = []
        for top, left in self.crop_grid(height, width):
            rows, columns = min(size, height - top), min(size, width - left)
            windows.append((top, left, crop_probabilities(data[top : top + size, left : left + size], rows, columns)))
            progress(2 if flip else 1)
        return average_windows(windows)

    def probability_map(self, image, sliding=False, flip=True, multi_scale=False, progress=None):
        """The (H, W, classes) float32 class probabilities of a uint8 RGB image, as a tensor.

        See `predict`.
        """
        progress = progress or (lambda passes: None)
        height, width = image.shape[:2]
        long_sides = self.long_sides(sliding, multi_scale)
        result = None
        for long_side in long_sides:
            scaled = resize_image(image, *scaled_size(height, width, long_side))
            probabilities = self.scale_probabilities(scaled, flip, progress)
            probabilities = resize_probabilities(probabilities, height, width)
            result = probabilities if result is None else result + probabilities
        if len(long_sides) > 1:
            result /= len(long_sides)
        return result

    def predict(self, image, sliding=False, flip=True, multi_scale=False, progress=None):
        """The (H, W, classes) float32 class probabilities of a uint8 RGB image.

        Default: one crop, the image scaled so its longer side is the crop size.
        `sliding`: the single-scale protocol, longer side base_size + 1, sliding crops.
        `multi_scale`: the sliding protocol at 0.5 to 1.75 of base_size, averaged.
        `flip`: each crop's logits plus the mirrored logits of its mirror image.
        `progress` is called with the number of forward passes after each crop.
        """
        return self.probability_map(image, sliding, flip, multi_scale, progress).numpy()
