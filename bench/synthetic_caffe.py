"""Synthetic Caffe PSPNet weights and an independent Caffe implementation to check against.

- A protobuf wire-format writer for .caffemodel files (independent of the protobuf
  library that caffe_net reads them with), with the encodings a real file may use:
  `shape` or legacy num/channels/height/width dims, packed or unpacked repeated
  fields, float or double data, and `layer` or legacy V1 `layers` messages.
- `synthetic_weights`: seeded random weights for a deploy prototxt whose logits have a
  useful spread (neither flat nor one-hot) through all 101 layers.
- `opencv_net` / `opencv_logits`: the net run by OpenCV's dnn module (its Caffe importer,
  opencv-python-headless 4.x), with each of the fork's BN layers expressed as BVLC
  BatchNorm + Scale.

- `SyntheticModel`: one released model with these weights, its rendered prototxt,
  its .caffemodel and the .h5 that weight_converter.py (run as a command) makes of it;
  what the tests' session fixtures and the benchmarks build on.

The prototxts are read with regular expressions over their layer blocks, not with
caffe_net's parser. Imported as `bench.synthetic_caffe`, with the project root on the
module path (pytest.ini's pythonpath, or `python -m bench.<name>` from the root).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from functools import cached_property
from pathlib import Path

import cv2
import h5py
import numpy as np

# Field numbers of caffe.proto (hszhao/PSPNet, src/caffe/proto/caffe.proto), written independently of caffe_net.py.
NET_NAME = 1
NET_LAYERS_V1 = 2
NET_LAYER = 100
LAYER_NAME = 1
LAYER_TYPE = 2
LAYER_BOTTOM = 3
LAYER_TOP = 4
LAYER_BLOBS = 7
V1_LAYER_NAME = 4
V1_LAYER_TYPE = 5
V1_LAYER_BLOBS = 6
V1_CONVOLUTION = 4
BLOB_LEGACY_DIMS = (1, 2, 3, 4)
BLOB_DATA = 5
BLOB_SHAPE = 7
BLOB_DOUBLE_DATA = 8
SHAPE_DIM = 1
WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_BYTES = 2
WIRE_FIXED32 = 5

BN_EPSILON = 1e-5
BGR_MEAN = np.array([103.939, 116.779, 123.68], dtype=np.float32)

# Synthetic weight statistics (chosen empirically, see synthetic_weights).
PIXEL_RMS = 64.0
BN_SLOPE_RANGE = (0.8, 1.2)
RESIDUAL_BN_SLOPE_RANGE = (0.1, 0.3)
BN_BIAS_STD = 0.1
BN_MEAN_STD = 0.2
BN_VARIANCE_RANGE = (0.5, 1.5)
CLASSIFIER_GAIN = 7.5
CLASSIFIER_BIAS_STD = 0.5


# --------------------------------------------------------------------------------------
# Protobuf wire-format writer


def varint(value):
    """The varint encoding of a non-negative int."""
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def tag(field, wire_type):
    """The key of a field."""
    return varint(field << 3 | wire_type)


def bytes_field(field, payload):
    """A length-delimited field (string, bytes, sub-message or packed values)."""
    return tag(field, WIRE_BYTES) + varint(len(payload)) + payload


def varint_field(field, value):
    """A varint field."""
    return tag(field, WIRE_VARINT) + varint(value)


def real_values(field, values, dtype, packed):
    """A repeated float (dtype '<f4') or double ('<f8') field, packed or one field per value."""
    values = np.ascontiguousarray(values, dtype=dtype).reshape(-1)
    if packed:
        return bytes_field(field, values.tobytes())
    wire_type = WIRE_FIXED32 if np.dtype(dtype).itemsize == 4 else WIRE_FIXED64
    key = tag(field, wire_type)
    records = np.empty(values.size, dtype=[("key", f"V{len(key)}"), ("value", dtype)])
    records["key"] = np.void(key)
    records["value"] = values
    return records.tobytes()


def blob_message(array, legacy_dims=False, packed=True, double=False, shape=None):
    """A serialized BlobProto holding the values of `array`, with `shape` (default array.shape)."""
    shape = array.shape if shape is None else shape
    if legacy_dims:
        padded = (1,) * (4 - len(shape)) + tuple(shape)
        message = b"".join(varint_field(field, dim) for field, dim in zip(BLOB_LEGACY_DIMS, padded))
    elif packed:
        message = bytes_field(BLOB_SHAPE, bytes_field(SHAPE_DIM, b"".join(varint(dim) for dim in shape)))
    else:
        message = bytes_field(BLOB_SHAPE, b"".join(varint_field(SHAPE_DIM, dim) for dim in shape))
    if double:
        return message + real_values(BLOB_DOUBLE_DATA, array, "<f8", packed)
    return message + real_values(BLOB_DATA, array, "<f4", packed)


def layer_message(name, layer_type, blobs, v1=False, **blob_options):
    """A serialized LayerParameter (or V1LayerParameter) with a name, type, bottom/top and blobs.

    Each blob is an array, or bytes already encoded by blob_message.
    """
    encoded_blobs = [
        blob if isinstance(blob, bytes) else blob_message(np.asarray(blob), **blob_options) for blob in blobs
    ]
    if v1:
        parts = [bytes_field(V1_LAYER_NAME, name.encode())]
        if layer_type == "Convolution":
            parts.append(varint_field(V1_LAYER_TYPE, V1_CONVOLUTION))
        parts += [bytes_field(V1_LAYER_BLOBS, blob) for blob in encoded_blobs]
    else:
        parts = [
            bytes_field(LAYER_NAME, name.encode()),
            bytes_field(LAYER_TYPE, layer_type.encode()),
            bytes_field(LAYER_BOTTOM, b"bottom"),
            bytes_field(LAYER_TOP, b"top"),
        ]
        parts += [bytes_field(LAYER_BLOBS, blob) for blob in encoded_blobs]
    return b"".join(parts)


def caffemodel_bytes(layers, v1=False, **blob_options):
    """A serialized NetParameter of `layers` = [(name, type, [arrays in Caffe shapes])].

    `blob_options`: legacy_dims, packed, double (see blob_message).
    """
    field = NET_LAYERS_V1 if v1 else NET_LAYER
    parts = [bytes_field(NET_NAME, b"synthetic_pspnet")]
    parts += [bytes_field(field, layer_message(*layer, v1=v1, **blob_options)) for layer in layers]
    return b"".join(parts)


def write_caffemodel(path, layers, **options):
    """Writes `layers` (see caffemodel_bytes) to the .caffemodel file `path`."""
    Path(path).write_bytes(caffemodel_bytes(layers, **options))


# --------------------------------------------------------------------------------------
# Prototxt reading (regular expressions over a deploy prototxt's layer blocks)


def layer_blocks(text):
    """(start, end) character spans of the top-level `layer { ... }` blocks of a prototxt."""
    spans = []
    for match in re.finditer(r"^layer \{", text, re.MULTILINE):
        depth = 0
        for pos in range(match.start(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            if text[pos] == "}" and depth == 0:
                spans.append((match.start(), pos + 1))
                break
    return spans


def layer_field(block, key):
    """The values of a direct (2-space indented) field of a layer block."""
    return re.findall(rf'^  {key}: "?([^"\n]*)"?$', block, re.MULTILINE)


def caffe_layers(prototxt_path):
    """[(name, type, bottoms, tops, block text)] of every layer of a deploy prototxt."""
    text = Path(prototxt_path).read_text()
    layers = []
    for start, end in layer_blocks(text):
        block = text[start:end]
        (name,), (layer_type,) = layer_field(block, "name"), layer_field(block, "type")
        layers.append((name, layer_type, layer_field(block, "bottom"), layer_field(block, "top"), block))
    return layers


def weight_shapes(prototxt_path):
    """{layer name: [Caffe blob shapes]} of the Convolution and BN layers, in net order."""
    channels = {"data": 3}
    shapes = {}
    for name, layer_type, bottoms, tops, block in caffe_layers(prototxt_path):
        if layer_type == "Convolution":
            outputs = int(re.search(r"num_output: (\d+)", block).group(1))
            kernel = int(re.search(r"kernel_size: (\d+)", block).group(1))
            shapes[name] = [(outputs, channels[bottoms[0]], kernel, kernel)]
            if "bias_term: false" not in block:
                shapes[name].append((outputs,))
            channels[tops[0]] = outputs
        elif layer_type == "Concat":
            channels[tops[0]] = sum(channels[bottom] for bottom in bottoms)
        else:
            if layer_type == "BN":
                shapes[name] = [(1, channels[bottoms[0]], 1, 1)] * 4
            channels[tops[0]] = channels[bottoms[0]]
    return shapes


# --------------------------------------------------------------------------------------
# Synthetic weights


def bn_blobs(rng, channels, slope_range):
    """Slope, bias, mean, variance of a BN layer, each (1, C, 1, 1)."""
    blobs = [
        rng.uniform(*slope_range, channels),
        rng.normal(0.0, BN_BIAS_STD, channels),
        rng.normal(0.0, BN_MEAN_STD, channels),
        rng.uniform(*BN_VARIANCE_RANGE, channels),
    ]
    return [blob.reshape(1, channels, 1, 1).astype(np.float32) for blob in blobs]


def conv_blobs(rng, shapes):
    """Kernel (and bias) of a convolution with the given Caffe blob shapes.

    He-normal; the first convolution (3 input channels) is scaled for mean-subtracted
    pixels, the classifier (the one with a bias) for logits of std ~3. Other kernels are
    centred (zero mean per output channel), so features vary over the image rather than
    piling up per-channel constants.
    """
    kernel_shape = shapes[0]
    fan_in = int(np.prod(kernel_shape[1:]))
    if kernel_shape[1] == 3:
        kernel = rng.normal(0.0, 1.0 / (np.sqrt(fan_in) * PIXEL_RMS), kernel_shape)
    else:
        gain = CLASSIFIER_GAIN if len(shapes) == 2 else np.sqrt(2.0)
        kernel = rng.normal(0.0, gain / np.sqrt(fan_in), kernel_shape)
        kernel -= kernel.mean(axis=(1, 2, 3), keepdims=True)
    blobs = [kernel] + [rng.normal(0.0, CLASSIFIER_BIAS_STD, shape) for shape in shapes[1:]]
    return [blob.astype(np.float32) for blob in blobs]


def synthetic_weights(prototxt_path, seed):
    """{Caffe layer name: [float32 blobs in Caffe shapes]} for every weighted layer, seeded.

    Chosen so the logits have a useful spread (std ~3, softmax far from one-hot,
    varying over the image) and activations stay moderate through ResNet-101: see
    conv_blobs; BN statistics are random but moderate, with the `*_1x1_increase` BN
    slopes small (0.1-0.3) so residual sums grow slowly.
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shapes in weight_shapes(prototxt_path).items():
        if len(shapes) == 4:
            slope_range = RESIDUAL_BN_SLOPE_RANGE if name.endswith("_1x1_increase/bn") else BN_SLOPE_RANGE
            weights[name] = bn_blobs(rng, shapes[0][1], slope_range)
        else:
            weights[name] = conv_blobs(rng, shapes)
    return weights


def caffemodel_layers(prototxt_path, weights):
    """[(name, type, blobs)] of a caffemodel holding `weights` in the prototxt's layer order."""
    types = {name: layer_type for name, layer_type, *_ in caffe_layers(prototxt_path)}
    return [(name, types[name], blobs) for name, blobs in weights.items()]


def synthetic_image(size, seed):
    """A (1, size, size, 3) float32 BGR mean-subtracted image: smooth colour blobs plus noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    pixels = np.clip(smooth + rng.normal(0, 20, smooth.shape), 0, 255).astype(np.float32)
    return (pixels - BGR_MEAN)[None]


# --------------------------------------------------------------------------------------
# OpenCV dnn oracle


def bvlc_batch_norm_text(name, bottom, top):
    """Prototxt text of the BVLC BatchNorm + Scale pair computing the fork's BN layer `name`.

    The BatchNorm layer is named `<name>/norm`; the Scale layer carries the BN's name,
    so its output is the BN output.
    """
    return (
        f'layer {{\n  name: "{name}/norm"\n  type: "BatchNorm"\n  bottom: "{bottom}"\n  top: "{top}"\n'
        f"  batch_norm_param {{\n    use_global_stats: true\n    eps: {BN_EPSILON}\n  }}\n}}\n"
        f'layer {{\n  name: "{name}"\n  type: "Scale"\n  bottom: "{top}"\n  top: "{top}"\n'
        f"  scale_param {{\n    bias_term: true\n  }}\n}}"
    )


def opencv_net(prototxt_path, weights, fuse_layers=True):
    """The net of `prototxt_path` with `weights` (see synthetic_weights), loaded by OpenCV dnn.

    Winograd convolution is turned off so OpenCV computes plain float32 convolutions.
    With `fuse_layers` OpenCV folds BatchNorm/Scale/ReLU into the preceding convolution
    at the first forward, after which those intermediate outputs can no longer be read;
    pass False to read every layer's output with opencv_outputs.
    """
    text = Path(prototxt_path).read_text()
    layers = []
    pieces = []
    previous_end = 0
    for (start, end), (name, layer_type, bottoms, tops, _) in zip(layer_blocks(text), caffe_layers(prototxt_path)):
        if layer_type == "BN":
            slope, bias, mean, variance = (blob.reshape(-1) for blob in weights[name])
            pieces += [text[previous_end:start], bvlc_batch_norm_text(name, bottoms[0], tops[0])]
            previous_end = end
            layers.append((f"{name}/norm", "BatchNorm", [mean, variance, np.ones(1, np.float32)]))
            layers.append((name, "Scale", [slope, bias]))
        elif name in weights:
            layers.append((name, layer_type, weights[name]))
    pieces.append(text[previous_end:])
    with tempfile.TemporaryDirectory() as directory:
        prototxt = Path(directory, "bvlc.prototxt")
        caffemodel = Path(directory, "bvlc.caffemodel")
        prototxt.write_text("".join(pieces))
        write_caffemodel(caffemodel, layers)
        net = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    net.enableWinograd(False)
    net.enableFusion(fuse_layers)
    return net


def opencv_outputs(net, image, layer_names):
    """{Caffe layer name: (H, W, C) float32 output} for a (1, H, W, 3) BGR mean-subtracted image."""
    net.setInput(np.ascontiguousarray(image.transpose(0, 3, 1, 2), dtype=np.float32))
    outputs = net.forward(list(layer_names))
    return {name: np.asarray(blob)[0].transpose(1, 2, 0) for name, blob in zip(layer_names, outputs)}


def opencv_logits(net, image):
    """The (H, W, classes) float32 logits (conv6_interp) for a (1, H, W, 3) BGR mean-subtracted image."""
    return opencv_outputs(net, image, ["conv6_interp"])["conv6_interp"]


def write_classifier_only_weights(path, classes):
    """A Keras-2 weights file holding only a zero conv6 of `classes` outputs: valid HDF5, wrong net."""
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = np.array([b"conv6"])
        group = handle.create_group("conv6")
        group.attrs["weight_names"] = np.array([b"conv6/kernel:0", b"conv6/bias:0"])
        group.create_dataset("conv6/kernel:0", data=np.zeros((1, 1, 512, classes), np.float32))
        group.create_dataset("conv6/bias:0", data=np.zeros(classes, np.float32))
    return path


# --------------------------------------------------------------------------------------
# One released model with synthetic weights, converted by weight_converter.py

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONVERTER = PROJECT_ROOT / "weight_converter.py"
WEIGHT_SEEDS = {"pspnet50_ade20k": 50, "pspnet101_voc2012": 101, "pspnet101_cityscapes": 713}


def converter_process(*args, cwd=None, converter=CONVERTER, **options):
    """Runs `python weight_converter.py *args` with the project on the module path; returns the CompletedProcess."""
    environment = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.run(
        [sys.executable, str(converter), *map(str, args)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        **options,
    )


def write_deploy_prototxt(name, directory):
    """Writes caffe_net's rendering of the deploy prototxt of `name` under the release's file name; returns its path."""
    from pspnet_keras import caffe_net
    from pspnet_keras import models

    path = Path(directory) / models.RELEASED_MODELS[name].caffe_prototxt
    path.write_text(caffe_net.deploy_prototxt(name))
    return path


class SyntheticModel:
    """One released PSPNet with synthetic weights; every artefact is built on first use.

    `converted_h5` is made by running a copy of the converter placed in `directory`
    on the caffemodel alone, without -o, so it also exercises recognising the model
    from its weights and the default output path weights/keras/<model>.h5 beside the
    script.
    """

    def __init__(self, name, directory):
        self.name = name
        self.directory = Path(directory)

    @cached_property
    def prototxt(self):
        """Path of the rendered deploy prototxt."""
        return write_deploy_prototxt(self.name, self.directory)

    @cached_property
    def weights(self):
        """{Caffe layer name: [float32 blobs in Caffe shapes]}."""
        return synthetic_weights(self.prototxt, WEIGHT_SEEDS[self.name])

    @cached_property
    def caffemodel(self):
        """Path of a .caffemodel in the release's encoding (LayerParameter, `shape`, packed float data)."""
        path = self.directory / f"{self.name}.caffemodel"
        write_caffemodel(path, caffemodel_layers(self.prototxt, self.weights))
        return path

    @cached_property
    def conversion(self):
        """The CompletedProcess of `weight_converter.py <caffemodel>` for a copy in `directory`."""
        converter = shutil.copy(CONVERTER, self.directory)
        return converter_process(self.caffemodel, converter=converter)

    @cached_property
    def converted_h5(self):
        """Path of the converter's output for this model."""
        result = self.conversion
        assert result.returncode == 0, result.stderr
        return self.directory / "weights" / "keras" / f"{self.name}.h5"
