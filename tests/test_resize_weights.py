"""inference.resize_weights: MATLAB's imresize 'bilinear' weights along one axis, computed in NumPy.

Two references: TensorFlow's ScaleAndTranslate (kernel 'triangle', antialias), whose weights the
protocol applied before they were computed in NumPy, read from the operation by resizing an
identity matrix; and MATLAB's imresize written out in float64 (test_inference.imresize_matrix),
after folding the mirrored border back onto the rows it mirrors.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from pspnet_keras import inference
from test_inference import imresize_matrix

IN_LENGTHS = (1, 2, 3, 24, 33, 97, 355, 473)
OUT_LENGTHS = (1, 13, 50, 301, 473, 1225, 4000)
# Float32 sampling positions (x + 0.5) / scale - 0.5 of outputs hundreds to thousands of pixels from
# the origin are rounded to a few 1e-5 of a pixel, which moves a weight by as much (largest seen
# below: 3.4e-5, 473 -> 4000).
MATLAB_TOLERANCE = 5e-5


def scale_and_translate_weights(in_length, out_length, margin):
    """The (out_length, in_length + 2 margin) weights ScaleAndTranslate applies along one axis."""
    padded = in_length + 2 * margin
    scale = out_length / in_length
    identity = tf.eye(padded)[tf.newaxis, :, tf.newaxis, :]
    weights = tf.raw_ops.ScaleAndTranslate(
        images=identity, size=(out_length, 1), scale=(scale, 1.0), translation=(-margin * scale, 0.0),
        kernel_type="triangle", antialias=True,
    )
    return weights[0, :, 0, :].numpy()


@pytest.mark.parametrize("in_length, out_length", itertools.product(IN_LENGTHS, OUT_LENGTHS))
def test_weights_are_those_of_scale_and_translate(in_length, out_length):
    margin = inference.resize_margin(in_length, out_length)

    weights = inference.resize_weights(in_length, out_length, margin)

    assert weights.dtype == np.float32
    np.testing.assert_allclose(weights, scale_and_translate_weights(in_length, out_length, margin), rtol=0, atol=1e-7)


@pytest.mark.parametrize("in_length, out_length", itertools.product(IN_LENGTHS, OUT_LENGTHS))
def test_weights_folded_onto_the_image_are_matlabs(in_length, out_length):
    margin = inference.resize_margin(in_length, out_length)
    weights = inference.resize_weights(in_length, out_length, margin).astype(np.float64)
    folded = np.zeros((out_length, in_length))
    for padded_row, source in enumerate(inference.mirrored_indices(in_length, margin)):
        folded[:, source] += weights[:, padded_row]

    np.testing.assert_allclose(folded, imresize_matrix(in_length, out_length), rtol=0, atol=MATLAB_TOLERANCE)
