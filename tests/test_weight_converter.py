"""caffe_net.py and weight_converter.py: the rendered deploy nets, reading, the written HDF5, every error path.

The expected HDF5 contents are derived here from the synthetic Caffe arrays with the
mapping of the 2017 Keras port's converter (kernel OIHW -> HWIO, BN slope/bias/mean/
variance -> gamma/beta/moving_mean/moving_variance, '/' -> '_'), not from the converter.
The caffemodels are written by bench/synthetic_caffe.py's own protobuf encoder.
"""

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np
import pytest
from google.protobuf import text_format

import layers_builder
import weight_converter
from bench.synthetic_caffe import blob_message
from bench.synthetic_caffe import caffemodel_layers
from bench.synthetic_caffe import write_caffemodel
from helpers import converter_process
from pspnet_keras import caffe_net
from pspnet_keras import models

MODEL_NAMES = ("pspnet50_ade20k", "pspnet101_voc2012", "pspnet101_cityscapes")
# The Caffe release's deploy prototxts, kept beside a clone of this project on its development machines only.
RELEASE_PROTOTXT_DIR = Path(__file__).resolve().parents[2] / "shared" / "caffe"
# Counted in the release's prototxts (evaluation/prototxt).
LAYER_COUNTS = {"pspnet50_ade20k": 205, "pspnet101_voc2012": 375, "pspnet101_cityscapes": 375}
WEIGHTED_LAYER_COUNTS = {"pspnet50_ade20k": 121, "pspnet101_voc2012": 223, "pspnet101_cityscapes": 223}
# The pyramid's pooling kernels (bins 1, 2, 3, 6) on the 60x60 (473) and 90x90 (713) conv5_3 map.
PYRAMID_KERNELS = {473: (60, 30, 20, 10), 713: (90, 45, 30, 15)}
BN_WEIGHT_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")
ERROR_PREFIX = "weight_converter.py: error: "
# Far below a converted PSPNet50 (187 MB).
FILE_SIZE_LIMIT = 16 << 20


class Result(NamedTuple):
    """What a run of the command gives: exit code and output."""

    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def command(capsys):
    """command(*args) -> Result of weight_converter.main(args) in this process (SIGTERM's handler restored after)."""
    handler = signal.getsignal(signal.SIGTERM)

    def run(*args):
        capsys.readouterr()
        code = weight_converter.main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    yield run
    signal.signal(signal.SIGTERM, handler)


def expected_keras_weights(caffe_name, blobs):
    """(Keras layer name, [(weight name, array)]) of a Caffe layer."""
    layer = caffe_name.replace("/", "_")
    if len(blobs) == 4:
        arrays = [(name, blob.reshape(-1)) for name, blob in zip(BN_WEIGHT_NAMES, blobs)]
    else:
        arrays = [("kernel", blobs[0].transpose(2, 3, 1, 0))] + [("bias", blob) for blob in blobs[1:]]
    return layer, [(f"{layer}/{name}:0", array) for name, array in arrays]


def decoded(names):
    """A bytes array attribute as a list of str."""
    return [name.decode("utf-8") for name in names]


def assert_weights_file(path, weights):
    """The HDF5 file at `path` holds exactly `weights` (Caffe arrays) in the Keras-2 save_weights layout."""
    expected = [expected_keras_weights(name, blobs) for name, blobs in weights.items()]
    with h5py.File(path, "r") as handle:
        assert decoded(handle.attrs["layer_names"]) == [layer for layer, _ in expected]
        assert handle.attrs["backend"] == b"tensorflow"
        assert handle.attrs["keras_version"].startswith(b"2.")
        assert sorted(handle) == sorted(layer for layer, _ in expected)
        for layer, arrays in expected:
            group = handle[layer]
            assert decoded(group.attrs["weight_names"]) == [name for name, _ in arrays]
            for name, array in arrays:
                dataset = group[name]
                assert dataset.dtype == np.float32
                np.testing.assert_array_equal(dataset[()], array, err_msg=f"{layer} {name}")


def assert_fails_cleanly(result, blamed, fragment, output):
    """One stderr line 'weight_converter.py: error: <blamed>: ...<fragment>...', exit 1, no output file."""
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{ERROR_PREFIX}{blamed}: "), lines[0]
    assert fragment in lines[0]
    assert not output.exists()
    assert not output.parent.exists() or os.listdir(output.parent) == []


def layer_named(net, name):
    """The layer `name` of a NetParameter."""
    (layer,) = [layer for layer in net.layer if layer.name == name]
    return layer


# --------------------------------------------------------------------------------------
# The rendered deploy nets


def test_renderings_are_the_release_deploy_nets():
    """caffe_net's renderings are the release's evaluation/prototxt files, field for field.

    The release's files are parsed strictly, so a field caffe_net does not declare
    (and would skip in a prototxt) fails here. The comparison also tells the stride of
    the 1x1 reduce (the 2017 Keras port's placement) from the release's stride on the
    3x3 of ResNet-101.
    """
    if not RELEASE_PROTOTXT_DIR.is_dir():
        pytest.skip(f"the Caffe release's deploy prototxts are not beside the clone ({RELEASE_PROTOTXT_DIR})")
    releases = {}
    for name, config in models.RELEASED_MODELS.items():
        text = (RELEASE_PROTOTXT_DIR / config.caffe_prototxt).read_text()
        releases[name] = text_format.Parse(text, caffe_net.NetParameter())
        rendering = caffe_net.deploy_net(name)
        assert caffe_net.net_difference(releases[name], rendering, name) is None
        assert releases[name] == rendering
    mutant = caffe_net.deploy_net("pspnet101_cityscapes")
    layer_named(mutant, "conv3_1_1x1_reduce").convolution_param.stride[:] = [2]
    layer_named(mutant, "conv3_1_3x3").convolution_param.stride[:] = [1]
    assert caffe_net.net_difference(releases["pspnet101_cityscapes"], mutant, "the mutant") == (
        "layer 43 ('conv3_1_1x1_reduce') has convolution_param { stride: 1 } "
        "where the mutant has convolution_param { stride: 2 }"
    )


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_rendering_has_the_release_structure(name):
    """Layer counts, input, classes and pyramid kernels of the release, without its files."""
    config = models.RELEASED_MODELS[name]
    net = caffe_net.deploy_net(name)
    assert len(net.layer) == LAYER_COUNTS[name]
    assert len(caffe_net.weight_shapes(net)) == WEIGHTED_LAYER_COUNTS[name]
    assert list(net.input) == ["data"]
    assert list(net.input_dim) == [1, 3, config.crop_size, config.crop_size]
    assert layer_named(net, "conv6").convolution_param.num_output == config.classes
    kernels = tuple(layer_named(net, f"conv5_3_pool{bins}").pooling_param.kernel_size for bins in (1, 2, 3, 6))
    assert kernels == PYRAMID_KERNELS[config.crop_size]
    assert list(layer_named(net, "conv5_3_concat").bottom) == [
        "conv5_3", "conv5_3_pool6_interp", "conv5_3_pool3_interp", "conv5_3_pool2_interp", "conv5_3_pool1_interp"
    ]
    assert net.layer[-1].name == "conv6_interp" and net.layer[-1].interp_param.zoom_factor == 8


@pytest.mark.parametrize("name, reduce_stride, middle_stride", [
    ("pspnet50_ade20k", 2, 1),
    ("pspnet101_voc2012", 1, 2),
    ("pspnet101_cityscapes", 1, 2),
])
def test_rendering_strides_conv3_1_where_the_release_does(name, reduce_stride, middle_stride):
    net = caffe_net.deploy_net(name)
    assert list(layer_named(net, "conv3_1_1x1_reduce").convolution_param.stride) == [reduce_stride]
    assert list(layer_named(net, "conv3_1_3x3").convolution_param.stride) == [middle_stride]
    assert list(layer_named(net, "conv3_1_1x1_proj").convolution_param.stride) == [2]
    strided = [layer.name for layer in net.layer if list(layer.convolution_param.stride) == [2]]
    assert len(strided) == 3


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_rendered_text_parses_back_to_the_net(name):
    assert caffe_net.parse_prototxt(caffe_net.deploy_prototxt(name)) == caffe_net.deploy_net(name)


def net_differing(edit):
    """pspnet50_ade20k's rendered net after edit(net), and where it differs from the unedited one."""
    net = caffe_net.deploy_net("pspnet50_ade20k")
    edit(net)
    return caffe_net.net_difference(net, caffe_net.deploy_net("pspnet50_ade20k"), "pspnet50_ade20k")


def test_net_difference_names_the_first_difference():
    def drop_pad(net):
        del net.layer[0].convolution_param.pad[:]

    def drop_input(net):
        del net.input[:]

    def add_layer(net):
        net.layer.add(name="extra", type="Softmax", bottom=["conv6_interp"], top=["prob"])

    def drop_last_layer(net):
        del net.layer[-1]

    assert net_differing(lambda net: None) is None
    assert net_differing(drop_pad) == (
        "layer 1 ('conv1_1_3x3_s2') has convolution_param { } where pspnet50_ade20k has convolution_param { pad: 1 }"
    )
    assert net_differing(drop_input) == 'no input where pspnet50_ade20k has input: "data"'
    assert net_differing(add_layer) == "layer 206 ('extra') is after the end of pspnet50_ade20k (205 layers)"
    assert net_differing(drop_last_layer) == (
        "it ends after 204 layers where pspnet50_ade20k goes on with 'conv6_interp' (205 layers)"
    )


def test_bn_layers_use_the_networks_epsilon():
    """The rendered BN layers leave eps at caffe.proto's default, which is the Keras network's."""
    bn = layer_named(caffe_net.deploy_net("pspnet50_ade20k"), "conv5_4/bn").bn_param
    assert not bn.HasField("eps")
    assert bn.eps == np.float32(layers_builder.BN_EPSILON)


def test_prototxt_option_writes_the_rendering(command, tmp_path):
    output = tmp_path / "deploy" / "pspnet101_VOC2012_473.prototxt"
    result = command("--prototxt", "pspnet101_voc2012", "-o", output)
    assert result == Result(0, f"wrote {output}\n", "")
    assert output.read_text(encoding="utf-8") == caffe_net.deploy_prototxt("pspnet101_voc2012")
    assert os.listdir(output.parent) == [output.name]
    result = command("--prototxt", "pspnet50_ade20k")
    assert result == Result(0, caffe_net.deploy_prototxt("pspnet50_ade20k"), "")


# --------------------------------------------------------------------------------------
# Reading and converting


def test_converted_layout_by_example(synthetic_model):
    """One hand-checked element per mapping rule: HWIO transpose and BN blob order."""
    model = synthetic_model("pspnet50_ade20k")
    caffe_kernel = model.weights["conv1_2_3x3"][0]
    slope, bias, mean, variance = model.weights["conv1_2_3x3/bn"]
    with h5py.File(model.converted_h5, "r") as handle:
        kernel = handle["conv1_2_3x3/conv1_2_3x3/kernel:0"]
        assert kernel.shape == (3, 3, 64, 64)
        assert kernel[2, 0, 5, 7] == caffe_kernel[7, 5, 2, 0]
        bn = handle["conv1_2_3x3_bn"]
        assert bn["conv1_2_3x3_bn/gamma:0"][3] == slope[0, 3, 0, 0]
        assert bn["conv1_2_3x3_bn/beta:0"][3] == bias[0, 3, 0, 0]
        assert bn["conv1_2_3x3_bn/moving_mean:0"][3] == mean[0, 3, 0, 0]
        assert bn["conv1_2_3x3_bn/moving_variance:0"][3] == variance[0, 3, 0, 0]
        assert handle["conv6/conv6/bias:0"].shape == (150,)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_converts_release_caffemodel_alone(name, synthetic_model):
    """Each released caffemodel is recognised and converts to weights/keras/<model>.h5 with every weighted layer."""
    model = synthetic_model(name)
    result = model.conversion
    default_output = model.directory / "weights" / "keras" / f"{name}.h5"
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {default_output} ({name}, {WEIGHTED_LAYER_COUNTS[name]} layers)\n"
    assert result.stderr == ""
    assert len(model.weights) == WEIGHTED_LAYER_COUNTS[name]
    assert os.listdir(model.converted_h5.parent) == [f"{name}.h5"]
    assert_weights_file(model.converted_h5, model.weights)


@pytest.mark.slow
def test_converts_with_the_release_prototxt(synthetic_model, command, tmp_path):
    """PROTOTXT CAFFEMODEL: the prototxt names the net; the file written is the same."""
    model = synthetic_model("pspnet101_cityscapes")
    output = tmp_path / "city.h5"
    result = command(model.prototxt, model.caffemodel, "-o", output)
    assert result == Result(0, f"wrote {output} (pspnet101_cityscapes, 223 layers)\n", "")
    assert_weights_file(output, model.weights)


SMALL_NET = [
    ("conv_a", "Convolution", [np.random.default_rng(1).normal(size=(4, 3, 3, 3))]),
    ("conv_a/bn", "BN", [np.random.default_rng(2 + i).normal(size=(1, 4, 1, 1)) for i in range(4)]),
    ("conv_a/relu", "ReLU", []),
    ("conv6", "Convolution", [np.random.default_rng(7).normal(size=(5, 4, 1, 1)), np.arange(5.0) / 3]),
]
ENCODINGS = {
    "release": {},
    "legacy_dims": {"legacy_dims": True},
    "unpacked": {"packed": False},
    "double_data": {"double": True},
    "v1_layers": {"v1": True},
    "all_legacy": {"legacy_dims": True, "packed": False, "double": True, "v1": True},
}


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_reads_every_blob_encoding(encoding, tmp_path):
    """Shapes and values survive each protobuf encoding; doubles are rounded once to float32."""
    options = ENCODINGS[encoding]
    path = tmp_path / "small.caffemodel"
    write_caffemodel(path, SMALL_NET, **options)
    layers = weight_converter.read_caffemodel(path)
    weighted = [(name, layer_type, blobs) for name, layer_type, blobs in SMALL_NET if blobs]
    assert list(layers) == [name for name, _, _ in weighted]
    for name, layer_type, blobs in weighted:
        layer = layers[name]
        assert layer.type == ("" if options.get("v1") else layer_type)
        assert len(layer.blobs) == len(blobs)
        for blob, array in zip(layer.blobs, blobs):
            shape, values = weight_converter.blob_array(blob)
            legacy_shape = (1,) * (4 - array.ndim) + array.shape
            assert shape == (legacy_shape if options.get("legacy_dims") else array.shape)
            assert values.dtype == np.float32
            np.testing.assert_array_equal(values, array.reshape(-1).astype(np.float32))


def reshaped_bn_blobs(weights):
    """`weights` with every BN blob stored as a (C,) vector instead of (1, C, 1, 1)."""
    return {name: [blob.reshape(-1) for blob in blobs] if len(blobs) == 4 else blobs for name, blobs in weights.items()}


FULL_NET_ENCODINGS = {
    # name: (BN blobs as (C,) vectors, encoding options, convert with the prototxt)
    "v1_legacy_dims_alone": (False, {"v1": True, "legacy_dims": True}, False),
    "bn_vectors_double_data_with_prototxt": (True, {"double": True}, True),
}


@pytest.mark.slow
@pytest.mark.parametrize("encoding", FULL_NET_ENCODINGS)
def test_converts_full_net_in_legacy_encodings(encoding, synthetic_model, command, tmp_path):
    """A whole PSPNet50 caffemodel in an old encoding, with an extra layer Caffe would ignore, converts identically."""
    model = synthetic_model("pspnet50_ade20k")
    bn_vectors, options, with_prototxt = FULL_NET_ENCODINGS[encoding]
    weights = reshaped_bn_blobs(model.weights) if bn_vectors else model.weights
    extra = ("conv4_24_aux", "Convolution", [np.ones((2, 2, 1, 1), np.float32)])
    caffemodel = tmp_path / "legacy.caffemodel"
    write_caffemodel(caffemodel, [extra] + caffemodel_layers(model.prototxt, weights), **options)
    output = tmp_path / "legacy.h5"
    inputs = [model.prototxt, caffemodel] if with_prototxt else [caffemodel]
    result = command(*inputs, "-o", output)
    assert result == Result(0, f"wrote {output} (pspnet50_ade20k, 121 layers)\n", "")
    assert_weights_file(output, model.weights)


@pytest.mark.slow
def test_output_option_creates_directories_and_replaces_file(synthetic_model, command, tmp_path):
    model = synthetic_model("pspnet50_ade20k")
    output = tmp_path / "a" / "b" / "out.h5"
    result = command(model.caffemodel, "--output", output)
    assert result.returncode == 0, result.stderr
    output.write_bytes(b"stale")
    result = command(model.caffemodel, "-o", output)
    assert result.returncode == 0, result.stderr
    assert os.listdir(output.parent) == ["out.h5"]
    assert_weights_file(output, model.weights)


def test_output_permissions_follow_the_umask(synthetic_model, command, tmp_path):
    model = synthetic_model("pspnet50_ade20k")
    output = tmp_path / "out.h5"
    previous = os.umask(0o027)
    try:
        result = command(model.caffemodel, "-o", output)
    finally:
        os.umask(previous)
    assert result.returncode == 0, result.stderr
    assert output.stat().st_mode & 0o777 == 0o640


def test_help_describes_usage(run_converter):
    result = run_converter("--help")
    assert result.returncode == 0
    assert result.stdout.startswith(
        "usage: weight_converter.py [-h] [-o OUT.h5] [PROTOTXT] CAFFEMODEL\n"
        "       weight_converter.py [-h] [-o FILE] --prototxt MODEL\n"
    )
    assert "weights/keras/<model>.h5" in result.stdout
    assert "python weight_converter.py weights/caffe/pspnet50_ADE20K.caffemodel" in result.stdout


@pytest.mark.parametrize("args, message", [
    ((), "expected CAFFEMODEL, or PROTOTXT and CAFFEMODEL"),
    (("a", "b", "c"), "expected CAFFEMODEL, or PROTOTXT and CAFFEMODEL"),
    (("--prototxt", "pspnet50_ade20k", "a.caffemodel"), "--prototxt takes no input files"),
    (("--prototxt", "pspnet18"), "argument --prototxt: invalid choice: 'pspnet18'"),
])
def test_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as raised:
        weight_converter.main(list(args))
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_convert_raises_conversion_error_naming_the_file(tmp_path):
    missing = tmp_path / "missing.caffemodel"
    with pytest.raises(weight_converter.ConversionError) as raised:
        weight_converter.convert(missing, output_path=tmp_path / "out.h5")
    assert raised.value.path == missing
    assert str(raised.value) == f"{missing}: no such file"
    assert not (tmp_path / "out.h5").exists()


# --------------------------------------------------------------------------------------
# Caffemodels that are not a released net, or not the prototxt's


def assert_not_released(result, caffemodel, output, reason, count, names):
    """The one-line refusal of a caffemodel that is not one of the released nets."""
    assert_fails_cleanly(result, caffemodel, "", output)
    assert result.stderr == (
        f"{ERROR_PREFIX}{caffemodel}: not one of the released PSPNet nets ({reason}); "
        f"it holds {count} layers with weights: {names}\n"
    )


def test_refuses_caffemodel_of_another_net(command, tmp_path):
    caffemodel = tmp_path / "small.caffemodel"
    write_caffemodel(caffemodel, SMALL_NET)
    output = tmp_path / "out" / "model.h5"
    result = command(caffemodel, "-o", output)
    reason = "residual blocks per stage (0, 0, 0, 0), not (3, 4, 6, 3) (ResNet-50) or (3, 4, 23, 3) (ResNet-101)"
    assert_not_released(result, caffemodel, output, reason, 3, "'conv_a', 'conv_a/bn', 'conv6'")
    write_caffemodel(caffemodel, SMALL_NET[:2])
    result = command(caffemodel, "-o", output)
    assert_not_released(result, caffemodel, output, "no conv6 classifier", 2, "'conv_a', 'conv_a/bn'")


def test_refuses_pspnet_of_other_classes(synthetic_model, command, tmp_path):
    model = synthetic_model("pspnet50_ade20k")
    layers = caffemodel_layers(model.prototxt, model.weights)
    layers = [(n, t, [np.zeros((60, 512, 1, 1), np.float32), np.zeros(60, np.float32)] if n == "conv6" else b)
              for n, t, b in layers]
    caffemodel = tmp_path / "context.caffemodel"
    write_caffemodel(caffemodel, layers)
    output = tmp_path / "out" / "model.h5"
    result = command(caffemodel, "-o", output)
    reason = (
        "ResNet-50 with 60 classes; released: pspnet50_ade20k (ResNet-50, 150), "
        "pspnet101_voc2012 (ResNet-101, 21), pspnet101_cityscapes (ResNet-101, 19)"
    )
    names = "'conv1_1_3x3_s2', 'conv1_1_3x3_s2/bn', 'conv1_2_3x3', ..."
    assert_not_released(result, caffemodel, output, reason, 121, names)


def drop_layer(layers):
    return [layer for layer in layers if layer[0] != "conv5_4"]


def rename_layers(layers):
    return [(n.replace("conv5_4", "conv5_4_new"), t, b) for n, t, b in layers]


def drop_bn_blob(layers):
    return [(n, t, b[:3] if n == "conv1_2_3x3/bn" else b) for n, t, b in layers]


def widen_kernel(layers):
    return [(n, t, [np.zeros((64, 32, 3, 3), np.float32)] if n == "conv1_2_3x3" else b) for n, t, b in layers]


def short_blob(layers):
    def shortened(blob):
        return blob_message(blob.reshape(-1)[:-1], shape=blob.shape)

    return [(n, t, [shortened(b[0])] if n == "conv5_4" else b) for n, t, b in layers]


def retype_layer(layers):
    return [(n, "BN" if n == "conv6" else t, b) for n, t, b in layers]


def drop_conv6_bias(layers):
    return [(n, t, b[:1] if n == "conv6" else b) for n, t, b in layers]


def poison_variance(layers):
    def poisoned(blobs):
        variance = blobs[3].copy()
        variance[0, 5, 0, 0] = np.nan
        return blobs[:3] + [variance]

    return [(n, t, poisoned(b) if n == "conv4_2_3x3/bn" else b) for n, t, b in layers]


def infinite_kernel(layers):
    def infinite(blobs):
        kernel = blobs[0].copy()
        kernel[0, 0, 0, 0] = -np.inf
        return [kernel] + blobs[1:]

    return [(n, t, infinite(b) if n == "conv6" else b) for n, t, b in layers]


CAFFEMODEL_DEFECTS = {
    # name: (how to break the layers, message with {source} for the prototxt or model name)
    "missing_layer": (drop_layer, "no layer 'conv5_4', a Convolution layer of {source}"),
    "renamed_layers": (
        rename_layers,
        "no layer 'conv5_4', a Convolution layer of {source}; it has 2 that {source} lacks: "
        "'conv5_4_new', 'conv5_4_new/bn'",
    ),
    "blob_count": (drop_bn_blob, "layer 'conv1_2_3x3/bn' has 3 blobs, the BN layer of {source} needs 4"),
    "conv6_bias": (drop_conv6_bias, "layer 'conv6' has 1 blobs, the Convolution layer of {source} needs 2"),
    "shape": (widen_kernel, "layer 'conv1_2_3x3': blob 0 (kernel) has shape (64, 32, 3, 3), expected (64, 64, 3, 3)"),
    "value_count": (
        short_blob, "layer 'conv5_4': blob 0 (kernel) holds 18874367 values, its shape (512, 4096, 3, 3) needs 18874368"
    ),
    "layer_type": (retype_layer, "layer 'conv6' is a BN layer here but a Convolution layer in {source}"),
    "nan": (poison_variance, "layer 'conv4_2_3x3/bn': blob 3 (variance) holds NaN or infinite values"),
    "infinity": (infinite_kernel, "layer 'conv6': blob 0 (kernel) holds NaN or infinite values"),
}


@pytest.mark.parametrize("with_prototxt", [True, False], ids=["with_prototxt", "alone"])
@pytest.mark.parametrize("defect", CAFFEMODEL_DEFECTS)
def test_rejects_caffemodel_not_matching_the_net(defect, with_prototxt, synthetic_model, command, tmp_path):
    """The caffemodel is blamed; the message names the prototxt (or the recognised model) it was checked against."""
    model = synthetic_model("pspnet50_ade20k")
    break_layers, message = CAFFEMODEL_DEFECTS[defect]
    caffemodel = tmp_path / "broken.caffemodel"
    write_caffemodel(caffemodel, break_layers(caffemodel_layers(model.prototxt, model.weights)))
    output = tmp_path / "out" / "model.h5"
    inputs = [model.prototxt, caffemodel] if with_prototxt else [caffemodel]
    result = command(*inputs, "-o", output)
    source = model.prototxt if with_prototxt else "pspnet50_ade20k"
    assert_fails_cleanly(result, caffemodel, message.format(source=source), output)


# --------------------------------------------------------------------------------------
# Prototxts that are not a released deploy net, or not a prototxt


def difference(layer, name, given, expected):
    """The converter's description of a prototxt differing from pspnet50_ade20k's net at its layer `name`."""
    return (
        f"not one of the released PSPNet nets: layer {layer} ('{name}') has {given} "
        f"where pspnet50_ade20k has {expected}"
    )


PROTOTXT_DEFECTS = {
    # name: ((text to replace, replacement, occurrences), message fragment)
    "unknown_type": (
        ('type: "ReLU"', 'type: "PReLU"', 1),
        difference(3, "conv1_1_3x3_s2/relu", 'type: "PReLU"', 'type: "ReLU"'),
    ),
    "other_classes": (
        ("num_output: 150", "num_output: 151", 1),
        difference(204, "conv6", "convolution_param { num_output: 151 }", "convolution_param { num_output: 150 }"),
    ),
    "other_input": (
        ("input_dim: 473", "input_dim: 481", 2),
        "not one of the released PSPNet nets: input_dim: 1 input_dim: 3 input_dim: 481 input_dim: 481 where "
        "pspnet50_ade20k has input_dim: 1 input_dim: 3 input_dim: 473 input_dim: 473",
    ),
    "unknown_bottom": (
        ('bottom: "conv1_1_3x3_s2"\n  top: "conv1_2_3x3"', 'bottom: "conv1_1"\n  top: "conv1_2_3x3"', 1),
        difference(4, "conv1_2_3x3", 'bottom: "conv1_1"', 'bottom: "conv1_1_3x3_s2"'),
    ),
    "unclosed_block": (("  }\n}\n", "  }\n", -1), "not a prototxt: line 3891, column 3: Expected \"}\"."),
    "bad_value": (
        ("kernel_size: 3", "kernel_size: three", 1),
        "not a prototxt: line 19, column 18: Couldn't parse integer: three",
    ),
    "stray_character": (
        ("layer {", "layer { ;", 1),
        "not a prototxt: line 6, column 9: Expected identifier or number, got ;.",
    ),
    "nested_braces": (
        ("layer {", "layer {" + " bn_param {" * 5000 + " }" * 5000, 1),
        "not a prototxt: line 6, column 183: blocks nested more than 16 deep",
    ),
    "long_number": (
        ("num_output: 64", "num_output: " + "9" * 5000, 1),
        "not a prototxt: line 16, column 17: Couldn't parse integer: 9999999999999999999999999999999999999999...",
    ),
}


def edited_prototxt(text, old, new, count):
    """`text` with the first `count` occurrences of `old` replaced (count -1: only the last one)."""
    assert old in text
    if count == -1:
        head, _, tail = text.rpartition(old)
        return head + new + tail
    return text.replace(old, new, count)


@pytest.mark.parametrize("defect", PROTOTXT_DEFECTS)
def test_rejects_bad_prototxt(defect, synthetic_model, command, tmp_path):
    model = synthetic_model("pspnet50_ade20k")
    (old, new, count), fragment = PROTOTXT_DEFECTS[defect]
    prototxt = tmp_path / "broken.prototxt"
    prototxt.write_text(edited_prototxt(model.prototxt.read_text(), old, new, count))
    output = tmp_path / "out" / "model.h5"
    result = command(prototxt, model.caffemodel, "-o", output)
    assert_fails_cleanly(result, prototxt, fragment, output)


def test_rejects_prototxt_with_the_2017_ports_stride(synthetic_model, command, tmp_path):
    """A ResNet-101 deploy net striding conv3_1's 1x1 reduce, as the 2017 Keras port did, is not the release's."""
    model = synthetic_model("pspnet101_cityscapes")
    net = caffe_net.deploy_net("pspnet101_cityscapes")
    layer_named(net, "conv3_1_1x1_reduce").convolution_param.stride[:] = [2]
    layer_named(net, "conv3_1_3x3").convolution_param.stride[:] = [1]
    prototxt = tmp_path / "keras_port.prototxt"
    prototxt.write_text(text_format.MessageToString(net))
    output = tmp_path / "out" / "model.h5"
    result = command(prototxt, model.caffemodel, "-o", output)
    assert_fails_cleanly(
        result,
        prototxt,
        "not one of the released PSPNet nets: layer 43 ('conv3_1_1x1_reduce') has convolution_param { stride: 2 } "
        "where pspnet101_cityscapes has convolution_param { stride: 1 }",
        output,
    )


def test_rejects_net_of_fewer_blocks(synthetic_model, command, tmp_path):
    """A PSPNet50 cut short (conv5_3 skipped) is not a released net, though it parses."""
    model = synthetic_model("pspnet50_ade20k")
    text = model.prototxt.read_text()
    start = text.index('layer {\n  name: "conv5_3_1x1_reduce"')
    end = text.index('layer {\n  name: "conv5_3_pool1"')
    prototxt = tmp_path / "short.prototxt"
    prototxt.write_text(text[:start] + text[end:].replace('bottom: "conv5_3"', 'bottom: "conv5_2"'))
    output = tmp_path / "out" / "model.h5"
    result = command(prototxt, model.caffemodel, "-o", output)
    fragment = difference(169, "conv5_3_pool1", 'name: "conv5_3_pool1"', 'name: "conv5_3_1x1_reduce"')
    assert_fails_cleanly(result, prototxt, fragment, output)


def test_prototxt_differing_in_fields_the_net_does_not_compute_with_converts(synthetic_model, command, tmp_path):
    """Fields only training reads (multipliers, fillers, BN momentum) and fields caffe_net does not
    declare (an engine, a net name, nested blocks of unknown fields) do not make another net."""
    model = synthetic_model("pspnet50_ade20k")
    text = model.prototxt.read_text()
    text = "name: \"pspnet\"\n" + text.replace(
        "    bias_term: false\n", "    bias_term: false\n    engine: CUDNN\n    extra { deep { deeper: 1.5e300 } }\n", 1
    )
    text = text.replace("lr_mult: 10.0", "lr_mult: 5.0").replace("momentum: 0.95", "momentum: 0.9")
    text = text.replace('    weight_filler {\n      type: "msra"\n    }\n', "")
    assert "engine: CUDNN" in text and "lr_mult: 5.0" in text and "momentum: 0.9\n" in text and "msra" not in text
    prototxt = tmp_path / "annotated.prototxt"
    prototxt.write_text(text)
    output = tmp_path / "out.h5"
    result = command(prototxt, model.caffemodel, "-o", output)
    assert result == Result(0, f"wrote {output} (pspnet50_ade20k, 121 layers)\n", "")


# --------------------------------------------------------------------------------------
# Files that cannot be read


BAD_FILES = {
    # name: (which argument is bad, content, message)
    "missing_caffemodel": ("caffemodel", None, "no such file"),
    "missing_prototxt": ("prototxt", None, "no such file"),
    "empty_caffemodel": ("caffemodel", b"", "file is empty"),
    "empty_prototxt": ("prototxt", b"  \n", "file is empty"),
    "truncated_caffemodel": ("caffemodel", "truncated", "not a caffemodel: truncated or corrupt protobuf data"),
    "random_caffemodel": ("caffemodel", np.random.default_rng(0).bytes(1 << 16), "not a caffemodel: "),
    "text_as_caffemodel": ("caffemodel", b"#\ninput: 'data'\n", "not a caffemodel: "),
    "binary_as_prototxt": ("prototxt", b"\x0a\x03abc\xff\xfe", "not a prototxt: not UTF-8 text"),
    "directory_as_caffemodel": ("caffemodel", "directory", "is a directory, not a file"),
    "fifo_as_caffemodel": ("caffemodel", "fifo", "is a FIFO, not a regular file"),
    "fifo_as_prototxt": ("prototxt", "fifo", "is a FIFO, not a regular file"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_rejects_unreadable_input(case, synthetic_model, command, tmp_path):
    """Refused before reading: a FIFO is never opened (this test would hang), a directory never read."""
    model = synthetic_model("pspnet50_ade20k")
    argument, content, fragment = BAD_FILES[case]
    bad = tmp_path / f"bad.{argument}"
    if content == "truncated":
        data = model.caffemodel.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif content == "directory":
        bad.mkdir()
    elif content == "fifo":
        os.mkfifo(bad)
    elif content is not None:
        bad.write_bytes(content)
    paths = {"prototxt": model.prototxt, "caffemodel": model.caffemodel, argument: bad}
    output = tmp_path / "out" / "model.h5"
    result = command(paths["prototxt"], paths["caffemodel"], "-o", output)
    assert_fails_cleanly(result, bad, fragment, output)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_rejects_device_as_input(device, command, tmp_path):
    output = tmp_path / "out" / "model.h5"
    result = command(device, "-o", output)
    assert result == Result(1, "", f"{ERROR_PREFIX}{device}: is a device, not a regular file\n")
    assert not output.parent.exists()


# --------------------------------------------------------------------------------------
# Outputs


def test_failed_conversion_keeps_existing_output(command, tmp_path):
    output = tmp_path / "model.h5"
    output.write_bytes(b"previous weights")
    result = command(tmp_path / "missing.caffemodel", "-o", output)
    assert result.returncode == 1
    assert output.read_bytes() == b"previous weights"
    assert os.listdir(tmp_path) == ["model.h5"]


def test_rejects_unwritable_output(synthetic_model, command, tmp_path):
    model = synthetic_model("pspnet50_ade20k")
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    output = blocker / "model.h5"
    result = command(model.caffemodel, "-o", output)
    assert result == Result(1, "", f"{ERROR_PREFIX}{output}: cannot write (Not a directory)\n")
    result = command(model.caffemodel, "-o", tmp_path)
    assert result == Result(1, "", f"{ERROR_PREFIX}{tmp_path}: is a directory\n")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_refuses_to_overwrite_an_input(synthetic_model, command, tmp_path):
    """-o naming an input, by another path or a hard link, is refused and the input is left as it was."""
    model = synthetic_model("pspnet50_ade20k")
    caffemodel = tmp_path / "model.caffemodel"
    os.link(model.caffemodel, caffemodel)
    prototxt = tmp_path / "deploy.prototxt"
    prototxt.write_bytes(model.prototxt.read_bytes())
    data = caffemodel.read_bytes()
    cases = [
        ((caffemodel,), caffemodel, caffemodel),
        ((caffemodel,), tmp_path / "." / "model.caffemodel", caffemodel),
        ((caffemodel,), model.caffemodel, caffemodel),
        ((prototxt, caffemodel), prototxt, prototxt),
    ]
    for inputs, output, same in cases:
        result = command(*inputs, "-o", output)
        assert result == Result(1, "", f"{ERROR_PREFIX}{output}: is the input {same}, which this command reads; it is never replaced\n")
    assert caffemodel.read_bytes() == data
    assert prototxt.read_bytes() == model.prototxt.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["deploy.prototxt", "model.caffemodel"]


def test_refuses_output_that_is_not_a_regular_file(command, tmp_path):
    """A FIFO (which would block a writer) or a device is never replaced nor opened."""
    fifo = tmp_path / "out.h5"
    os.mkfifo(fifo)
    caffemodel = tmp_path / "any.caffemodel"
    caffemodel.write_bytes(b"")
    for output in (fifo, Path("/dev/null")):
        result = command(caffemodel, "-o", output)
        refusal = f"{ERROR_PREFIX}{output}: exists and is not a regular file; refusing to replace it\n"
        assert result == Result(1, "", refusal)
        result = command("--prototxt", "pspnet50_ade20k", "-o", output)
        assert result.returncode == 1 and "refusing to replace it" in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["any.caffemodel", "out.h5"]


def ignore_file_size_limit_signal_and_limit(size):
    """A preexec_fn: write() past `size` bytes fails with EFBIG instead of killing the process (SIGXFSZ)."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))

    return limit


def test_file_size_limit_fails_cleanly(synthetic_model, tmp_path):
    model = synthetic_model("pspnet50_ade20k")
    output = tmp_path / "out" / "model.h5"
    limit = ignore_file_size_limit_signal_and_limit(FILE_SIZE_LIMIT)
    result = converter_process(model.caffemodel, "-o", output, preexec_fn=limit)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"{ERROR_PREFIX}{output}: cannot write (File too large)\n"
    assert os.listdir(output.parent) == []


def test_sigterm_while_writing_removes_the_temporary_file(synthetic_model, tmp_path):
    """SIGTERM once the temporary output exists: exit 143, one line, nothing left behind."""
    model = synthetic_model("pspnet101_cityscapes")
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    process = subprocess.Popen(
        [sys.executable, str(weight_converter.__file__), str(model.caffemodel), "-o", str(output_dir / "model.h5")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    while process.poll() is None and not os.listdir(output_dir):
        time.sleep(0.001)
    temporary = os.listdir(output_dir)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert len(temporary) == 1 and temporary[0].startswith(".model.h5.") and temporary[0].endswith(".tmp")
    assert process.returncode == 143
    assert (stdout, stderr) == ("", "weight_converter.py: terminated\n")
    assert os.listdir(output_dir) == []
