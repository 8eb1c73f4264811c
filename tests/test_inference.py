"""Tests of inference.Predictor against the Caffe release's MATLAB evaluation protocol.

The reference below is a straightforward re-implementation, written from sections D and E of
the PSPNet reference facts, of evaluation/eval_sub.m, scale_process.m, pre_img.m and
caffe_process.m: MATLAB's 1-based window loops, padding with the mean colour, softmax of the
logits of a crop plus the mirrored logits of its mirror image, overlaps averaged by a count map,
MATLAB imresize 'bilinear' (written out here in numpy) back to the image size, renormalisation
and the mean over scales. The default mode (one crop, longer side = crop size) is the same
protocol at the single long side crop_size.

The tests run on every Keras backend (tests/test_backends.py runs this file on JAX and PyTorch).
The network is a stand-in: logits = a fixed random 3x3 convolution ('same', zero padded) of the
crop plus a fixed random term per crop position, so the logits depend on the neighbourhood, the
channel order and the position in the crop, and are not mirror-symmetric. With the convolution
weights at zero (`position_network`) the logits ignore the image, so the image resize cannot
matter and the rest of the protocol (windows, flip, count map, probability resize,
renormalisation, scales) is compared tightly even where the image is resized.

The image-sized result is made in bands of output rows (inference.average_of_resized). Besides
the protocol reference, it is compared with the whole map resized at once, summed over scales and
reduced by argmax/max, as a straightforward full-map implementation does (`whole_map_reference`):
within BAND_TOLERANCE (float32 rounding of a different summation order), the same class wherever
the best two classes of the reference are further apart than that.

Tolerances:
- EXACT (1e-5) wherever the image is not resized, and for everything the image-independent
  network computes: float32 network and backend arithmetic against this float64 reference.
- One grey level in the crops the network receives where the image is resized. MATLAB rounds a
  uint8 image to uint8 after each of its two 1-D passes (the more shrunk dimension first); another
  library's uint8 resize (Pillow: fixed-point weights, horizontal pass first, rounding in between)
  lands one grey level off at up to a fifth of the values. That is inherent; more is not.
- End to end with a resized image and the image-dependent network: the bound that one grey level
  in every input pixel implies for the stand-in (StandInNetwork.one_grey_level_bound, ~0.2), so
  only gross departures show there; the crops themselves are checked to one grey level.
"""

import math

import keras
import numpy as np
import pytest
from keras import ops
from PIL import Image

from pspnet_keras import inference

CROP_SIZE = 33
BASE_SIZE = 64
CLASSES = 5
DATA_MEAN_RGB = np.array([123.68, 116.779, 103.939])
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
EXACT = 1e-5
SUM_TOLERANCE = 1e-5
BAND_TOLERANCE = 1e-6
BATCH_TOLERANCE = 5e-4
FLOAT32_BYTES = 4


def call_at_every_run(function, tensor):
    """Calls function(tensor as NumPy) each time the compiled computation runs, not only while it is
    traced: through tf.py_function (TensorFlow), jax.debug.callback (JAX), or at once (PyTorch, eager)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.py_function(lambda value: function(value.numpy()) or [], [tensor], [])
    elif backend == "jax":
        import jax

        jax.debug.callback(lambda value: function(np.asarray(value)), tensor, ordered=True)
    else:
        function(ops.convert_to_numpy(tensor))


class StandInNetwork:
    """Logits of a fixed random 3x3 convolution ('same') plus a fixed random term per position.

    Called by the Predictor on (N, crop, crop, 3) float32 batches inside the backend's compiled
    function; it keeps every batch it receives in `batches` (call_at_every_run). `logits` is the
    same function in float64 numpy, for the reference.
    """

    def __init__(self, crop_size, convolution_scale, seed):
        rng = np.random.default_rng(seed)
        self.kernel = rng.normal(0.0, convolution_scale, (3, 3, 3, CLASSES))
        self.position = rng.normal(0.0, 1.0, (crop_size, crop_size, CLASSES))
        self.batches = []

    def __call__(self, batch, training=False):
        call_at_every_run(self.batches.append, batch)
        kernel = ops.convert_to_tensor(self.kernel, dtype="float32")
        convolved = ops.conv(batch, kernel, strides=1, padding="same")
        return convolved + ops.convert_to_tensor(self.position, dtype="float32")

    def logits(self, crop):
        """The (crop, crop, CLASSES) logits of one preprocessed crop, in float64."""
        size = crop.shape[0]
        padded = np.pad(crop.astype(np.float64), ((1, 1), (1, 1), (0, 0)))
        result = self.position.copy()
        for dy in range(3):
            for dx in range(3):
                result += padded[dy:dy + size, dx:dx + size] @ self.kernel[dy, dx]
        return result

    def one_grey_level_bound(self, flip):
        """An upper bound on how far any output probability can move when every input pixel
        moves by at most one grey level: each logit moves by at most the L1 norm of its kernel
        per pass, a softmax output by at most a quarter of the range of the logit changes
        (|dp_i| <= p_i (1 - p_i) range(dz)), and the averages and resizes after it are convex."""
        passes = 2 if flip else 1
        return passes * np.abs(self.kernel).sum(axis=(0, 1, 2)).max() / 2


def make_image(height, width, seed=0):
    """A uint8 RGB noise image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# The reference: MATLAB's evaluation protocol, written out.


def triangle(distance):
    """The bilinear kernel of MATLAB's imresize: 1 - |d| on [-1, 1], 0 elsewhere."""
    return np.maximum(1.0 - np.abs(distance), 0.0)


def imresize_matrix(in_length, out_length):
    """The (out_length, in_length) matrix of MATLAB imresize 'bilinear' along one dimension.

    1-based output coordinate x samples the input at u = x/scale + 0.5*(1 - 1/scale); when
    shrinking the triangle is stretched by 1/scale (antialiasing); weights are normalised to
    sum 1 and indices outside 1..in_length are mirrored back (MATLAB's [1:n, n:-1:1]).
    """
    scale = out_length / in_length
    stretch = min(scale, 1.0)
    kernel_width = 2.0 / stretch
    taps = math.ceil(kernel_width) + 2
    mirror = list(range(1, in_length + 1)) + list(range(in_length, 0, -1))
    matrix = np.zeros((out_length, in_length))
    for x in range(1, out_length + 1):
        u = x / scale + 0.5 * (1 - 1 / scale)
        left = math.floor(u - kernel_width / 2)
        indices = np.arange(left, left + taps)
        weights = stretch * triangle(stretch * (u - indices))
        weights = weights / weights.sum()
        for index, weight in zip(indices, weights):
            source = mirror[(index - 1) % len(mirror)]
            matrix[x - 1, source - 1] += weight
    return matrix


def imresize(array, rows, cols):
    """MATLAB imresize(array, [rows cols], 'bilinear') of an (H, W, C) uint8 or float array.

    One 1-D pass per dimension, the more shrunk dimension first; a uint8 image is rounded
    (half away from zero) and saturated to uint8 after each pass, as MATLAB does.
    """
    result = array.astype(np.float64)
    scales = (rows / array.shape[0], cols / array.shape[1])
    for axis in np.argsort(scales, kind="stable"):
        matrix = imresize_matrix(result.shape[axis], (rows, cols)[axis])
        result = np.moveaxis(np.tensordot(matrix, np.moveaxis(result, axis, 0), axes=1), 0, axis)
        if array.dtype == np.uint8:
            result = np.clip(np.floor(result + 0.5), 0, 255)
    return result.astype(np.uint8) if array.dtype == np.uint8 else result


def matlab_scaled_size(ori_rows, ori_cols, long_size):
    """eval_sub.m: new size with the longer side long_size, the other side
    round(long_size / single(ori_long) * ori_short), computed in single precision."""
    short = np.float32(long_size) / np.float32(max(ori_rows, ori_cols)) * np.float32(min(ori_rows, ori_cols))
    short = int(np.floor(np.float64(short) + 0.5))
    if ori_rows > ori_cols:
        return long_size, short
    return short, long_size


def pad_with_mean(image, crop_size):
    """pre_img.m / scale_process.m: the image (as float) padded bottom/right with the mean colour
    up to crop_size in each side that is shorter, so the padding is 0 after mean subtraction.

    (scale_process.m pads the uint8 image with padarray, which keeps uint8, so in the sliding
    branch the release's padding is (124, 117, 104); this project pads with the mean colour in
    every branch, so that the padding is 0 after the subtraction, and so does this reference.)
    """
    rows, cols = image.shape[:2]
    padded = np.empty((max(rows, crop_size), max(cols, crop_size), 3))
    padded[...] = DATA_MEAN_RGB
    padded[:rows, :cols] = image
    return padded


def to_network_input(crop):
    """pre_img.m: mean subtracted, RGB -> BGR."""
    return (crop - DATA_MEAN_RGB)[..., ::-1]


def caffe_process(network, crop, flip):
    """caffe_process.m: softmax over classes of logits(crop) + mirror(logits(mirror(crop)))."""
    scores = network.logits(crop)
    if flip:
        scores = scores + network.logits(crop[:, ::-1])[:, ::-1]
    scores = np.exp(scores)
    return scores / scores.sum(axis=2, keepdims=True)


def sliding_windows(pad_rows, pad_cols, crop_size):
    """scale_process.m's grid as 0-based (top, left): 1-based s = (i-1)*stride + 1,
    e = min(s + crop - 1, pad), s = e - crop + 1, with stride = ceil(crop * 2/3)."""
    stride = math.ceil(crop_size * (2 / 3))
    h_grid = math.ceil((pad_rows - crop_size) / stride) + 1
    w_grid = math.ceil((pad_cols - crop_size) / stride) + 1
    windows = []
    for grid_yidx in range(1, h_grid + 1):
        for grid_xidx in range(1, w_grid + 1):
            s_x = (grid_xidx - 1) * stride + 1
            s_y = (grid_yidx - 1) * stride + 1
            e_x = min(s_x + crop_size - 1, pad_cols)
            e_y = min(s_y + crop_size - 1, pad_rows)
            s_x = e_x - crop_size + 1
            s_y = e_y - crop_size + 1
            windows.append((s_y - 1, s_x - 1))
    return windows


def scale_windows(new_rows, new_cols, crop_size):
    """The crop windows scale_process.m evaluates for an image scaled to (new_rows, new_cols)."""
    if max(new_rows, new_cols) <= crop_size:
        return [(0, 0)]
    return sliding_windows(max(new_rows, crop_size), max(new_cols, crop_size), crop_size)


def scale_crops(img_scale, crop_size):
    """The (window, network input) pairs of scale_process.m for one scaled uint8 image."""
    img_pad = to_network_input(pad_with_mean(img_scale.astype(np.float64), crop_size))
    crops = []
    for top, left in scale_windows(*img_scale.shape[:2], crop_size):
        window = (slice(top, top + crop_size), slice(left, left + crop_size))
        crops.append((window, img_pad[window]))
    return crops


def scale_process(network, img_scale, ori_rows, ori_cols, crop_size, flip):
    """scale_process.m: averaged crop probabilities of the scaled image, cropped to it, resized to
    (ori_rows, ori_cols) and renormalised."""
    new_rows, new_cols = img_scale.shape[:2]
    pad_shape = (max(new_rows, crop_size), max(new_cols, crop_size))
    data_scale = np.zeros(pad_shape + (CLASSES,))
    count_scale = np.zeros(pad_shape + (1,))
    for window, crop in scale_crops(img_scale, crop_size):
        data_scale[window] += caffe_process(network, crop, flip)
        count_scale[window] += 1
    score = (data_scale / count_scale)[:new_rows, :new_cols]
    data_output = imresize(score, ori_rows, ori_cols)
    return data_output / data_output.sum(axis=2, keepdims=True)


def protocol_long_sizes(crop_size, base_size, sliding, multi_scale):
    """eval_sub.m's longer side at each scale: crop_size (default mode), base_size + 1 (sliding)
    or base_size * scale + 1 for each multi-scale scale."""
    if multi_scale:
        return [int(base_size * scale + 1) for scale in MULTI_SCALES]
    if sliding:
        return [base_size + 1]
    return [crop_size]


def scaled_images(image, crop_size, base_size, sliding, multi_scale):
    """eval_sub.m's image at each scale, resized by imresize."""
    return [
        imresize(image, *matlab_scaled_size(*image.shape[:2], long_size))
        for long_size in protocol_long_sizes(crop_size, base_size, sliding, multi_scale)
    ]


def eval_sub(network, image, crop_size, base_size, sliding=False, flip=True, multi_scale=False):
    """eval_sub.m: the image's class probabilities, averaged over the protocol's scales."""
    ori_rows, ori_cols = image.shape[:2]
    images = scaled_images(image, crop_size, base_size, sliding, multi_scale)
    data_all = np.zeros((ori_rows, ori_cols, CLASSES))
    for img_scale in images:
        data_all += scale_process(network, img_scale, ori_rows, ori_cols, crop_size, flip)
    return data_all / len(images)


def protocol_crops(image, crop_size, base_size, sliding=False, multi_scale=False):
    """Every network input (before mirroring) of the protocol, in eval_sub.m's order."""
    return [
        crop
        for img_scale in scaled_images(image, crop_size, base_size, sliding, multi_scale)
        for _, crop in scale_crops(img_scale, crop_size)
    ]


def protocol_forward_passes(shape, crop_size, base_size, sliding, flip, multi_scale):
    """How many crops the protocol sends through the network (two per window with flip)."""
    windows = 0
    for long_size in protocol_long_sizes(crop_size, base_size, sliding, multi_scale):
        windows += len(scale_windows(*matlab_scaled_size(*shape, long_size), crop_size))
    return windows * (2 if flip else 1)


# ---------------------------------------------------------------------------------------------
# Fixtures and helpers.


@pytest.fixture(scope="module")
def image_network():
    return StandInNetwork(CROP_SIZE, convolution_scale=0.01, seed=1)


@pytest.fixture(scope="module")
def position_network():
    return StandInNetwork(CROP_SIZE, convolution_scale=0.0, seed=2)


@pytest.fixture(scope="module")
def predictors():
    """One Predictor per (network, base_size), so each compiles its crop function once."""
    cache = {}

    def get(network, base_size=BASE_SIZE):
        key = (id(network), base_size)
        if key not in cache:
            cache[key] = inference.Predictor(network, CROP_SIZE, base_size)
        return cache[key]

    return get


def assert_close(actual, expected, tolerance):
    """Asserts |actual - expected| <= tolerance, naming the worst pixel."""
    assert actual.shape == expected.shape
    error = np.abs(actual.astype(np.float64) - expected)
    row, col, channel = np.unravel_index(np.argmax(error), error.shape)
    assert error.max() <= tolerance, (
        f"max |difference| {error.max():.3g} at row {row}, col {col}, channel {channel} "
        f"of {actual.shape[:2]} (tolerance {tolerance:g})"
    )


MODES = {
    "default": dict(sliding=False, multi_scale=False),
    "sliding": dict(sliding=True, multi_scale=False),
    "multi_scale": dict(sliding=False, multi_scale=True),
}


# ---------------------------------------------------------------------------------------------
# Crop-sized images: no resize at all.


def test_crop_sized_image_without_flip_is_softmax_of_the_logits(image_network, predictors):
    image = make_image(CROP_SIZE, CROP_SIZE, seed=3)
    data = (image.astype(np.float64) - DATA_MEAN_RGB)[..., ::-1]
    logits = image_network.logits(data)
    expected = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)

    probabilities = predictors(image_network).predict(image, flip=False)

    assert probabilities.dtype == np.float32
    assert_close(probabilities, expected, EXACT)


def test_flip_is_softmax_of_summed_logits_not_mean_of_probabilities(image_network, predictors):
    image = make_image(CROP_SIZE, CROP_SIZE, seed=4)
    data = (image.astype(np.float64) - DATA_MEAN_RGB)[..., ::-1]
    logits = image_network.logits(data)
    mirrored_logits = image_network.logits(data[:, ::-1])[:, ::-1]
    summed = np.exp(logits + mirrored_logits)
    logit_sum = summed / summed.sum(axis=2, keepdims=True)
    probability_mean = (
        np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
        + np.exp(mirrored_logits) / np.exp(mirrored_logits).sum(axis=2, keepdims=True)
    ) / 2

    probabilities = predictors(image_network).predict(image, flip=True)

    assert np.abs(logit_sum - probability_mean).max() > 0.1
    assert_close(probabilities, logit_sum, EXACT)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("shape", [(33, 20), (20, 33), (33, 1), (1, 33), (33, 32)])
def test_single_crop_pads_with_the_mean_colour(image_network, predictors, shape, flip):
    """Longer side = crop: no resize; the rest of the crop is the mean colour (0 after
    subtraction), which the network's 3x3 convolution sees along the image's edge."""
    image = make_image(*shape, seed=5)
    expected = eval_sub(image_network, image, CROP_SIZE, BASE_SIZE, flip=flip)

    probabilities = predictors(image_network).predict(image, flip=flip)

    assert_close(probabilities, expected, EXACT)


# ---------------------------------------------------------------------------------------------
# Sliding windows on images already at the scaled size (longer side base_size + 1).


@pytest.mark.parametrize(
    "base_size, shape, flip",
    [
        (64, (65, 48), True),  # 2 x 3 windows, last row and column flush
        (64, (48, 65), True),
        (64, (65, 65), False),
        (64, (65, 20), True),  # rows padded with the mean colour to the crop
        (64, (20, 65), False),
        (96, (97, 60), True),  # 4 x 3 windows
        (96, (60, 97), True),
    ],
)
def test_sliding_windows_match_the_protocol(image_network, predictors, base_size, shape, flip):
    image = make_image(*shape, seed=6)
    expected = eval_sub(image_network, image, CROP_SIZE, base_size, sliding=True, flip=flip)

    probabilities = predictors(image_network, base_size).predict(image, sliding=True, flip=flip)

    assert_close(probabilities, expected, EXACT)


def test_reference_grid_is_the_matlab_loop():
    """Windows at stride ceil(2/3 * 33) = 22 from 1-based starts 1, 23, 45, ...; the last one
    moved back to end flush with the padded image."""
    assert sliding_windows(65, 48, 33) == [(0, 0), (0, 15), (22, 0), (22, 15), (32, 0), (32, 15)]
    assert [left for _, left in sliding_windows(33, 97, 33)] == [0, 22, 44, 64]


@pytest.mark.parametrize(
    "crop_size, base_size, shape, windows",
    [
        (713, 2048, (1024, 2048), 8),  # cityscapes: 1025 x 2049 -> 2 x 4 crops
        (473, 512, (480, 640), 2),  # ADE20K 4:3: 385 x 513 -> 1 x 2 crops
        (473, 512, (640, 480), 2),
    ],
)
def test_window_counts_of_the_spec_examples(crop_size, base_size, shape, windows):
    predictor = inference.Predictor(None, crop_size, base_size)

    assert protocol_forward_passes(shape, crop_size, base_size, True, False, False) == windows
    assert predictor.forward_count(*shape, sliding=True, flip=False) == windows
    assert predictor.forward_count(*shape, sliding=True, flip=True) == 2 * windows


# ---------------------------------------------------------------------------------------------
# Resizes. With the image-independent network only the probability resize matters.


@pytest.mark.parametrize(
    "mode, shape",
    [
        ("default", (50, 70)),  # probabilities enlarged 24x33 -> 50x70
        ("default", (70, 50)),
        ("default", (41, 99)),
        ("sliding", (150, 100)),  # 65x43 -> 150x100
        ("sliding", (100, 151)),
        ("default", (20, 27)),  # probabilities shrunk 24x33 -> 20x27 (antialiased)
        ("default", (27, 20)),
        ("sliding", (50, 40)),  # 65x52 -> 50x40
        ("multi_scale", (60, 80)),  # long sides 33..113: both enlarged and shrunk
        ("multi_scale", (81, 55)),
    ],
)
def test_probability_maps_are_resized_like_imresize(position_network, predictors, mode, shape):
    image = make_image(*shape, seed=7)
    expected = eval_sub(position_network, image, CROP_SIZE, BASE_SIZE, flip=True, **MODES[mode])

    probabilities = predictors(position_network).predict(image, flip=True, **MODES[mode])

    assert_close(probabilities, expected, EXACT)


@pytest.mark.parametrize(
    "mode, shape, long_size",
    [
        ("default", (90, 75), 33),  # 33/90*75 = 27.5: single precision gives 27.5 -> 28 columns
        ("default", (75, 90), 33),
        ("sliding", (30, 27), 65),  # 65/30*27 = 58.5 -> 58.500004 -> 59 columns
    ],
)
def test_scaled_size_is_rounded_as_eval_sub_does(position_network, predictors, mode, shape, long_size):
    """eval_sub.m divides by single(ori_rows): at exact halves the single-precision quotient
    decides the rounding."""
    image = make_image(*shape, seed=8)
    assert max(matlab_scaled_size(*shape, long_size)) == long_size
    expected = eval_sub(position_network, image, CROP_SIZE, BASE_SIZE, flip=True, **MODES[mode])

    probabilities = predictors(position_network).predict(image, flip=True, **MODES[mode])

    assert_close(probabilities, expected, EXACT)


@pytest.mark.parametrize(
    "mode, shape, grey_levels",
    [
        ("default", (33, 20), 0),  # no resize: mean padding only
        ("sliding", (65, 20), 0),
        ("sliding", (48, 65), 0),
        ("default", (20, 27), 1),  # image enlarged to 24x33
        ("sliding", (40, 50), 1),  # to 52x65
        ("default", (50, 70), 1),  # image shrunk to 24x33
        ("sliding", (150, 100), 1),  # to 65x43
        ("multi_scale", (60, 80), 1),
    ],
)
def test_network_receives_the_protocols_crops(image_network, predictors, mode, shape, grey_levels):
    """Every crop is MATLAB's: the imresize'd image padded with the mean colour, mean subtracted,
    BGR, taken in eval_sub.m's order (scales, then rows, then columns), each followed by its
    mirror image. Where the image is resized, one grey level of uint8 rounding is allowed."""
    image = make_image(*shape, seed=12)
    expected = protocol_crops(image, CROP_SIZE, BASE_SIZE, **MODES[mode])
    image_network.batches.clear()

    predictors(image_network).predict(image, flip=True, **MODES[mode])

    batches = image_network.batches
    assert [batch.shape for batch in batches] == [(1, CROP_SIZE, CROP_SIZE, 3)] * (2 * len(expected))
    for crop, mirrored, expected_crop in zip(batches[0::2], batches[1::2], expected):
        assert np.array_equal(mirrored[0], crop[0][:, ::-1])
        assert_close(crop[0], expected_crop, grey_levels + EXACT)


@pytest.mark.parametrize(
    "mode, shape",
    [
        ("default", (20, 27)),
        ("sliding", (40, 50)),
        ("default", (50, 70)),
        ("sliding", (150, 100)),
        ("multi_scale", (60, 80)),
    ],
)
def test_resized_images_match_the_protocol(image_network, predictors, mode, shape):
    """End to end with an image-dependent network; the crops may be one grey level off."""
    image = make_image(*shape, seed=9)
    expected = eval_sub(image_network, image, CROP_SIZE, BASE_SIZE, flip=True, **MODES[mode])

    probabilities = predictors(image_network).predict(image, flip=True, **MODES[mode])

    assert_close(probabilities, expected, image_network.one_grey_level_bound(flip=True))


# ---------------------------------------------------------------------------------------------
# Forward passes, progress, and the form of the output for awkward shapes.

SHAPES = [(33, 33), (65, 48), (48, 65), (97, 61), (61, 97), (31, 17), (17, 31), (1, 33), (33, 1), (1, 1)]


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_count_is_what_the_network_receives(image_network, predictors, shape, mode, flip):
    predictor = predictors(image_network)
    progress_steps = []
    image_network.batches.clear()

    predictor.predict(make_image(*shape, seed=10), flip=flip, progress=progress_steps.append, **MODES[mode])

    received = sum(len(batch) for batch in image_network.batches)
    expected = protocol_forward_passes(shape, CROP_SIZE, BASE_SIZE, flip=flip, **MODES[mode])
    assert received == expected
    assert predictor.forward_count(*shape, flip=flip, **MODES[mode]) == expected
    assert sum(progress_steps) == expected
    assert all(step == (2 if flip else 1) for step in progress_steps)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize(
    "shape", SHAPES + [(1, 2), (2, 1), (3, 200), (1, 67), (1, 200), (200, 1), (7, 300)]
)
def test_every_pixel_is_a_distribution_over_the_classes(image_network, predictors, shape, mode):
    probabilities = predictors(image_network).predict(make_image(*shape, seed=11), **MODES[mode])

    assert probabilities.shape == shape + (CLASSES,)
    assert probabilities.dtype == np.float32
    assert np.all(probabilities >= 0)
    assert_close(probabilities.sum(axis=2, keepdims=True), np.ones(shape + (1,)), SUM_TOLERANCE)


# ---------------------------------------------------------------------------------------------
# The network's own upsampling, applied to the needed part of each crop only.


@pytest.fixture(scope="module")
def small_pspnet():
    """PSPNet-50 at input size 89 with seeded random weights (BN statistics spread out)."""
    from layers_builder import build_pspnet

    model = build_pspnet("pspnet50_ade20k", 89)
    rng = np.random.default_rng(5)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([
                (np.abs(rng.normal(1.0, 0.2, weight.shape)) if weight.ndim == 1
                 else rng.normal(0.0, 1.0, weight.shape) / np.sqrt(np.prod(weight.shape[:-1]))).astype(np.float32)
                for weight in layer.get_weights()
            ])
    return model


@pytest.mark.parametrize("mode, flip", [("default", False), ("default", True), ("sliding", True), ("multi_scale", True)])
def test_upsampling_only_the_needed_part_gives_what_the_whole_network_gives(small_pspnet, mode, flip):
    """Predictor on conv6 + the x8 Interp (valid part of each crop, mirrored logits added before
    it) against Predictor on the whole network's crop-size logits."""
    from layers_builder import split_upsampling

    logits, upsampling = split_upsampling(small_pspnet)
    whole = inference.Predictor(small_pspnet, 89, 96)
    split = inference.Predictor(logits, 89, 96, upsampling)
    image = make_image(45, 100, seed=4)
    expected = whole.predict(image, flip=flip, **MODES[mode])
    assert_close(split.predict(image, flip=flip, **MODES[mode]), expected, EXACT)
    assert expected.std() > 1e-3


# ---------------------------------------------------------------------------------------------
# The image-sized result in bands, against the whole map resized at once.


def whole_map_resized(probabilities, height, width):
    """A (h, w, classes) float32 map resized whole to (height, width) with the weights of
    inference.resize_weights (checked against ScaleAndTranslate in test_resize_weights.py) on the whole
    map padded with a mirrored border of ceil(in / out) + 2 pixels, summed in float64."""
    in_height, in_width = probabilities.shape[:2]
    if (in_height, in_width) == (height, width):
        return probabilities
    rows, columns = math.ceil(in_height / height) + 2, math.ceil(in_width / width) + 2
    padded = np.pad(probabilities.astype(np.float64), ((rows, rows), (columns, columns), (0, 0)), mode="symmetric")
    row_weights = inference.resize_weights(in_height, height, rows).astype(np.float64)
    column_weights = inference.resize_weights(in_width, width, columns).astype(np.float64)
    resized = np.einsum("yi,xj,ijc->yxc", row_weights, column_weights, padded, optimize=True)
    return resized.astype(np.float32)


def whole_map_reference(maps, height, width):
    """The mean of `maps` each resized whole to (height, width), in float32 as the bands are."""
    total = whole_map_resized(maps[0], height, width)
    for scale_map in maps[1:]:
        total = total + whole_map_resized(scale_map, height, width)
    if len(maps) > 1:
        total = total / np.float32(len(maps))
    return total


def random_maps(shapes, classes, seed):
    """Probability maps of the given (h, w) shapes: softmax of normal logits, float32."""
    rng = np.random.default_rng(seed)
    maps = []
    for shape in shapes:
        logits = rng.normal(0.0, 2.0, shape + (classes,))
        exponentials = np.exp(logits - logits.max(axis=2, keepdims=True))
        maps.append((exponentials / exponentials.sum(axis=2, keepdims=True)).astype(np.float32))
    return maps


def assert_best_classes(class_ids, best, reference):
    """class_ids and best are the argmax and max of the (H, W, classes) reference map: the same class
    wherever its best two classes are more than BAND_TOLERANCE apart (elsewhere rounding may pick
    either), and the best probability within BAND_TOLERANCE everywhere."""
    assert class_ids.dtype == np.uint8 and best.dtype == np.float32
    assert class_ids.shape == best.shape == reference.shape[:2]
    ranked = np.sort(reference, axis=2)
    clear = ranked[..., -1] - ranked[..., -2] > BAND_TOLERANCE
    wrong = clear & (class_ids != reference.argmax(axis=2))
    assert not wrong.any(), f"{wrong.sum()} pixels of {wrong.size} have another class, first at {np.argwhere(wrong)[0]}"
    assert clear.mean() > 0.99
    assert_close(best[..., np.newaxis], reference.max(axis=2, keepdims=True), BAND_TOLERANCE)


@pytest.mark.parametrize(
    "shapes, classes, size, band_rows",
    [
        ([(25, 33)], 5, (1225, 1633), 29),  # 2 MP, enlarged 49x; bands end between input rows
        ([(33, 25)], 5, (1633, 1225), 17),
        ([(60, 80)], 150, (301, 401), 7),  # as many classes as ADE20K
        ([(65, 52)], 5, (50, 40), 3),  # shrunk: the kernel is widened
        ([(97, 61)], 5, (20, 13), 1),  # shrunk ~5x: each output row reaches ~10 input rows
        ([(20, 90)], 5, (100, 30), 8),  # rows enlarged, columns shrunk
        ([(90, 20)], 5, (30, 100), 4),
        ([(17, 33), (25, 49), (33, 65), (41, 81), (49, 97), (57, 113)], 7, (45, 88), 4),  # both, averaged
        ([(30, 40), (20, 27)], 4, (30, 40), 7),  # one map already at the image size
        ([(1, 33)], 5, (1, 200), 1),
        ([(33, 1)], 5, (200, 3), 16),
        ([(24, 33)], 5, (20, 27), inference.MAX_BAND_ROWS),  # one band taller than the image
    ],
)
def test_bands_equal_the_whole_map_resized(shapes, classes, size, band_rows):
    height, width = size
    maps = random_maps(shapes, classes, seed=17)
    reference = whole_map_reference(maps, height, width)
    probabilities = np.full(size + (classes,), np.nan, dtype=np.float32)
    band_bytes = band_rows * width * classes * FLOAT32_BYTES

    class_ids, best = inference.average_of_resized(maps, height, width, probabilities, band_bytes, threads=2)

    assert inference.band_height(width, classes, band_bytes) == band_rows
    assert_best_classes(class_ids, best, reference)
    assert_close(probabilities, reference, BAND_TOLERANCE)


def test_bands_do_not_depend_on_the_threads():
    maps = random_maps([(17, 33), (33, 65)], 6, seed=18)
    band_bytes = 5 * 300 * 6 * FLOAT32_BYTES

    one = inference.average_of_resized(maps, 200, 300, None, band_bytes, threads=1)
    four = inference.average_of_resized(maps, 200, 300, None, band_bytes, threads=4)

    assert np.array_equal(one[0], four[0]) and np.array_equal(one[1], four[1])


def test_bands_do_not_depend_on_the_threads_blas_may_take():
    """The same bytes whatever number of threads NumPy's BLAS was set to (a Ray worker's CPUs, say)."""
    from threadpoolctl import threadpool_limits

    maps = random_maps([(60, 53)], 150, seed=19)
    results = []
    for blas_threads in (1, 2):
        probabilities = np.empty((111, 105, 150), dtype=np.float32)
        with threadpool_limits(limits=blas_threads, user_api="blas"):
            inference.average_of_resized(maps, 111, 105, probabilities, inference.BAND_BYTES, threads=2)
        results.append(probabilities)

    assert results[0].tobytes() == results[1].tobytes()


def test_the_first_of_equally_probable_classes_is_the_best():
    probabilities = np.zeros((6, 7, 4), dtype=np.float32)
    probabilities[..., [1, 3]] = 0.5
    probabilities[0, 0] = 0.25

    class_ids, best = inference.average_of_resized([probabilities], 6, 7, None, 7 * 4 * FLOAT32_BYTES, threads=2)

    assert class_ids[0, 0] == 0 and np.all(class_ids.ravel()[1:] == 1)
    assert best[0, 0] == np.float32(0.25) and np.all(best.ravel()[1:] == np.float32(0.5))


@pytest.mark.parametrize(
    "mode, shape",
    [("default", (50, 70)), ("default", (20, 27)), ("sliding", (150, 100)), ("multi_scale", (81, 55))],
)
def test_one_row_bands_match_the_protocol(position_network, predictors, monkeypatch, mode, shape):
    monkeypatch.setattr(inference, "BAND_BYTES", 1)
    image = make_image(*shape, seed=7)
    expected = eval_sub(position_network, image, CROP_SIZE, BASE_SIZE, flip=True, **MODES[mode])

    probabilities = predictors(position_network).predict(image, flip=True, **MODES[mode])

    assert_close(probabilities, expected, EXACT)


# ---------------------------------------------------------------------------------------------
# class_map: the best class and its probability, and the probabilities written band by band.


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("shape", [(50, 70), (20, 27), (150, 100)])
def test_class_map_is_the_best_class_of_predict(image_network, predictors, mode, shape):
    predictor = predictors(image_network)
    image = make_image(*shape, seed=13)
    probabilities = predictor.predict(image, **MODES[mode])

    class_ids, best = predictor.class_map(image, **MODES[mode])

    assert class_ids.dtype == np.uint8 and best.dtype == np.float32
    assert np.array_equal(class_ids, probabilities.argmax(axis=2))
    assert np.array_equal(best, probabilities.max(axis=2))


class RecordingArray:
    """An (H, W, classes) array-like that keeps what is written to it and the rows of each write."""

    def __init__(self, shape):
        self.shape = shape
        self.array = np.full(shape, np.nan, dtype=np.float32)
        self.writes = []

    def __setitem__(self, rows, values):
        self.writes.append((rows.start, rows.stop))
        self.array[rows] = values


def test_class_map_writes_the_probabilities_band_by_band_from_the_top(image_network, predictors, monkeypatch):
    monkeypatch.setattr(inference, "BAND_BYTES", 10 * 61 * CLASSES * FLOAT32_BYTES)
    predictor = predictors(image_network)
    image = make_image(97, 61, seed=14)
    expected = predictor.predict(image, sliding=True)
    recorder = RecordingArray(expected.shape)

    class_ids, best = predictor.class_map(image, sliding=True, probabilities=recorder)

    assert recorder.writes == [(top, min(top + 10, 97)) for top in range(0, 97, 10)]
    assert np.array_equal(recorder.array, expected)
    assert np.array_equal(class_ids, expected.argmax(axis=2))
    assert np.array_equal(best, expected.max(axis=2))


def test_class_map_streams_the_probabilities_into_a_npy_file(image_network, predictors, tmp_path):
    predictor = predictors(image_network)
    image = make_image(61, 97, seed=15)
    expected = predictor.predict(image, multi_scale=True)
    path = tmp_path / "probabilities.npy"
    stored = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=expected.shape)

    predictor.class_map(image, multi_scale=True, probabilities=stored)
    stored.flush()
    del stored

    assert np.array_equal(np.load(path), expected)


@pytest.mark.parametrize("shape, passes", [((61, 96, CLASSES), 0), ((61, 97, CLASSES + 1), 2)])
def test_probabilities_of_another_shape_are_refused(image_network, predictors, shape, passes):
    """A wrong image size is refused before any forward pass, a wrong class count after them."""
    image_network.batches.clear()

    with pytest.raises(ValueError, match=r"probabilities has shape"):
        predictors(image_network).class_map(make_image(61, 97, seed=15), probabilities=np.zeros(shape, np.float32))

    assert len(image_network.batches) == passes


def test_crops_have_the_models_own_mean_subtracted_and_are_padded_with_it(image_network):
    mean_rgb = (10.0, 200.0, 55.5)
    predictor = inference.Predictor(image_network, CROP_SIZE, BASE_SIZE, mean_rgb=mean_rgb)
    image = make_image(33, 20, seed=16)
    expected = np.zeros((CROP_SIZE, CROP_SIZE, 3))
    expected[:, :20] = (image - np.array(mean_rgb))[..., ::-1]
    image_network.batches.clear()

    predictor.predict(image, flip=False)

    assert len(image_network.batches) == 1
    assert_close(image_network.batches[0][0], expected, EXACT)


# ---------------------------------------------------------------------------------------------
# Running out of memory.


def backend_out_of_memory_error():
    """The backend's own error for a failed allocation: TensorFlow's ResourceExhaustedError, the
    RESOURCE_EXHAUSTED status of XLA (JAX), torch.OutOfMemoryError."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[1,33,33,5]")
    if backend == "jax":
        import jax

        return jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 13.4GiB.")
    import torch

    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 13.40 GiB")


class ExhaustingNetwork:
    """A network that runs out of memory when it is called, with the backend's own error."""

    def __init__(self):
        self.error = backend_out_of_memory_error()

    def __call__(self, batch, training=False):
        raise self.error


@pytest.mark.parametrize(
    "mode, named, advice",
    [
        ("default", "default mode", "smaller image"),
        ("sliding", "(-s)", "default mode"),
        ("multi_scale", "(-ms)", "without -ms"),
    ],
)
@pytest.mark.parametrize("method", ["class_map", "predict"])
def test_running_out_of_memory_says_what_to_try(mode, named, advice, method):
    predictor_network = ExhaustingNetwork()
    predictor = inference.Predictor(predictor_network, CROP_SIZE, BASE_SIZE)

    with pytest.raises(inference.OutOfMemory) as raised:
        getattr(predictor, method)(make_image(70, 50, seed=1), **MODES[mode])

    message = str(raised.value)
    assert isinstance(raised.value, ValueError)
    assert type(raised.value.__cause__) is type(predictor_network.error)
    assert "50x70 image" in message and named in message and advice in message and "smaller image" in message
    assert "\n" not in message


def unable_to_allocate(*args):
    """What NumPy raises when an allocation fails."""
    raise MemoryError("Unable to allocate 6.7 GiB for an array with shape (3000, 4000, 150)")


@pytest.mark.parametrize(
    "owner, name",
    [(inference, "resize_image"), (inference.BandResize, "band")],  # in this thread; in a band's thread
)
def test_numpy_running_out_of_memory_says_what_to_try(position_network, predictors, monkeypatch, owner, name):
    monkeypatch.setattr(owner, name, unable_to_allocate)

    with pytest.raises(inference.OutOfMemory, match="200x150 image in the sliding-window mode") as raised:
        predictors(position_network).class_map(make_image(150, 200, seed=1), sliding=True)

    assert isinstance(raised.value.__cause__, MemoryError)


# ---------------------------------------------------------------------------------------------
# The image resize reads the mirrored border from one padded copy.


def pillow_resize_of_padded_rgb(image, height, width):
    """The image padded symmetrically as an RGB array and resized by Pillow within the box of the image."""
    rows, columns = math.ceil(image.shape[0] / height) + 2, math.ceil(image.shape[1] / width) + 2
    padded = np.pad(image, ((rows, rows), (columns, columns), (0, 0)), mode="symmetric")
    box = (columns, rows, columns + image.shape[1], rows + image.shape[0])
    return np.asarray(Image.fromarray(padded).resize((width, height), Image.BILINEAR, box=box))


@pytest.mark.parametrize(
    "shape, size",
    [
        ((50, 70), (24, 33)),  # shrunk
        ((20, 27), (33, 44)),  # enlarged
        ((2, 3), (33, 40)),  # mirrored border wider than the image
        ((1, 33), (1, 17)),
        ((300, 7), (33, 1)),
        ((97, 61), (65, 41)),
    ],
)
def test_image_resize_is_pillows_resize_of_the_mirrored_image(shape, size):
    image = make_image(*shape, seed=19)

    resized = inference.resize_image(image, *size)

    assert resized.dtype == np.uint8 and resized.flags.c_contiguous
    assert np.array_equal(resized, pillow_resize_of_padded_rgb(image, *size))


@pytest.mark.parametrize("shape, rows, columns", [((5, 7), 3, 4), ((2, 3), 5, 7), ((1, 1), 3, 3)])
def test_rgbx_padding_is_the_symmetric_padding(shape, rows, columns):
    image = make_image(*shape, seed=20)

    padded = inference.mirror_padded_rgbx(image, rows, columns)

    assert np.array_equal(padded[..., :3], np.pad(image, ((rows, rows), (columns, columns), (0, 0)), mode="symmetric"))


# ---------------------------------------------------------------------------------------------
# Crops in batches: the crops of several images (all windows, all scales) through the network
# several at a time give what one crop at a time gives.


@pytest.mark.parametrize("mode", sorted(MODES))
def test_batched_crops_of_several_images_match_the_protocol(image_network, predictors, mode):
    images = [make_image(*shape, seed=20 + index) for index, shape in enumerate([(33, 33), (65, 48), (17, 31)])]
    image_network.batches.clear()

    maps = predictors(image_network).image_maps(images, flip=True, batch_size=3, **MODES[mode])

    expected_passes = sum(protocol_forward_passes(image.shape[:2], CROP_SIZE, BASE_SIZE, flip=True, **MODES[mode])
                          for image in images)
    assert {len(batch) for batch in image_network.batches} == {3}
    assert sum(len(batch) for batch in image_network.batches) == 3 * math.ceil(expected_passes / 6) * 2
    one_at_a_time = predictors(image_network).image_maps(images, flip=True, batch_size=1, **MODES[mode])
    for image, image_maps, single_maps in zip(images, maps, one_at_a_time):
        for batch_map, single_map in zip(image_maps, single_maps):
            assert_close(batch_map, single_map.astype(np.float64), EXACT)  # other kernels for a batch: rounding
    expected = eval_sub(image_network, images[0], CROP_SIZE, BASE_SIZE, flip=True, **MODES[mode])
    height, width = images[0].shape[:2]
    class_ids, best = predictors(image_network).best_classes(maps[0], height, width)
    if mode == "default":  # a crop-sized image: no resize, so the reference holds to EXACT
        np.testing.assert_array_equal(class_ids, expected.argmax(axis=-1))
        assert_close(best[..., np.newaxis], expected.max(axis=-1, keepdims=True), EXACT)


def test_batches_of_a_real_network_equal_one_crop_at_a_time(small_pspnet):
    """PSPNet-50 with its final Interp split off, the crops of three images in batches of two (the last
    one filled with a zero crop) against one at a time: no layer mixes the items of a batch.

    A batch takes other convolution kernels of the backend, whose sums are rounded in another
    order: the logits agree to about 1e-6 of their range (~250 with these weights), and a softmax
    output moves by at most half the largest logit change, so a probability by up to ~1e-4 (TensorFlow
    2e-5, PyTorch 1.1e-4 measured). Class ids are equal wherever the best two classes are further apart
    than BATCH_TOLERANCE.
    """
    from layers_builder import split_upsampling

    logits, upsampling = split_upsampling(small_pspnet)
    predictor = inference.Predictor(logits, 89, 96, upsampling)
    images = [make_image(45, 100, seed=30), make_image(120, 70, seed=31), make_image(89, 89, seed=32)]

    one_at_a_time = predictor.image_maps(images, flip=True, batch_size=1)
    batched = predictor.image_maps(images, flip=True, batch_size=2)

    for image, single_maps, batch_maps in zip(images, one_at_a_time, batched):
        for single, batch in zip(single_maps, batch_maps):
            assert_close(batch, single.astype(np.float64), BATCH_TOLERANCE)
        height, width = image.shape[:2]
        probabilities = np.empty((height, width, inference_classes(single_maps)), dtype=np.float32)
        single_ids, _ = predictor.best_classes(single_maps, height, width, probabilities)
        batch_ids, _ = predictor.best_classes(batch_maps, height, width)
        best_two = np.sort(probabilities, axis=-1)[..., -2:]
        clear = best_two[..., 1] - best_two[..., 0] > BATCH_TOLERANCE
        np.testing.assert_array_equal(batch_ids[clear], single_ids[clear])
        assert clear.mean() > 0.95


def inference_classes(maps):
    """The number of classes of a list of scale maps."""
    return maps[0].shape[-1]
