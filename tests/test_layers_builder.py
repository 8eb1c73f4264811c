"""Tests of layers_builder against independent references.

- `Interp` against Caffe's `caffe_cpu_interp2` (src/caffe/util/interp.cpp of the release)
  written out pixel by pixel and
  against TF1's align-corners `resize_bilinear`.
- The three networks against the Caffe deploy prototxts (caffe_net's renderings of the
  release's files, checked against those in tests/test_weight_converter.py: names,
  convolution settings, blob shapes by Caffe's size arithmetic, parameter counts) and
  the layer and parameter counts those prototxts imply,
  and, at a small input size, against the prototxt run layer by layer with tf.nn ops.
- `load_weights` on files written here with h5py in the Keras-2 `save_weights` layout.
"""

import dataclasses
import functools
import re

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf

from bench.synthetic_caffe import opencv_logits
from bench.synthetic_caffe import opencv_net
from bench.synthetic_caffe import synthetic_image
from layers_builder import Interp
from layers_builder import PyramidConvolution
from layers_builder import WeightsError
from layers_builder import build_pspnet
from layers_builder import load_weights
from pspnet_keras import caffe_net
from pspnet_keras import models
from pspnet_keras.models import RELEASED_MODEL_NAMES as MODEL_NAMES

# The release's deploy prototxts: input sides, classes, depths, weighted layers, parameter counts.
NATIVE_SIZES = {"pspnet50_ade20k": 473, "pspnet101_voc2012": 473, "pspnet101_cityscapes": 713}
CLASSES = {"pspnet50_ade20k": 150, "pspnet101_voc2012": 21, "pspnet101_cityscapes": 19}
DEPTHS = {"pspnet50_ade20k": 50, "pspnet101_voc2012": 101, "pspnet101_cityscapes": 101}
WEIGHTED_LAYERS = {"pspnet50_ade20k": 121, "pspnet101_voc2012": 223, "pspnet101_cityscapes": 223}
PARAMETERS = {
    "pspnet50_ade20k": 46_841_174,
    "pspnet101_voc2012": 65_819_349,
    "pspnet101_cityscapes": 65_818_323,
}
CAFFE_BN_EPSILON = 1e-5
SMALL_SIZE = 89  # 48 * 2 - 7: conv5_3 is 12x12, the smallest size whose pyramid bins pool > 1 pixel.
PYRAMID_BINS = (1, 2, 3, 6)
SPOT_CHECKED_NAMES = (
    "conv1_1_3x3_s2",
    "conv1_1_3x3_s2_bn",
    "conv3_1_1x1_proj_bn",
    "conv5_3_pool6_conv",
    "conv5_3_pool1_conv_bn",
    "conv5_4_bn",
    "conv6",
)
SCRAMBLED = 0.25  # the value of every weight before a load (no file holds it)
KERAS2_WEIGHT_NAMES = {
    keras.layers.Conv2D: ("kernel", "bias"),
    keras.layers.BatchNormalization: ("gamma", "beta", "moving_mean", "moving_variance"),
}
# Caffe blobs that conv5_4 (PyramidConvolution) computes with, without forming them.
PYRAMID_BLOBS = tuple(f"conv5_3_pool{bins}_interp" for bins in (6, 3, 2, 1)) + ("conv5_3_concat",)


# ---------------------------------------------------------------------------------------
# References


def caffe_interp(image, out_height, out_width):
    """Caffe's `caffe_cpu_interp2` on one (H, W, C) image, output pixel by output pixel in float32."""
    in_height, in_width = image.shape[:2]
    if (in_height, in_width) == (out_height, out_width):
        return image.copy()
    one = np.float32(1)
    ratio_h = np.float32(in_height - 1) / np.float32(out_height - 1) if out_height > 1 else np.float32(0)
    ratio_w = np.float32(in_width - 1) / np.float32(out_width - 1) if out_width > 1 else np.float32(0)
    out = np.empty((out_height, out_width, image.shape[2]), dtype=np.float32)
    for i in range(out_height):
        s = ratio_h * np.float32(i)
        i0 = int(s)
        i1 = i0 + 1 if i0 < in_height - 1 else i0
        a = s - np.float32(i0)
        for j in range(out_width):
            t = ratio_w * np.float32(j)
            j0 = int(t)
            j1 = j0 + 1 if j0 < in_width - 1 else j0
            b = t - np.float32(j0)
            out[i, j] = (one - a) * ((one - b) * image[i0, j0] + b * image[i0, j1]) + a * (
                (one - b) * image[i1, j0] + b * image[i1, j1]
            )
    return out


def caffe_interp_batch(batch, out_height, out_width):
    """`caffe_interp` on every image of an NHWC batch."""
    return np.stack([caffe_interp(image, out_height, out_width) for image in batch])


def tf1_align_corners(batch, out_height, out_width):
    """TF1's bilinear resize with aligned corners and no half-pixel offset, as Caffe's Interp samples."""
    return tf.compat.v1.image.resize_bilinear(
        batch, (out_height, out_width), align_corners=True, half_pixel_centers=False
    ).numpy()


@functools.cache
def deploy_layers(model_name):
    """The parsed deploy prototxt of `model_name` (caffe_net's rendering, parsed once)."""
    return read_prototxt(caffe_net.deploy_prototxt(model_name))


def read_prototxt(text):
    """The layers of a deploy prototxt's text in order: name, type, top, bottoms and *_param fields.

    Layer fields sit at indent 2, the fields of the layer's parameter block at indent 4
    (filler fields, deeper, are ignored).
    """
    layers = []
    for block in re.split(r"^layer \{$", text, flags=re.M)[1:]:
        layer = {"bottom": [], "params": {}}
        for indent, key, value in re.findall(r'^( +)(\w+): "?([^"\n]*?)"?$', block, flags=re.M):
            if len(indent) == 2 and key == "bottom":
                layer["bottom"].append(value)
            elif len(indent) == 2:
                layer[key] = value
            elif len(indent) == 4:
                layer["params"][key] = value
        layers.append(layer)
    return layers


def keras_name(caffe_name):
    """The Keras layer name of a Caffe layer: `conv1_1_3x3_s2/bn` -> `conv1_1_3x3_s2_bn`."""
    return caffe_name.replace("/", "_")


def int_params(layer):
    """The integer fields of a Caffe layer's parameter block."""
    return {key: int(value) for key, value in layer["params"].items() if value.isdigit()}


def caffe_pool_size(size, kernel, stride, pad):
    """Caffe's ceil-mode pooling output size, without windows that start in the padding."""
    out = -(-(size + 2 * pad - kernel) // stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def caffe_blob_shapes(layers, input_size):
    """(height, width, channels) of every layer's top blob, by Caffe's size arithmetic."""
    blobs = {"data": (input_size, input_size, 3)}
    shapes = {}
    for layer in layers:
        params = int_params(layer)
        bottoms = [blobs[name] for name in layer["bottom"]]
        height, width, channels = bottoms[0]
        if layer["type"] == "Convolution":
            kernel, stride = params["kernel_size"], params.get("stride", 1)
            pad, dilation = params.get("pad", 0), params.get("dilation", 1)
            side = (height + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
            shape = (side, side, params["num_output"])
        elif layer["type"] == "Pooling":
            side = caffe_pool_size(height, params["kernel_size"], params["stride"], params.get("pad", 0))
            shape = (side, side, channels)
        elif layer["type"] == "Interp" and "zoom_factor" in params:
            zoom = params["zoom_factor"]
            shape = (height + (height - 1) * (zoom - 1), width + (width - 1) * (zoom - 1), channels)
        elif layer["type"] == "Interp":
            shape = (params["height"], params["width"], channels)
        elif layer["type"] == "Concat":
            shape = (height, width, sum(bottom[2] for bottom in bottoms))
        else:
            shape = (height, width, channels)
        blobs[layer["top"]] = shape
        shapes[layer["name"]] = shape
    return shapes


def caffe_input_channels(layers, input_size):
    """The channels of every layer's (first) bottom blob, by layer name."""
    shapes = caffe_blob_shapes(layers, input_size)
    channels = {"data": 3}
    in_channels = {}
    for layer in layers:
        in_channels[layer["name"]] = channels[layer["bottom"][0]]
        channels[layer["top"]] = shapes[layer["name"]][2]
    return in_channels


def caffe_feature_side(input_size):
    """The side of conv5_3 for an input of side `input_size` in the PSPNet-50 deploy net."""
    return caffe_blob_shapes(deploy_layers("pspnet50_ade20k"), input_size)["conv5_3"][0]


def caffe_forward(layers, weights, image, feature_side):
    """Runs a deploy prototxt on one NHWC image with tf.nn ops, following Caffe's layer semantics.

    The pyramid's pooling kernels and Interp sizes are scaled from the prototxt's conv5_3 side
    to `feature_side`, so the net can run at sizes other than the deploy size.
    """
    sized_interps = [layer for layer in layers if layer["type"] == "Interp" and "height" in layer["params"]]
    native_side = int_params(sized_interps[0])["height"]
    blobs = {"data": tf.constant(image)}
    for layer in layers:
        params = int_params(layer)
        x = blobs[layer["bottom"][0]]
        kind = layer["type"]
        if kind == "Convolution":
            pad, dilation = params.get("pad", 0), params.get("dilation", 1)
            arrays = weights[keras_name(layer["name"])]
            x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
            x = tf.nn.conv2d(x, arrays["kernel"], params.get("stride", 1), "VALID", dilations=dilation)
            if layer["params"].get("bias_term") != "false":
                x = x + arrays["bias"]
        elif kind == "BN":
            arrays = weights[keras_name(layer["name"])]
            scale = arrays["gamma"] / np.sqrt(arrays["moving_variance"] + np.float32(CAFFE_BN_EPSILON))
            x = (x - arrays["moving_mean"]) * scale + arrays["beta"]
        elif kind == "ReLU":
            x = tf.nn.relu(x)
        elif kind == "Pooling" and layer["params"]["pool"] == "MAX":
            kernel, stride, pad = params["kernel_size"], params["stride"], params.get("pad", 0)
            out = caffe_pool_size(x.shape[1], kernel, stride, pad)
            after = (out - 1) * stride + kernel - x.shape[1] - pad
            x = tf.pad(x, [[0, 0], [pad, after], [pad, after], [0, 0]], constant_values=-np.inf)
            x = tf.nn.max_pool2d(x, kernel, stride, "VALID")
        elif kind == "Pooling":
            kernel = params["kernel_size"] * feature_side // native_side
            x = tf.nn.avg_pool2d(x, kernel, kernel, "VALID")
        elif kind == "Interp" and "zoom_factor" in params:
            zoom = params["zoom_factor"]
            height, width = x.shape[1:3]
            x = tf1_align_corners(x, height + (height - 1) * (zoom - 1), width + (width - 1) * (zoom - 1))
        elif kind == "Interp":
            x = tf1_align_corners(x, feature_side, feature_side)
        elif kind == "Concat":
            x = tf.concat([blobs[name] for name in layer["bottom"]], axis=-1)
        elif kind == "Eltwise":
            x = tf.add_n([blobs[name] for name in layer["bottom"]])
        elif kind != "Dropout":
            raise AssertionError(f"layer type {kind} has no reference")
        blobs[layer["top"]] = x
    return np.asarray(blobs["conv6_interp"])


# ---------------------------------------------------------------------------------------
# Weights files


def random_weights(model, seed):
    """Seeded random arrays for every weighted layer: {layer name: {Keras-2 weight name: array}}.

    Kernels are scaled by 1/sqrt(fan-in) and each BN's gamma by the square root of its
    variance, so the logits of a 101-layer net stay finite and spread out; variances down
    to 1e-4 make the BN epsilon (1e-5) visible in the output.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            shape = tuple(layer.kernel.shape)
            fan_in = np.prod(shape[:3])
            arrays = {"kernel": rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(fan_in))}
            if layer.use_bias:
                arrays["bias"] = rng.standard_normal(shape[3], dtype=np.float32)
        elif isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            variance = np.exp(rng.uniform(np.log(1e-4), np.log(1.5), channels))
            arrays = {
                "gamma": rng.uniform(0.5, 1.0, channels) * np.sqrt(variance),
                "beta": rng.normal(0.0, 0.1, channels),
                "moving_mean": rng.normal(0.0, 0.1, channels),
                "moving_variance": variance,
            }
        else:
            continue
        weights[layer.name] = {name: np.asarray(array, dtype=np.float32) for name, array in arrays.items()}
    return weights


def weight_shapes(model):
    """{layer name: {Keras-2 weight name: shape}} of every weighted layer of `model`."""
    shapes = {}
    for layer in model.layers:
        names = next((names for kind, names in KERAS2_WEIGHT_NAMES.items() if isinstance(layer, kind)), ())
        if layer.weights:
            shapes[layer.name] = dict(zip(names, (tuple(w.shape) for w in layer.weights)))
    return shapes


def keras2_layer_list(model, weights):
    """[(layer name, weights)] for every layer in model order, as a Keras-2 model lists them.

    Weightless layers get Keras-2 automatic names (`activation_3`, `zero_padding2d_1`, ...), as
    in the published files, and no weights.
    """
    counters = {}
    entries = []
    for layer in model.layers:
        if layer.name in weights:
            entries.append((layer.name, weights[layer.name]))
            continue
        prefix = re.sub(r"(?<=[a-z0-9])(?=[A-Z][a-z])", "_", type(layer).__name__).lower()
        counters[prefix] = counters.get(prefix, 0) + 1
        entries.append((f"{prefix}_{counters[prefix]}", {}))
    return entries


def write_keras2_weights(path, entries, full_model=False, split_layer_names=False, name_suffix=""):
    """Writes `entries` [(layer name, {weight name: array or shape})] as Keras 2.1.5's save_weights does.

    `save_weights` layout by default; `full_model` nests it in the `model_weights` group of a
    `model.save` file, next to an `optimizer_weights` group; `split_layer_names` stores the
    layer names as `layer_names0`, `layer_names1` (Keras' chunked attribute); `name_suffix`
    uniquifies the weight name prefixes as TF does when a graph is built twice. A shape
    instead of an array gives an unwritten dataset (reads as zeros, costs no space).
    """
    with h5py.File(path, "w") as handle:
        group = handle
        if full_model:
            handle.attrs["keras_version"] = b"2.1.5"
            handle.attrs["backend"] = b"tensorflow"
            handle.attrs["model_config"] = b'{"class_name": "Model", "config": {}}'
            optimizer = handle.create_group("optimizer_weights")
            optimizer.attrs["weight_names"] = np.array([b"training/SGD/Variable:0"])
            optimizer.create_dataset("training/SGD/Variable:0", data=np.zeros((3, 3, 3, 64), np.float32))
            group = handle.create_group("model_weights")
        layer_names = np.array([name.encode() for name, _ in entries])
        if split_layer_names:
            for index, chunk in enumerate(np.array_split(layer_names, 2)):
                group.attrs[f"layer_names{index}"] = chunk
        else:
            group.attrs["layer_names"] = layer_names
        group.attrs["backend"] = b"tensorflow"
        group.attrs["keras_version"] = b"2.1.5"
        for name, weights in entries:
            layer_group = group.create_group(name)
            weight_names = [f"{name}{name_suffix}/{weight}:0" for weight in weights]
            # Keras 2 stores an empty list, which h5py writes as an empty float64 array.
            layer_group.attrs["weight_names"] = np.array([n.encode() for n in weight_names])
            for weight_name, value in zip(weight_names, weights.values()):
                if isinstance(value, tuple):
                    layer_group.create_dataset(weight_name, shape=value, dtype=np.float32)
                else:
                    layer_group.create_dataset(weight_name, data=value)


def set_weights_by_name(model, weights):
    """Keras' own `set_weights`, each array matched to its variable by name."""
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([weights[layer.name][variable.name] for variable in layer.weights])


def scramble(model):
    """Overwrites every weight of `model` with SCRAMBLED, so a load that skips a layer shows."""
    for variable in model.weights:
        variable.assign(np.full(variable.shape, SCRAMBLED, dtype=np.float32))


def assert_holds(model, weights):
    """Asserts every weighted layer of `model` holds exactly `weights`, variable by variable."""
    held = {layer.name for layer in model.layers if layer.weights}
    assert held == set(weights)
    for layer in model.layers:
        for variable in layer.weights:
            np.testing.assert_array_equal(
                variable.numpy(), weights[layer.name][variable.name], err_msg=f"{layer.name}/{variable.name}"
            )


def logits_of(model, images):
    """The model's output for a batch, in inference mode (an eager call: no tracing to pay for)."""
    return np.asarray(model(images, training=False))


def raised_message(model, path):
    """The message of the WeightsError that loading `path` into `model` raises."""
    with pytest.raises(WeightsError) as raised:
        load_weights(model, path)
    return str(raised.value)


def names_layer(message, layer_name):
    """Whether `message` names `layer_name` as a whole word."""
    return re.search(rf"(?<!\w){re.escape(layer_name)}(?!\w)", message) is not None


# ---------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def native_models():
    """The three networks at their deploy sizes, built once (no forward pass needed)."""
    return {name: build_pspnet(name) for name in MODEL_NAMES}


@pytest.fixture(scope="module")
def small_model50():
    """PSPNet-50 at the small input size: the model that weights are loaded into."""
    return build_pspnet("pspnet50_ade20k", SMALL_SIZE)


@pytest.fixture(scope="module")
def weights50(small_model50):
    """Seeded random weights for PSPNet-50."""
    return random_weights(small_model50, seed=50)


@pytest.fixture(scope="module")
def small_image():
    """A BGR mean-subtracted-like input batch of one image at the small size."""
    return np.random.default_rng(7).normal(0.0, 50.0, (1, SMALL_SIZE, SMALL_SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def reference_logits50(weights50, small_image):
    """The logits of a second PSPNet-50 given `weights50` with Keras' own set_weights."""
    model = build_pspnet("pspnet50_ade20k", SMALL_SIZE)
    set_weights_by_name(model, weights50)
    logits = logits_of(model, small_image)
    assert np.isfinite(logits).all() and logits.std() > 1e-3
    return logits


LAYOUTS = {
    "save_weights": {},
    "model_save": {"full_model": True},
    "split_layer_names": {"split_layer_names": True},
    "uniquified_weight_names": {"name_suffix": "_1"},
}


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def weights_file50(request, tmp_path_factory, small_model50, weights50):
    """`weights50` written in each Keras-2 layout; removed afterwards (190 MB each)."""
    path = tmp_path_factory.mktemp(request.param) / "pspnet50_ade20k.h5"
    write_keras2_weights(path, keras2_layer_list(small_model50, weights50), **LAYOUTS[request.param])
    yield path
    path.unlink()


# ---------------------------------------------------------------------------------------
# Interp

INTERP_CASES = [
    # (input height, input width, output height, output width)
    (6, 6, 60, 60),  # pyramid bin 6 -> conv5_3 of the 473 nets
    (3, 3, 90, 90),  # pyramid bin 3 -> conv5_3 of the 713 net
    (2, 2, 12, 12),  # pyramid bin 2 -> conv5_3 at the small size
    (5, 7, 13, 29),  # odd, non-square up-sampling
    (4, 6, 17, 8),  # even input, mixed odd/even output
    (60, 40, 7, 10),  # even down-sampling
    (13, 17, 4, 6),  # odd down-sampling
    (9, 30, 20, 11),  # up in height, down in width
]


@pytest.mark.parametrize("in_h, in_w, out_h, out_w", INTERP_CASES)
def test_interp_to_a_given_size_is_caffe_interp(in_h, in_w, out_h, out_w):
    batch = np.random.default_rng(in_h * 100 + in_w).uniform(-1, 1, (2, in_h, in_w, 3)).astype(np.float32)
    result = Interp(height=out_h, width=out_w)(batch).numpy()
    np.testing.assert_allclose(result, caffe_interp_batch(batch, out_h, out_w), rtol=0, atol=1e-6)


@pytest.mark.parametrize("in_h, in_w", [(12, 12), (10, 12), (7, 4), (2, 3)])
def test_interp_zoom_factor_8_is_caffe_interp(in_h, in_w):
    batch = np.random.default_rng(in_h * 100 + in_w).uniform(-1, 1, (2, in_h, in_w, 3)).astype(np.float32)
    out_h, out_w = in_h + (in_h - 1) * 7, in_w + (in_w - 1) * 7
    result = Interp(zoom_factor=8)(batch).numpy()
    assert result.shape == (2, out_h, out_w, 3)
    np.testing.assert_allclose(result, caffe_interp_batch(batch, out_h, out_w), rtol=0, atol=1e-6)


@pytest.mark.parametrize("in_h, in_w, out_h, out_w", INTERP_CASES)
def test_interp_is_tf1_align_corners_resize(in_h, in_w, out_h, out_w):
    batch = np.random.default_rng(in_h + in_w).uniform(-1, 1, (2, in_h, in_w, 3)).astype(np.float32)
    result = Interp(height=out_h, width=out_w)(batch).numpy()
    np.testing.assert_allclose(result, tf1_align_corners(batch, out_h, out_w), rtol=0, atol=1e-5)


@pytest.mark.parametrize("side", [60, 90])
def test_interp_zoom_of_the_deploy_nets_is_tf1_align_corners_resize(side):
    batch = np.random.default_rng(side).uniform(-1, 1, (1, side, side, 4)).astype(np.float32)
    out = side + (side - 1) * 7
    result = Interp(zoom_factor=8)(batch).numpy()
    assert result.shape == (1, out, out, 4)
    np.testing.assert_allclose(result, tf1_align_corners(batch, out, out), rtol=0, atol=1e-5)


def test_the_two_references_agree():
    batch = np.random.default_rng(0).uniform(-1, 1, (1, 5, 7, 2)).astype(np.float32)
    np.testing.assert_allclose(
        caffe_interp_batch(batch, 29, 13), tf1_align_corners(batch, 29, 13), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("in_h, in_w, out_h, out_w", [(6, 6, 60, 60), (5, 7, 13, 29), (13, 17, 4, 6)])
def test_half_pixel_resizes_differ_from_caffe_interp(in_h, in_w, out_h, out_w):
    """TF2's resize uses half-pixel centres: a test against Caffe catches its use."""
    batch = np.random.default_rng(1).uniform(-1, 1, (1, in_h, in_w, 3)).astype(np.float32)
    reference = caffe_interp_batch(batch, out_h, out_w)
    half_pixel = [
        tf.image.resize(batch, (out_h, out_w), method="bilinear").numpy(),
        keras.ops.image.resize(batch, (out_h, out_w), interpolation="bilinear").numpy(),
    ]
    for resized in half_pixel:
        assert np.abs(resized - reference).max() > 0.05


def test_interp_to_the_input_size_copies():
    batch = np.random.default_rng(2).uniform(-1, 1, (2, 9, 11, 3)).astype(np.float32)
    np.testing.assert_array_equal(Interp(height=9, width=11)(batch).numpy(), batch)
    np.testing.assert_array_equal(Interp(zoom_factor=1)(batch).numpy(), batch)


@pytest.mark.parametrize("out_h, out_w", [(1, 1), (1, 8), (6, 1)])
def test_interp_to_one_row_or_column_is_caffe_interp(out_h, out_w):
    batch = np.random.default_rng(3).uniform(-1, 1, (2, 7, 5, 3)).astype(np.float32)
    result = Interp(height=out_h, width=out_w)(batch).numpy()
    np.testing.assert_allclose(result, caffe_interp_batch(batch, out_h, out_w), rtol=0, atol=1e-6)


def test_interp_to_one_pixel_takes_the_top_left_pixel():
    batch = np.random.default_rng(3).uniform(-1, 1, (2, 7, 5, 3)).astype(np.float32)
    np.testing.assert_array_equal(Interp(height=1, width=1)(batch).numpy(), batch[:, :1, :1])


@pytest.mark.parametrize(
    "config, out_h, out_w",
    [({"height": 60, "width": 60}, 60, 60), ({"height": 5, "width": 9}, 5, 9), ({"zoom_factor": 8}, 1, 1)],
)
def test_interp_of_one_pixel_broadcasts_it(config, out_h, out_w):
    batch = np.random.default_rng(4).uniform(-1, 1, (2, 1, 1, 5)).astype(np.float32)
    result = Interp(**config)(batch).numpy()
    np.testing.assert_array_equal(result, np.broadcast_to(batch, (2, out_h, out_w, 5)))


def test_interp_output_shape_in_a_functional_model():
    inputs = keras.Input((12, 10, 7))
    assert Interp(zoom_factor=8)(inputs).shape == (None, 89, 73, 7)
    assert Interp(height=60, width=30)(inputs).shape == (None, 60, 30, 7)


@pytest.mark.parametrize("config", [{"height": 33, "width": 9}, {"zoom_factor": 8}])
def test_interp_rebuilt_from_its_config_computes_the_same(config):
    batch = np.random.default_rng(5).uniform(-1, 1, (1, 5, 4, 2)).astype(np.float32)
    layer = Interp(**config)
    rebuilt = Interp.from_config(layer.get_config())
    np.testing.assert_array_equal(rebuilt(batch).numpy(), layer(batch).numpy())


@pytest.mark.parametrize(
    "config", [{}, {"height": 5}, {"width": 5}, {"height": 5, "width": 5, "zoom_factor": 8}]
)
def test_interp_refuses_an_ambiguous_size(config):
    with pytest.raises(ValueError, match="height.*zoom_factor|zoom_factor.*height|height and width"):
        Interp(**config)


# ---------------------------------------------------------------------------------------
# PyramidConvolution against Interp + Concat + Convolution formed explicitly


@pytest.mark.parametrize(
    "side, branch_sides",
    [((60, 60), [(6, 6), (3, 3), (2, 2), (1, 1)]), ((12, 7), [(4, 7), (1, 1), (3, 2)]), ((5, 9), [(5, 9)])],
)
def test_pyramid_convolution_is_the_convolution_of_the_upsampled_concatenation(side, branch_sides):
    rng = np.random.default_rng(7)
    features = rng.standard_normal((2, *side, 5), dtype=np.float32)
    branches = [rng.standard_normal((2, *branch_side, 3), dtype=np.float32) for branch_side in branch_sides]
    kernel = rng.standard_normal((3, 3, 5 + 3 * len(branches), 4), dtype=np.float32)
    layer = PyramidConvolution(4)
    layer.build([array.shape for array in [features, *branches]])
    layer.set_weights([kernel])
    result = layer([features, *branches]).numpy()
    upsampled = [caffe_interp_batch(branch, *side) for branch in branches]
    concatenated = np.concatenate([features, *upsampled], axis=-1)
    reference = tf.nn.conv2d(concatenated, kernel, 1, [[0, 0], [1, 1], [1, 1], [0, 0]]).numpy()
    assert result.shape == (2, *side, 4)
    np.testing.assert_allclose(result, reference, rtol=0, atol=2e-5 * np.abs(reference).max())


def test_pyramid_convolution_output_shape_in_a_functional_model():
    inputs = [keras.Input((12, 12, 8)), keras.Input((2, 2, 4)), keras.Input((1, 1, 4))]
    layer = PyramidConvolution(6)
    assert layer(inputs).shape == (None, 12, 12, 6)
    assert tuple(layer.kernel.shape) == (3, 3, 16, 6)


# ---------------------------------------------------------------------------------------
# The networks against the prototxts


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_weighted_layers_are_the_caffe_convolutions_and_bns(model_name, native_models):
    model = native_models[model_name]
    layers = deploy_layers(model_name)
    caffe = {keras_name(layer["name"]) for layer in layers if layer["type"] in ("Convolution", "BN")}
    weighted = [layer.name for layer in model.layers if layer.weights]
    assert len(weighted) == len(set(weighted)) == WEIGHTED_LAYERS[model_name]
    assert set(weighted) == caffe


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_caffe_layer_names_spot_check(model_name, native_models):
    names = {layer.name for layer in native_models[model_name].layers}
    for name in SPOT_CHECKED_NAMES:
        assert name in names
    assert ("conv4_23_1x1_increase" in names) == (DEPTHS[model_name] == 101)
    assert ("conv4_6_1x1_increase_bn" in names) and ("conv4_24_1x1_increase" not in names)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_convolutions_have_the_prototxt_settings(model_name, native_models):
    model = native_models[model_name]
    layers = deploy_layers(model_name)
    in_channels = caffe_input_channels(layers, NATIVE_SIZES[model_name])
    for layer in layers:
        if layer["type"] != "Convolution":
            continue
        params = int_params(layer)
        conv = model.get_layer(keras_name(layer["name"]))
        kernel, out_channels = params["kernel_size"], params["num_output"]
        kernel_shape = (kernel, kernel, in_channels[layer["name"]], out_channels)
        assert tuple(conv.kernel.shape) == kernel_shape, layer["name"]
        assert conv.strides == (params.get("stride", 1),) * 2, layer["name"]
        assert conv.dilation_rate == (params.get("dilation", 1),) * 2, layer["name"]
        assert conv.use_bias == (layer["params"].get("bias_term") != "false"), layer["name"]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_every_caffe_blob_has_the_caffe_shape(model_name, native_models):
    """Convolution, BN, Pooling, Eltwise and Interp outputs, by Caffe's size arithmetic.

    The pyramid's upsampled branches and their concatenation exist only inside conv5_4.
    """
    model = native_models[model_name]
    shapes = caffe_blob_shapes(deploy_layers(model_name), NATIVE_SIZES[model_name])
    checked = 0
    for layer in deploy_layers(model_name):
        if layer["type"] in ("ReLU", "Dropout") or layer["name"] in PYRAMID_BLOBS:
            continue
        output = model.get_layer(keras_name(layer["name"])).output
        assert tuple(output.shape[1:]) == shapes[layer["name"]], layer["name"]
        checked += 1
    assert checked > WEIGHTED_LAYERS[model_name]


SPEC_SIDES = {
    473: {"conv1_1_3x3_s2": 237, "conv1_3_3x3": 237, "pool1_3x3_s2": 119, "conv2_3": 119,
          "conv3_1": 60, "conv5_3": 60, "conv6": 60},
    713: {"conv1_1_3x3_s2": 357, "conv1_3_3x3": 357, "pool1_3x3_s2": 179, "conv2_3": 179,
          "conv3_1": 90, "conv5_3": 90, "conv6": 90},
}


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_feature_map_sides_are_those_of_the_deploy_nets(model_name, native_models):
    model = native_models[model_name]
    size = NATIVE_SIZES[model_name]
    for name, side in SPEC_SIDES[size].items():
        assert tuple(model.get_layer(name).output.shape[1:3]) == (side, side), name
    assert model.get_layer("conv5_3").output.shape[3] == 2048
    assert model.get_layer("conv5_4").kernel.shape == (3, 3, 4096, 512)
    for bins in PYRAMID_BINS:
        assert model.get_layer(f"conv5_3_pool{bins}").output.shape[1:] == (bins, bins, 2048)
    assert model.output.shape == (None, size, size, CLASSES[model_name])


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_pyramid_is_concatenated_in_caffe_order(model_name, native_models):
    conv5_4 = native_models[model_name].get_layer("conv5_4")
    sources = [tensor._keras_history.operation.name for tensor in conv5_4.input]
    assert sources == ["conv5_3_relu"] + [f"conv5_3_pool{bins}_conv_relu" for bins in (6, 3, 2, 1)]
    side = SPEC_SIDES[NATIVE_SIZES[model_name]]["conv5_3"]
    assert [tuple(tensor.shape[1:]) for tensor in conv5_4.input] == [
        (side, side, 2048), (6, 6, 512), (3, 3, 512), (2, 2, 512), (1, 1, 512)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_conv3_1_stride_sits_where_the_prototxt_puts_it(model_name, native_models):
    model = native_models[model_name]
    on_3x3 = DEPTHS[model_name] == 101
    assert model.get_layer("conv3_1_1x1_reduce").strides == ((1, 1) if on_3x3 else (2, 2))
    assert model.get_layer("conv3_1_3x3").strides == ((2, 2) if on_3x3 else (1, 1))
    assert model.get_layer("conv3_1_1x1_proj").strides == (2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_batch_norms_use_caffe_epsilon(model_name, native_models):
    model = native_models[model_name]
    norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == (WEIGHTED_LAYERS[model_name] - 1) // 2
    for layer in norms:
        assert layer.epsilon == pytest.approx(CAFFE_BN_EPSILON, rel=1e-6), layer.name


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_only_conv6_has_a_bias(model_name, native_models):
    convs = [layer for layer in native_models[model_name].layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == (WEIGHTED_LAYERS[model_name] + 1) // 2
    assert [layer.name for layer in convs if layer.use_bias] == ["conv6"]
    assert tuple(native_models[model_name].get_layer("conv6").bias.shape) == (CLASSES[model_name],)


@pytest.mark.slow
@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_parameter_count_is_that_of_the_prototxt(model_name, native_models):
    layers = deploy_layers(model_name)
    in_channels = caffe_input_channels(layers, NATIVE_SIZES[model_name])
    caffe_count = 0
    for layer in layers:
        params = int_params(layer)
        if layer["type"] == "Convolution":
            caffe_count += params["kernel_size"] ** 2 * in_channels[layer["name"]] * params["num_output"]
            caffe_count += params["num_output"] if layer["params"].get("bias_term") != "false" else 0
        elif layer["type"] == "BN":
            caffe_count += 4 * in_channels[layer["name"]]
    assert caffe_count == PARAMETERS[model_name]
    assert native_models[model_name].count_params() == PARAMETERS[model_name]


def test_small_supported_size_builds_the_scaled_network(small_model50):
    """The shapes at SMALL_SIZE; the values of this network (small_model50) are checked against the prototxt
    computed with tf.nn ops in test_network_computes_what_the_prototxt_computes."""
    side = (SMALL_SIZE + 7) // 8
    assert caffe_feature_side(SMALL_SIZE) == side
    assert small_model50.get_layer("conv5_3").output.shape[1:3] == (side, side)
    for bins in PYRAMID_BINS:
        assert small_model50.get_layer(f"conv5_3_pool{bins}").output.shape[1:3] == (bins, bins)
        assert small_model50.get_layer(f"conv5_3_pool{bins}_conv").output.shape[1:3] == (bins, bins)
    assert small_model50.output.shape == (None, SMALL_SIZE, SMALL_SIZE, 150)


@pytest.mark.slow
def test_another_supported_size_builds_and_computes_what_caffe_computes(synthetic_model, tmp_path):
    """pspnet101_cityscapes at 233 px (not its 713): the shapes, and the logits against OpenCV's Caffe
    running the deploy prototxt rendered at 233 px, with the session's synthetic weights (they do not
    depend on the crop size) converted by weight_converter.py."""
    model = build_pspnet("pspnet101_cityscapes", 233)
    assert model.output.shape == (None, 233, 233, 19)
    assert model.get_layer("conv5_3").output.shape[1:3] == (caffe_feature_side(233),) * 2

    synthetic = synthetic_model("pspnet101_cityscapes")
    load_weights(model, synthetic.converted_h5)
    config = dataclasses.replace(models.RELEASED_MODELS["pspnet101_cityscapes"], crop_size=233)
    prototxt = tmp_path / "pspnet101_cityscapes_233.prototxt"
    prototxt.write_text(caffe_net.deploy_prototxt(config))
    image = synthetic_image(233, 233)
    reference = opencv_logits(opencv_net(prototxt, synthetic.weights), image)
    logits = np.asarray(model(image, training=False))[0]
    assert logits.shape == reference.shape == (233, 233, 19)
    assert reference.std() > 1.0 and len(np.unique(reference.argmax(axis=-1))) >= 3
    np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-4 * float(reference.max() - reference.min()))
    assert (logits.argmax(axis=-1) == reference.argmax(axis=-1)).mean() > 0.999


def test_unsupported_sizes_are_refused():
    """Every size at which the Caffe net does not close up raises, before building anything.

    The net closes up where the pyramid bins tile conv5_3 exactly and the x8 Interp gives
    back the input size.
    """
    supported = []
    for size in range(1, 760):
        side = caffe_feature_side(size)
        if side > 0 and side % 6 == 0 and side + (side - 1) * 7 == size:
            supported.append(size)
            continue
        with pytest.raises(ValueError) as raised:
            build_pspnet("pspnet50_ade20k", size)
        assert re.search(rf"(?<!\d){size}(?!\d)", str(raised.value)), str(raised.value)
    assert supported == list(range(41, 760, 48))


@pytest.mark.parametrize("size", [500, 512, 480, 472])
def test_unsupported_size_message_names_the_size_and_a_supported_one(size):
    with pytest.raises(ValueError, match=rf"\b{size}\b is not a supported crop size") as raised:
        build_pspnet("pspnet101_voc2012", size)
    assert "473" in str(raised.value)


@pytest.mark.parametrize("model_name", ["pspnet50_voc2012", "pspnet152_ade20k", ""])
def test_unknown_model_name_is_refused(model_name):
    with pytest.raises(ValueError, match=f"unknown model '{model_name}'"):
        build_pspnet(model_name)


@pytest.mark.parametrize("model_name", ["pspnet50_ade20k", "pspnet101_voc2012"])
def test_network_computes_what_the_prototxt_computes(model_name, small_image, small_model50, weights50):
    """The whole net at the small size against the prototxt run with tf.nn ops (scaled pyramid)."""
    if model_name == "pspnet50_ade20k":
        model, weights = small_model50, weights50
    else:
        model = build_pspnet(model_name, SMALL_SIZE)
        weights = random_weights(model, seed=101)
    set_weights_by_name(model, weights)
    logits = logits_of(model, small_image)
    reference = caffe_forward(deploy_layers(model_name), weights, small_image, caffe_feature_side(SMALL_SIZE))
    assert np.isfinite(reference).all() and reference.std() > 1e-3
    np.testing.assert_allclose(logits, reference, rtol=1e-3, atol=1e-3 * np.abs(reference).max())


# ---------------------------------------------------------------------------------------
# load_weights


def test_weights_error_is_a_value_error():
    assert issubclass(WeightsError, ValueError)


def test_load_weights_fills_every_layer_and_computes_what_set_weights_gives(
    weights_file50, small_model50, weights50, small_image, reference_logits50
):
    scramble(small_model50)
    load_weights(small_model50, weights_file50)
    assert_holds(small_model50, weights50)
    np.testing.assert_array_equal(logits_of(small_model50, small_image), reference_logits50)


def test_keras_reads_the_test_files_alike(weights_file50, small_model50, weights50):
    """Keras' own legacy by-name loader reads the files written here: they are genuine Keras-2 files."""
    scramble(small_model50)
    small_model50.load_weights(weights_file50, by_name=True)
    assert_holds(small_model50, weights50)


@pytest.mark.slow
def test_load_weights_reaches_every_pspnet101_layer(tmp_path, native_models):
    model = native_models["pspnet101_voc2012"]
    shapes = weight_shapes(model)
    path = tmp_path / "pspnet101_voc2012.h5"
    write_keras2_weights(path, keras2_layer_list(model, shapes))
    scramble(model)
    load_weights(model, path)
    zeros = {
        name: {weight: np.zeros(shape, np.float32) for weight, shape in layer.items()}
        for name, layer in shapes.items()
    }
    assert_holds(model, zeros)


@pytest.mark.slow
def test_missing_layer_is_named(tmp_path, native_models):
    model = native_models["pspnet50_ade20k"]
    shapes = weight_shapes(model)
    del shapes["conv4_2_3x3_bn"]
    path = tmp_path / "missing.h5"
    write_keras2_weights(path, keras2_layer_list(model, shapes))
    message = raised_message(model, path)
    assert str(path) in message and names_layer(message, "conv4_2_3x3_bn"), message


@pytest.mark.slow
def test_unknown_layer_is_named(tmp_path, native_models):
    model = native_models["pspnet50_ade20k"]
    entries = keras2_layer_list(model, weight_shapes(model)) + [("conv7", {"kernel": (1, 1, 512, 150)})]
    path = tmp_path / "unknown.h5"
    write_keras2_weights(path, entries)
    message = raised_message(model, path)
    assert str(path) in message and names_layer(message, "conv7"), message


@pytest.mark.slow
def test_pspnet101_weights_do_not_load_into_pspnet50(tmp_path, native_models):
    model50, model101 = native_models["pspnet50_ade20k"], native_models["pspnet101_voc2012"]
    path = tmp_path / "pspnet101_voc2012.h5"
    write_keras2_weights(path, keras2_layer_list(model101, weight_shapes(model101)))
    message = raised_message(model50, path)
    extra = set(weight_shapes(model101)) - set(weight_shapes(model50)) | {"conv6"}
    assert str(path) in message and any(names_layer(message, name) for name in extra), message


@pytest.mark.slow
def test_shape_mismatch_is_named(tmp_path, native_models):
    model = native_models["pspnet50_ade20k"]
    shapes = weight_shapes(model)
    shapes["conv5_4"] = {"kernel": (3, 3, 4096, 256)}
    path = tmp_path / "mismatch.h5"
    write_keras2_weights(path, keras2_layer_list(model, shapes))
    message = raised_message(model, path)
    assert str(path) in message and names_layer(message, "conv5_4"), message


@pytest.mark.slow
def test_21_class_weights_do_not_load_into_the_19_class_model_and_change_nothing(tmp_path, native_models):
    voc, cityscapes = native_models["pspnet101_voc2012"], native_models["pspnet101_cityscapes"]
    path = tmp_path / "pspnet101_voc2012.h5"
    write_keras2_weights(path, keras2_layer_list(voc, weight_shapes(voc)))
    scramble(cityscapes)
    message = raised_message(cityscapes, path)
    assert str(path) in message and names_layer(message, "conv6"), message
    for variable in cityscapes.weights:
        assert (variable.numpy() == SCRAMBLED).all(), variable.path


@pytest.mark.slow
def test_file_that_is_not_hdf5_is_named(tmp_path, native_models):
    path = tmp_path / "pspnet50_ade20k.h5"
    path.write_text("<!DOCTYPE html><html><body>Dropbox - file not found</body></html>\n")
    message = raised_message(native_models["pspnet50_ade20k"], path)
    assert str(path) in message, message


@pytest.mark.slow
def test_missing_file_is_named(tmp_path, native_models):
    path = tmp_path / "absent" / "pspnet50_ade20k.h5"
    message = raised_message(native_models["pspnet50_ade20k"], path)
    assert str(path) in message, message


@pytest.mark.slow
def test_dataset_missing_from_its_layer_group_is_named(tmp_path, native_models):
    model = native_models["pspnet50_ade20k"]
    path = tmp_path / "truncated.h5"
    write_keras2_weights(path, keras2_layer_list(model, weight_shapes(model)))
    with h5py.File(path, "r+") as handle:
        del handle["conv5_4/conv5_4/kernel:0"]
    message = raised_message(model, path)
    assert str(path) in message and names_layer(message, "conv5_4"), message
