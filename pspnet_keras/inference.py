"""The Caffe release's evaluation protocol around a PSPNet: crops, flip, sliding window, scales.

This follows evaluation/{eval_sub,scale_process,pre_img,caffe_process}.m of
hszhao/PSPNet: the image is scaled so that its longer side is a given length,
padded with the mean colour to the crop size, cut into overlapping crops, each
crop's probabilities are softmax(logits + mirrored logits of the mirrored crop),
overlaps are averaged, and the map is resized back to the image.

The probability map of each scale stays at that scale's size. The image-sized
result is made in bands of output rows: each band of each scale's map is resized
from the input rows its kernel reaches, the bands of all scales are averaged and
reduced to the best class and its probability, so the (H, W, classes) map of the
whole image is never held (it is written band by band only where asked for).
"""

import contextlib
import itertools
import math
import os
import typing

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

from pspnet_keras import runtime

runtime.import_keras()  # before Keras: its backend chosen and started as the commands start it

from keras import ops

import utils
from pspnet_keras import backend
from pspnet_keras.models import RELEASE_MEAN_RGB

MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
STRIDE_RATE = 2 / 3
# The size of one band of the image-sized probabilities, float32 (rows, W, classes):
# small enough to stay near the processor's caches, large enough that the per-band
# calls cost little (bench/README.md, "Memory and time on large photos").
BAND_BYTES = 32 << 20
# A band's row weights are a dense (rows, input rows reached) matrix: where a map is
# shrunk, the input rows grow with the band, and so would the cost of multiplying.
MAX_BAND_ROWS = 32
# Output columns resized by one matrix product from the input columns they reach: few enough that
# the product stays close to the kernel's two or three taps a column when enlarging.
COLUMN_BLOCK = 64
# Bands are resized and reduced in parallel: NumPy's products and argmax of one band each
# use one core. Each thread holds a few bands at a time.
BAND_THREADS = min(4, os.cpu_count() or 1)
# NumPy's BLAS computes a band's products in one thread (threadpoolctl): the bands are the
# parallelism, and the sums of a product then do not depend on how many threads BLAS would
# take on the machine (OMP_NUM_THREADS, a Ray worker's CPUs), so outputs are the same bytes.
BLAS_THREADS_PER_BAND = 1
FLOAT32_BYTES = 4


class OutOfMemory(ValueError):
    """An image that could not be segmented for lack of memory; the message says what to try."""


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


def mirrored_indices(length, margin):
    """Indices 0..length-1 extended by `margin` on each side with MATLAB's mirrored border."""
    return np.pad(np.arange(length), margin, mode="symmetric")


def mirror_padded_rgbx(image, rows, columns):
    """A uint8 RGB image with `rows` and `columns` of mirrored border, as an (H, W, 4) RGBX array.

    Pillow keeps RGB pixels in four bytes, so it copies an RGB array once more when it
    makes an image of it; an RGBX array it uses in place (Image.frombuffer). The X
    byte is left unset: Pillow resizes each band on its own and it is dropped after.
    """
    height, width = image.shape[:2]
    row_sources = mirrored_indices(height, rows)
    column_sources = mirrored_indices(width, columns)
    padded = np.empty((height + 2 * rows, width + 2 * columns, 4), dtype=np.uint8)
    inside = slice(columns, columns + width)
    padded[rows : rows + height, inside, :3] = image
    padded[:rows, inside, :3] = image[row_sources[:rows]]
    padded[rows + height :, inside, :3] = image[row_sources[rows + height :]]
    padded[:, :columns] = padded[:, columns + column_sources[:columns]]
    padded[:, columns + width :] = padded[:, columns + column_sources[columns + width :]]
    return padded


def resize_image(image, height, width):
    """`image` (uint8 RGB) resized as MATLAB's imresize(..., 'bilinear') does.

    Half-pixel centres, a triangle kernel widened when shrinking (antialiasing), and
    a mirrored border, which Pillow reads from a symmetric pad around the box. The
    padded copy (4 bytes a pixel) is the only image-sized allocation.
    """
    if image.shape[:2] == (height, width):
        return image
    rows, columns = resize_margin(image.shape[0], height), resize_margin(image.shape[1], width)
    padded = mirror_padded_rgbx(image, rows, columns)
    picture = Image.frombuffer("RGBX", (padded.shape[1], padded.shape[0]), padded, "raw", "RGBX", 0, 1)
    box = (columns, rows, columns + image.shape[1], rows + image.shape[0])
    resized = picture.resize((width, height), Image.BILINEAR, box=box)
    return np.ascontiguousarray(np.asarray(resized)[..., :3])


def preprocess(image, mean_rgb=RELEASE_MEAN_RGB):
    """The network input for a uint8 RGB image: float32 BGR with the training mean subtracted."""
    return (image.astype(np.float32) - np.asarray(mean_rgb, dtype=np.float32))[..., ::-1]


def window_starts(length, crop_size, stride):
    """The start offsets of the sliding windows along a padded side of `length` pixels."""
    count = math.ceil((length - crop_size) / stride) + 1
    return [min(i * stride, length - crop_size) for i in range(count)]


def resize_weights(in_length, out_length, margin):
    """The (out_length, in_length + 2 margin) weights of MATLAB's imresize 'bilinear' along one axis.

    The weight of each row of the input padded by `margin` (a mirrored border) in
    each output row, when `in_length` rows are resized to `out_length`: half-pixel
    centres, output row x sampling the input at (x + 0.5) / scale - 0.5, a triangle
    kernel widened by the shrink factor when shrinking (antialiasing), the weights
    of each output row normalised to sum 1. Computed in float32 in the order of
    TensorFlow's ScaleAndTranslate (kernel 'triangle', antialias; its
    scale_and_translate_op.cc), whose result the project had before.
    """
    padded = in_length + 2 * margin
    scale = np.float32(out_length / in_length)
    translation = np.float32(-margin * (out_length / in_length))
    inverse_scale = np.float32(1.0 / np.float64(scale))
    inverse_translation = -inverse_scale * translation
    kernel_scale = max(inverse_scale, np.float32(1.0))
    samples = (np.arange(out_length, dtype=np.float32) + np.float32(0.5)) * inverse_scale + inverse_translation
    centres = np.arange(padded, dtype=np.float32) + np.float32(0.5)
    distances = np.abs((centres[np.newaxis, :] - samples[:, np.newaxis]) * (np.float32(1.0) / kernel_scale))
    weights = np.maximum(np.float32(1.0) - distances, np.float32(0.0))
    totals = weights.cumsum(axis=1, dtype=np.float32)[:, -1:]  # summed in order, as ScaleAndTranslate does
    return weights * (np.float32(1.0) / totals)


def reached_sources(weights):
    """(first, end): row i of a weight matrix has its non-zero weights among sources first[i]..end[i]-1."""
    reached = weights != 0
    return reached.argmax(axis=1), reached.shape[1] - reached[:, ::-1].argmax(axis=1)


def weight_blocks(weights, block):
    """(first, end, first source, end source) of each block of `block` rows of a weight matrix: the
    rows first..end-1 reach no source outside first source..end source-1."""
    first_sources, end_sources = reached_sources(weights)
    return [
        (first, min(first + block, len(weights)), first_sources[first : first + block].min(),
         end_sources[first : first + block].max())
        for first in range(0, len(weights), block)
    ]


class BandResize:
    """A (h, w, classes) probability map resized to (height, width), one band of rows at a time.

    Resized as MATLAB's imresize(..., 'bilinear') does (see resize_image and
    resize_weights) on the map with a mirrored border, by two matrix products. A
    band of output rows is made from the input rows its kernel reaches, with their
    mirrored border: first along the columns (each block of COLUMN_BLOCK output
    columns from the few input columns it reaches, so that the product stays as
    sparse as the kernel), then along the rows by the band's row weights. The band
    is thus those rows of the whole map resized at once, but for the rounding of
    sums in another order. Resizing the columns first resizes a few input rows
    instead of the band's many output rows when the map is enlarged, as photos are.

    The release then renormalises each pixel to sum 1; as both resizes weight each
    output by weights that sum to 1, that changes nothing but rounding, and is
    left out.
    """

    def __init__(self, probabilities, height, width):
        self.probabilities = probabilities
        self.width = width
        in_height, in_width = probabilities.shape[:2]
        self.unchanged = (in_height, in_width) == (height, width)
        if self.unchanged:
            return
        rows, columns = resize_margin(in_height, height), resize_margin(in_width, width)
        self.row_sources = mirrored_indices(in_height, rows)
        self.row_weights = resize_weights(in_height, height, rows)
        self.first_row, self.end_row = reached_sources(self.row_weights)
        self.column_sources = mirrored_indices(in_width, columns)
        self.column_weights = resize_weights(in_width, width, columns)
        self.column_blocks = weight_blocks(self.column_weights, COLUMN_BLOCK)

    def band(self, top, bottom):
        """Rows top..bottom-1 of the resized map, as a float32 (rows, width, classes) array."""
        if self.unchanged:
            return self.probabilities[top:bottom]
        start, end = self.first_row[top:bottom].min(), self.end_row[top:bottom].max()
        sources = self.probabilities[np.ix_(self.row_sources[start:end], self.column_sources)]
        columns = np.empty((end - start, self.width, sources.shape[-1]), dtype=np.float32)
        for first, last, first_source, end_source in self.column_blocks:
            columns[:, first:last] = np.matmul(
                self.column_weights[first:last, first_source:end_source], sources[:, first_source:end_source]
            )
        rows = np.matmul(self.row_weights[top:bottom, start:end], columns.reshape(end - start, -1))
        return rows.reshape(bottom - top, self.width, -1)


def band_height(width, classes, band_bytes):
    """The rows of a band: as many as keep float32 (rows, width, classes) within band_bytes, 1 to MAX_BAND_ROWS."""
    return min(MAX_BAND_ROWS, max(1, band_bytes // (width * classes * FLOAT32_BYTES)))


def average_of_resized(maps, height, width, probabilities, band_bytes, threads):
    """The best class and its probability at every pixel of the mean of `maps` resized to (height, width).

    `maps` are (h, w, classes) float32 probability maps, one per scale, of any sizes.
    Returns (class ids uint8 (height, width), probabilities float32 (height, width)),
    the first class where several are best. The resized mean is made in bands of
    output rows of about `band_bytes` (band_height), `threads` bands at a time;
    `probabilities`, unless None, an array-like of shape (height, width, classes),
    receives each band, top to bottom.
    """
    resizes = [BandResize(scale_map, height, width) for scale_map in maps]
    rows = band_height(width, maps[0].shape[-1], band_bytes)

    def band(top):
        bottom = min(height, top + rows)
        mean = resizes[0].band(top, bottom)
        for resize in resizes[1:]:
            mean = mean + resize.band(top, bottom)
        if len(resizes) > 1:
            mean /= len(resizes)
        best = np.argmax(mean, axis=-1)
        best_probability = np.take_along_axis(mean, best[..., np.newaxis], axis=-1)[..., 0]
        return top, bottom, best, best_probability, mean if probabilities is not None else None

    class_ids = np.empty((height, width), dtype=np.uint8)
    best_probabilities = np.empty((height, width), dtype=np.float32)
    with threadpool_limits(limits=BLAS_THREADS_PER_BAND, user_api="blas"):
        for top, bottom, best, best_probability, mean in utils.in_order(band, range(0, height, rows), threads):
            class_ids[top:bottom] = best
            best_probabilities[top:bottom] = best_probability
            if mean is not None:
                probabilities[top:bottom] = mean
    return class_ids, best_probabilities


def mode_description(sliding, multi_scale):
    """The protocol of a call, as the command line names it."""
    if multi_scale:
        return "the multi-scale mode (-ms)"
    if sliding:
        return "the sliding-window mode (-s)"
    return "the default mode"


def out_of_memory_message(height, width, sliding, multi_scale):
    """What OutOfMemory says: the image, the protocol, and what needs less memory."""
    if multi_scale:
        advice = "try it without -ms (single scale), or a smaller image"
    elif sliding:
        advice = "try the default mode (without -s), or a smaller image"
    else:
        advice = "try a smaller image"
    mode = mode_description(sliding, multi_scale)
    return f"not enough memory to segment a {width}x{height} image in {mode}: {advice}"


def batches(items, size):
    """Lists of `size` consecutive items of an iterable, the last one shorter when they run out."""
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


class Window(typing.NamedTuple):
    """One crop of a scaled image: the float32 (crop, crop, 3) network input whose top-left (rows,
    columns) pixels are the image's at (top, left), for the ScaleMap `target`."""

    crop: np.ndarray
    top: int
    left: int
    rows: int
    columns: int
    target: object


class ScaleMap:
    """The probabilities of an image at one scale: the mean of its overlapping crops' probabilities at
    every pixel, summed as the crops come, so that one crop's probabilities are held at a time."""

    def start(self, height, width, crops):
        """Prepares the map of a (height, width) scaled image covered by `crops` crops."""
        self.height, self.width, self.crops = height, width, crops
        self.total = self.count = None

    def add(self, window, probabilities):
        """Adds the probabilities of one Window."""
        if self.crops == 1:
            self.total = probabilities
            return
        if self.total is None:
            self.total = np.zeros((self.height, self.width, probabilities.shape[-1]), dtype=np.float32)
            self.count = np.zeros((self.height, self.width, 1), dtype=np.float32)
        rows = slice(window.top, window.top + window.rows)
        columns = slice(window.left, window.left + window.columns)
        self.total[rows, columns] += probabilities
        self.count[rows, columns] += 1

    def result(self):
        """The (height, width, classes) mean once every crop was added."""
        if self.crops == 1:
            return self.total
        return np.divide(self.total, self.count, out=self.total)


class Predictor:
    """Class probabilities of whole images from a network that maps crops to logits.

    `network` maps (N, crop_size, crop_size, 3) preprocessed crops to
    (N, crop_size, crop_size, classes) logits, or, with `upsampling`, to logits that
    `upsampling.upsample(logits, height, width)` brings to the first height x width
    pixels of the crop (the network's final Interp, layers_builder.split_upsampling;
    it must commute with mirroring, as the x8 Interp does). `base_size` is the longer
    side the single-scale protocol rescales images to (plus one pixel, as the
    release does). `mean_rgb` is the (R, G, B) mean the network was trained with,
    subtracted from the image; crops are padded with it.
    """

    def __init__(self, network, crop_size, base_size, upsampling=None, mean_rgb=RELEASE_MEAN_RGB):
        self.upsampling = upsampling
        self.crop_size = crop_size
        self.base_size = base_size
        self.mean_rgb = tuple(mean_rgb)
        self.stride = math.ceil(crop_size * STRIDE_RATE)
        self.network = network
        self._batch_networks = {}
        self._probabilities = backend.compile_sized(self.probabilities_of_logits)
        self._mirrored_probabilities = backend.compile_sized(self.probabilities_of_mirrored_logits)

    def probabilities_of_logits(self, logits, height, width):
        """The (height, width, classes) softmax of a crop's (1, h, w, classes) logits, upsampled to the
        crop by the network's final Interp where it is split off, over the top-left part of the crop."""
        if self.upsampling is None:
            logits = logits[:, :height, :width]
        else:
            logits = self.upsampling.upsample(logits, height, width)
        return ops.softmax(logits[0], axis=-1)

    def probabilities_of_mirrored_logits(self, logits, mirrored_logits, height, width):
        """probabilities_of_logits of a crop's logits plus the mirrored logits of its mirror image, added
        before the upsampling, which commutes with mirroring."""
        return self.probabilities_of_logits(logits + ops.flip(mirrored_logits, axis=2), height, width)

    def batch_network(self, batch_size):
        """The compiled network for batches of `batch_size` crops, compiled on first use."""
        if batch_size not in self._batch_networks:
            shape = (batch_size, self.crop_size, self.crop_size, 3)
            self._batch_networks[batch_size] = backend.compile_network(self.network, shape)
        return self._batch_networks[batch_size]

    def window_probabilities(self, windows, flip, batch_size=1):
        """(window, probabilities) for each Window, in order: the (rows, columns, classes) NumPy
        probabilities of the top-left part of its crop.

        The crops go through the network `batch_size` at a time (a short last batch is
        filled with zero crops, whose results are dropped). With `flip`, the mirrored
        crops of a batch are a second call of the same compiled network: on the CPU one
        batch of two costs more than two calls (bench/README.md).
        """
        network = self.batch_network(batch_size)
        size = self.crop_size
        for group in batches(windows, batch_size):
            crops = np.zeros((batch_size, size, size, 3), dtype=np.float32)
            for index, window in enumerate(group):
                crops[index] = window.crop
            logits = network(crops)
            mirrored_logits = network(np.ascontiguousarray(crops[:, :, ::-1])) if flip else None
            for index, window in enumerate(group):
                crop_logits = logits[index : index + 1]
                if flip:
                    probabilities = self._mirrored_probabilities(
                        crop_logits, mirrored_logits[index : index + 1], height=window.rows, width=window.columns
                    )
                else:
                    probabilities = self._probabilities(crop_logits, height=window.rows, width=window.columns)
                yield window, backend.to_numpy(probabilities)

    def crop_function(self, flip):
        """The (crop, height, width) -> probabilities function of one crop at a time, with or without the
        mirror: window_probabilities of a single window, the (height, width, classes) NumPy probabilities
        of the top-left part of the crop."""

        def crop_probabilities(crop, height, width):
            ((_, probabilities),) = self.window_probabilities([Window(crop, 0, 0, height, width, None)], flip)
            return probabilities

        return crop_probabilities

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

    def windows(self, image, long_side, target):
        """The Windows of an image at the protocol scale with this longer side, each crop preprocessed and
        padded with the mean colour, for the ScaleMap `target` (made for the scaled image)."""
        scaled = resize_image(image, *scaled_size(image.shape[0], image.shape[1], long_side))
        height, width = scaled.shape[:2]
        size = self.crop_size
        data = np.zeros((max(height, size), max(width, size), 3), dtype=np.float32)
        data[:height, :width] = preprocess(scaled, self.mean_rgb)
        grid = self.crop_grid(height, width)
        target.start(height, width, len(grid))
        for top, left in grid:
            crop = data[top : top + size, left : left + size]
            yield Window(crop, top, left, min(size, height - top), min(size, width - left), target)

    def image_maps(self, images, sliding=False, flip=True, multi_scale=False, progress=None, batch_size=1):
        """The averaged crop probabilities of each image at each scale of the protocol, each a float32
        (h, w, classes) array at its scale's size: [[map of each scale] for each image].

        The crops of all the images go through the network `batch_size` at a time
        (window_probabilities). Each scale's image is made when its first crop is
        needed, and its overlapping crops are summed into its map as they come.
        `progress` is called with the number of forward passes after each crop.
        """
        progress = progress or (lambda passes: None)
        long_sides = self.long_sides(sliding, multi_scale)
        maps = [[ScaleMap() for _ in long_sides] for _ in images]

        def all_windows():
            for image, image_maps in zip(images, maps):
                for long_side, target in zip(long_sides, image_maps):
                    yield from self.windows(image, long_side, target)

        for window, probabilities in self.window_probabilities(all_windows(), flip, batch_size):
            window.target.add(window, probabilities)
            progress(2 if flip else 1)
        return [[scale_map.result() for scale_map in image_maps] for image_maps in maps]

    def scale_maps(self, image, sliding, flip, multi_scale, progress):
        """The averaged crop probabilities at each scale of the protocol, each at its scale's size."""
        return self.image_maps([image], sliding, flip, multi_scale, progress)[0]

    def best_classes(self, maps, height, width, probabilities=None):
        """The best class (uint8) and its probability (float32) at every pixel of the mean of the scale
        `maps` of an image resized to (height, width); `probabilities`, unless None, receives that mean."""
        return average_of_resized(maps, height, width, probabilities, BAND_BYTES, BAND_THREADS)

    @contextlib.contextmanager
    def out_of_memory_as_error(self, image, sliding, multi_scale):
        """Raises OutOfMemory, saying what to try, where the backend or NumPy runs out of memory."""
        try:
            yield
        except Exception as error:
            if not backend.is_out_of_memory(error):
                raise
            height, width = image.shape[:2]
            raise OutOfMemory(out_of_memory_message(height, width, sliding, multi_scale)) from error

    def class_map(self, image, sliding=False, flip=True, multi_scale=False, progress=None, probabilities=None):
        """The best class and its probability at every pixel of a uint8 RGB image.

        Returns (class ids, uint8 (H, W); their probabilities, float32 (H, W)): the
        argmax (first of equals) and max over the classes of what `predict` returns,
        without ever holding that (H, W, classes) map. `probabilities`, an array-like
        of shape (H, W, classes) such as a memory-mapped .npy, receives that map band
        by band. The options are `predict`'s. Raises OutOfMemory when memory runs out.
        """
        height, width = image.shape[:2]
        if probabilities is not None and tuple(probabilities.shape[:2]) != (height, width):
            raise ValueError(f"probabilities has shape {probabilities.shape}, not ({height}, {width}, classes)")
        with self.out_of_memory_as_error(image, sliding, multi_scale):
            maps = self.scale_maps(image, sliding, flip, multi_scale, progress or (lambda passes: None))
            classes = maps[0].shape[-1]
            if probabilities is not None and tuple(probabilities.shape) != (height, width, classes):
                raise ValueError(f"probabilities has shape {probabilities.shape}, not {(height, width, classes)}")
            return self.best_classes(maps, height, width, probabilities)

    def predict(self, image, sliding=False, flip=True, multi_scale=False, progress=None):
        """The (H, W, classes) float32 class probabilities of a uint8 RGB image.

        Default: one crop, the image scaled so its longer side is the crop size.
        `sliding`: the single-scale protocol, longer side base_size + 1, sliding crops.
        `multi_scale`: the sliding protocol at 0.5 to 1.75 of base_size, averaged.
        `flip`: each crop's logits plus the mirrored logits of its mirror image.
        `progress` is called with the number of forward passes after each crop.
        Raises OutOfMemory when memory runs out.
        """
        height, width = image.shape[:2]
        with self.out_of_memory_as_error(image, sliding, multi_scale):
            maps = self.scale_maps(image, sliding, flip, multi_scale, progress or (lambda passes: None))
            probabilities = np.empty((height, width, maps[0].shape[-1]), dtype=np.float32)
            self.best_classes(maps, height, width, probabilities)
        return probabilities
