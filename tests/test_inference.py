"""Tests of inference.Predictor against the Caffe release's MATLAB evaluation protocol.

The reference below is a straightforward re-implementation, written from sections D and E of
the PSPNet reference facts, of evaluation/eval_sub.m, scale_process.m, pre_img.m and
caffe_process.m: MATLAB's 1-based window loops, padding with the mean colour, softmax of the
logits of a crop plus the mirrored logits of its mirror image, overlaps averaged by a count map,
MATLAB imresize 'bilinear' (written out here in numpy) back to the image size, renormalisation
and the mean over scales. The default mode (one crop, longer side = crop size) is the same
protocol at the single long side crop_size (issue 3, item 2).

The network is a stand-in: logits = a fixed random 3x3 convolution ('same', zero padded) of the
crop plus a fixed random term per crop position, so the logits depend on the neighbourhood, the
channel order and the position in the crop, and are not mirror-symmetric. With the convolution
weights at zero (`position_network`) the logits ignore the image, so the image resize cannot
matter and the rest of the protocol (windows, flip, count map, probability resize,
renormalisation, scales) is compared tightly even where the image is resized.

Tolerances:
- EXACT (1e-5) wherever the image is not resized, and for everything the image-independent
  network computes: float32 network and TensorFlow arithmetic against this float64 reference.
- One grey level in the crops the network receives where the image is resized. MATLAB rounds a
  uint8 image to uint8 after each of its two 1-D passes (the more shrunk dimension first); another
  library's uint8 resize (Pillow: fixed-point weights, horizontal pass first, rounding in between)
  lands one grey level off at up to a fifth of the values. That is inherent; more is not.
- End to end with a resized image and the image-dependent network: the bound that one grey level
  in every input pixel implies for the stand-in (StandInNetwork.one_grey_level_bound, ~0.2), so
  only gross departures show there; the crops themselves are checked to one grey level.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

import inference

CROP_SIZE = 33
BASE_SIZE = 64
CLASSES = 5
DATA_MEAN_RGB = np.array([123.68, 116.779, 103.939])
MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
EXACT = 1e-5
SUM_TOLERANCE = 1e-5


class StandInNetwork:
    """Logits of a fixed random 3x3 convolution ('same') plus a fixed random term per position.

    Called by the Predictor on (N, crop, crop, 3) float32 batches inside a tf.function; it keeps
    every batch it receives in `batches` (through tf.py_function, which runs at every call, not
    only while tracing). `logits` is the same function in float64 numpy, for the reference.
    """

    def __init__(self, crop_size, convolution_scale, seed):
        rng = np.random.default_rng(seed)
        self.kernel = rng.normal(0.0, convolution_scale, (3, 3, 3, CLASSES))
        self.position = rng.normal(0.0, 1.0, (crop_size, crop_size, CLASSES))
        self.batches = []

    def record(self, batch):
        self.batches.append(batch.numpy())
        return []

    def __call__(self, batch, training=False):
        tf.py_function(self.record, [batch], [])
        kernel = tf.constant(self.kernel, tf.float32)
        convolved = tf.nn.conv2d(batch, kernel, strides=1, padding="SAME")
        return convolved + tf.constant(self.position, tf.float32)

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
    branch the release's padding is (124, 117, 104); spec E and the team contract say the mean
    colour, which is what this reference does.)
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
