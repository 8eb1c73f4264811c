"""The Keras PSPNets with converted weights compute what Caffe computes.

Reference: OpenCV's dnn module (its Caffe importer) running the deploy prototxt (caffe_net's
rendering of the release's file), with the fork's BN layers expressed as BVLC BatchNorm +
Scale, on synthetic weights. The Keras side goes through the whole chain: caffemodel ->
weight_converter.py -> .h5 -> layers_builder.build_pspnet + load_weights. On a mismatch the failure names the first
layer (in Caffe order) whose output differs. OpenCV's logits do not depend on the Keras backend:
each is computed once, kept in a folder of the suite's and read by the runs on the other backends
(test_backends.py).
"""

import numpy as np
import pytest

import layers_builder
from bench.synthetic_caffe import caffe_layers
from bench.synthetic_caffe import opencv_logits
from bench.synthetic_caffe import opencv_net
from bench.synthetic_caffe import opencv_outputs
from bench.synthetic_caffe import synthetic_image

# Full-size networks (473 and 713 px crops) on converted synthetic weights.
pytestmark = pytest.mark.slow

MODEL_NAMES = ("pspnet50_ade20k", "pspnet101_voc2012", "pspnet101_cityscapes")
INPUT_SIZES = {"pspnet50_ade20k": 473, "pspnet101_voc2012": 473, "pspnet101_cityscapes": 713}
IMAGE_SEED = 2017
RELATIVE_TOLERANCE = 1e-4
MIN_ARGMAX_AGREEMENT = 0.999
# A useful spread: softmax far from one-hot, logits of a few units that vary over the image.
MAX_MEAN_TOP_PROBABILITY = 0.8
LOGIT_STD_RANGE = (1.0, 10.0)
MIN_PREDICTED_CLASSES = 5


def softmax(logits):
    exponentials = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exponentials / exponentials.sum(axis=-1, keepdims=True)


def assert_useful_spread(logits):
    """The reference logits can tell a right network from a wrong one."""
    top_probability = softmax(logits).max(axis=-1).mean()
    classes = len(np.unique(logits.argmax(axis=-1)))
    assert top_probability < MAX_MEAN_TOP_PROBABILITY
    assert LOGIT_STD_RANGE[0] < logits.std() < LOGIT_STD_RANGE[1]
    assert logits.std(axis=(0, 1)).mean() > 0.3 * logits.std()
    assert classes >= MIN_PREDICTED_CLASSES


def max_error(actual, expected):
    """(max |actual - expected|, allowed maximum = RELATIVE_TOLERANCE x range of expected)."""
    return float(np.abs(actual - expected).max()), RELATIVE_TOLERANCE * float(expected.max() - expected.min())


def first_divergent_layer(prototxt, weights, model, image):
    """'<caffe layer>: max |diff| X > allowed Y' for the first layer whose Keras output differs, or None.

    Compares every Caffe layer that has a Keras counterpart ('/' -> '_').
    """
    net = opencv_net(prototxt, weights, fuse_layers=False)
    keras_names = {layer.name for layer in model.layers}
    pairs = [(name, name.replace("/", "_")) for name, *_ in caffe_layers(prototxt)]
    pairs = [(caffe, keras) for caffe, keras in pairs if keras in keras_names]
    reference = opencv_outputs(net, image, [caffe for caffe, _ in pairs])
    probe = layers_builder.keras.Model(model.input, [model.get_layer(keras).output for _, keras in pairs])
    for (caffe, _), output in zip(pairs, probe(image, training=False)):
        output = np.asarray(output)[0]
        if output.shape != reference[caffe].shape:
            return f"{caffe}: Keras shape {output.shape}, Caffe shape {reference[caffe].shape}"
        error, allowed = max_error(output, reference[caffe])
        if error > allowed:
            return f"{caffe}: max |diff| {error:.3g} > allowed {allowed:.3g}"
    return None


def reference_logits(synthetic, image, folder):
    """OpenCV's logits of the synthetic model on `image`, computed where `folder` lacks them and kept there
    (written under a temporary name, then renamed)."""
    path = folder / f"{synthetic.name}_{image.shape[1]}_{IMAGE_SEED}.npy"
    if not path.exists():
        partial = path.with_name(f"{path.stem}.partial.npy")
        np.save(partial, opencv_logits(opencv_net(synthetic.prototxt, synthetic.weights), image))
        partial.replace(path)
    return np.load(path)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_keras_model_matches_caffe_reference(name, synthetic_model, opencv_references):
    synthetic = synthetic_model(name)
    image = synthetic_image(INPUT_SIZES[name], IMAGE_SEED)
    reference = reference_logits(synthetic, image, opencv_references)
    assert_useful_spread(reference)

    model = layers_builder.build_pspnet(name)
    layers_builder.load_weights(model, synthetic.converted_h5)
    logits = np.asarray(model(image, training=False))[0]

    assert logits.shape == reference.shape
    error, allowed = max_error(logits, reference)
    agreement = float((logits.argmax(axis=-1) == reference.argmax(axis=-1)).mean())
    if error > allowed or agreement < MIN_ARGMAX_AGREEMENT:
        pytest.fail(
            f"{name}: max |logit diff| {error:.3g} (allowed {allowed:.3g}), argmax agreement {agreement:.4%}; "
            f"first divergent layer: {first_divergent_layer(synthetic.prototxt, synthetic.weights, model, image)}"
        )
