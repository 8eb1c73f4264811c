"""weight_converter.py: wire-format reading, the written HDF5 layout, and every error path.

The expected HDF5 contents are derived here from the synthetic Caffe arrays with the
mapping of spec F (kernel OIHW -> HWIO, BN slope/bias/mean/variance -> gamma/beta/
moving_mean/moving_variance, '/' -> '_'), not from the converter.
"""

import os

import h5py
import numpy as np
import pytest

import weight_converter
from synthetic_caffe import blob_message, caffemodel_layers, write_caffemodel

MODEL_NAMES = ("pspnet50_ade20k", "pspnet101_voc2012", "pspnet101_cityscapes")
WEIGHTED_LAYER_COUNTS = {"pspnet50_ade20k": 121, "pspnet101_voc2012": 223, "pspnet101_cityscapes": 223}
BN_WEIGHT_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")
ERROR_PREFIX = "weight_converter: error: "


def expected_keras_weights(caffe_name, blobs):
    """(Keras layer name, [(weight name, array)]) of a Caffe layer, per spec F."""
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


def test_converted_layout_follows_spec_f_by_example(synthetic_model):
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


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_converts_release_net(name, synthetic_model):
    """Each released prototxt converts to weights/keras/<model>.h5 holding every weighted layer."""
    model = synthetic_model(name)
    result = model.conversion
    default_output = model.directory / "weights" / "keras" / f"{name}.h5"
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {default_output} ({WEIGHTED_LAYER_COUNTS[name]} layers)\n"
    assert result.stderr == ""
    assert len(model.weights) == WEIGHTED_LAYER_COUNTS[name]
    assert os.listdir(model.converted_h5.parent) == [f"{name}.h5"]
    assert_weights_file(model.converted_h5, model.weights)


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
    assert sorted(layers) == sorted(name for name, _, _ in weighted)
    for name, layer_type, blobs in weighted:
        layer = layers[name]
        assert layer.type == ("" if options.get("v1") else layer_type)
        read = layer.blobs()
        assert len(read) == len(blobs)
        for (shape, values), blob in zip(read, blobs):
            legacy_shape = (1,) * (4 - blob.ndim) + blob.shape
            assert shape == (legacy_shape if options.get("legacy_dims") else blob.shape)
            assert values.dtype == np.float32
            np.testing.assert_array_equal(values, blob.reshape(-1).astype(np.float32))


def reshaped_bn_blobs(weights):
    """`weights` with every BN blob stored as a (C,) vector instead of (1, C, 1, 1)."""
    return {name: [blob.reshape(-1) for blob in blobs] if len(blobs) == 4 else blobs for name, blobs in weights.items()}


FULL_NET_ENCODINGS = {
    "v1_legacy_dims": (False, {"v1": True, "legacy_dims": True}),
    "bn_vectors_double_data": (True, {"double": True}),
}


@pytest.mark.parametrize("encoding", FULL_NET_ENCODINGS)
def test_converts_full_net_in_legacy_encodings(encoding, synthetic_model, run_converter, tmp_path):
    """A whole PSPNet50 caffemodel in an old encoding, with an extra layer Caffe would ignore, converts identically."""
    model = synthetic_model("pspnet50_ade20k")
    bn_vectors, options = FULL_NET_ENCODINGS[encoding]
    weights = reshaped_bn_blobs(model.weights) if bn_vectors else model.weights
    extra = ("conv4_24_aux", "Convolution", [np.ones((2, 2, 1, 1), np.float32)])
    caffemodel = tmp_path / "legacy.caffemodel"
    write_caffemodel(caffemodel, [extra] + caffemodel_layers(model.prototxt, weights), **options)
    output = tmp_path / "legacy.h5"
    result = run_converter(model.prototxt, caffemodel, "-o", output)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {output} (121 layers)\n"
    assert_weights_file(output, model.weights)


def test_output_option_creates_directories_and_replaces_file(synthetic_model, run_converter, tmp_path):
    model = synthetic_model("pspnet50_ade20k")
    output = tmp_path / "a" / "b" / "out.h5"
    result = run_converter(model.prototxt, model.caffemodel, "--output", output)
    assert result.returncode == 0, result.stderr
    output.write_bytes(b"stale")
    result = run_converter(model.prototxt, model.caffemodel, "-o", output)
    assert result.returncode == 0, result.stderr
    assert os.listdir(output.parent) == ["out.h5"]
    assert_weights_file(output, model.weights)


def test_help_describes_usage(run_converter):
    result = run_converter("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: weight_converter [-h] [-o OUT.h5] prototxt caffemodel")
    assert "weights/keras/<model>.h5" in result.stdout


def test_convert_raises_conversion_error_naming_the_file(synthetic_model, tmp_path):
    missing = tmp_path / "missing.caffemodel"
    with pytest.raises(weight_converter.ConversionError) as raised:
        weight_converter.convert(synthetic_model("pspnet50_ade20k").prototxt, missing, tmp_path / "out.h5")
    assert raised.value.path == missing
    assert str(raised.value).startswith(f"{missing}: cannot read file")
    assert not (tmp_path / "out.h5").exists()


# --------------------------------------------------------------------------------------
# Error paths: (how to break the inputs, which file is blamed, what the message says)


def drop_layer(layers):
    return [layer for layer in layers if layer[0] != "conv5_4"]


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


CAFFEMODEL_DEFECTS = {
    "missing_layer": (drop_layer, "layer 'conv5_4' (Convolution) is missing from the caffemodel"),
    "blob_count": (drop_bn_blob, "layer 'conv1_2_3x3/bn' has 3 blobs, the prototxt's BN layer needs 4"),
    "conv6_bias": (drop_conv6_bias, "layer 'conv6' has 1 blobs, the prototxt's Convolution layer needs 2"),
    "shape": (widen_kernel, "layer 'conv1_2_3x3': blob 0 (kernel) has shape (64, 32, 3, 3), expected (64, 64, 3, 3)"),
    "value_count": (short_blob, "layer 'conv5_4': blob 0 (kernel) holds 18874367 values, its shape"),
    "layer_type": (retype_layer, "layer 'conv6' is a BN layer here but a Convolution layer in the prototxt"),
}

PROTOTXT_DEFECTS = {
    # name: ((text to replace, replacement, occurrences), message fragment)
    "unknown_type": (
        ('type: "ReLU"', 'type: "PReLU"', 1),
        "line 64: layer 'conv1_1_3x3_s2/relu': unknown layer type 'PReLU'",
    ),
    "other_classes": (
        ("num_output: 150", "num_output: 151", 1),
        "not one of the released PSPNets: depth 50, 151 classes",
    ),
    "other_input": (("input_dim: 473", "input_dim: 481", 2), "input 3x481x481"),
    "unclosed_block": (("  }\n}\n", "  }\n", -1), "'{' is never closed"),
    "unknown_bottom": (
        ('bottom: "conv1_1_3x3_s2"\n  top: "conv1_2_3x3"', 'bottom: "conv1_1"\n  top: "conv1_2_3x3"', 1),
        "layer 'conv1_2_3x3': bottom 'conv1_1' is not produced by an earlier layer",
    ),
    "bad_value": (("kernel_size: 3", "kernel_size: three", 1), "'kernel_size' must be an integer"),
    "stray_character": (("layer {", "layer { ;", 1), "unexpected character ';'"),
}


def edited_prototxt(text, old, new, count):
    """`text` with the first `count` occurrences of `old` replaced (count -1: only the last one)."""
    assert old in text
    if count == -1:
        head, _, tail = text.rpartition(old)
        return head + new + tail
    return text.replace(old, new, count)


def assert_fails_cleanly(result, blamed, fragment, output):
    """One stderr line 'weight_converter: error: <blamed>: ...<fragment>...', exit 1, no output file."""
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"{ERROR_PREFIX}{blamed}: "), lines[0]
    if fragment is not None:
        assert fragment in lines[0]
    assert not output.exists()
    assert not output.parent.exists() or os.listdir(output.parent) == []


@pytest.mark.parametrize("defect", CAFFEMODEL_DEFECTS)
def test_rejects_caffemodel_not_matching_prototxt(defect, synthetic_model, run_converter, tmp_path):
    model = synthetic_model("pspnet50_ade20k")
    break_layers, fragment = CAFFEMODEL_DEFECTS[defect]
    caffemodel = tmp_path / "broken.caffemodel"
    write_caffemodel(caffemodel, break_layers(caffemodel_layers(model.prototxt, model.weights)))
    output = tmp_path / "out" / "model.h5"
    result = run_converter(model.prototxt, caffemodel, "-o", output)
    assert_fails_cleanly(result, caffemodel, fragment, output)


@pytest.mark.parametrize("defect", PROTOTXT_DEFECTS)
def test_rejects_bad_prototxt(defect, synthetic_model, run_converter, tmp_path):
    model = synthetic_model("pspnet50_ade20k")
    (old, new, count), fragment = PROTOTXT_DEFECTS[defect]
    prototxt = tmp_path / "broken.prototxt"
    prototxt.write_text(edited_prototxt(model.prototxt.read_text(), old, new, count))
    output = tmp_path / "out" / "model.h5"
    result = run_converter(prototxt, model.caffemodel, "-o", output)
    assert_fails_cleanly(result, prototxt, fragment, output)


def test_rejects_net_of_fewer_blocks(synthetic_model, run_converter, tmp_path):
    """A PSPNet50 cut short (conv5_3 skipped) is not a released net, though it parses."""
    model = synthetic_model("pspnet50_ade20k")
    text = model.prototxt.read_text()
    start = text.index('layer {\n  name: "conv5_3_1x1_reduce"')
    end = text.index('layer {\n  name: "conv5_3_pool1"')
    prototxt = tmp_path / "short.prototxt"
    prototxt.write_text(text[:start] + text[end:].replace('bottom: "conv5_3"', 'bottom: "conv5_2"'))
    output = tmp_path / "out" / "model.h5"
    result = run_converter(prototxt, model.caffemodel, "-o", output)
    assert_fails_cleanly(result, prototxt, "not one of the released PSPNets: depth 47, 150 classes", output)


BAD_FILES = {
    # name: (which argument is bad, content or None for a missing file, message fragment)
    "missing_caffemodel": ("caffemodel", None, "cannot read file (No such file or directory)"),
    "missing_prototxt": ("prototxt", None, "cannot read file (No such file or directory)"),
    "empty_caffemodel": ("caffemodel", b"", "file is empty"),
    "empty_prototxt": ("prototxt", b"  \n", "file is empty"),
    "truncated_caffemodel": ("caffemodel", "truncated", "not a caffemodel: truncated or corrupt protobuf data"),
    "random_caffemodel": ("caffemodel", np.random.default_rng(0).bytes(1 << 16), "not a caffemodel"),
    "text_as_caffemodel": ("caffemodel", b"#\ninput: 'data'\n", "not a caffemodel"),
    "binary_as_prototxt": ("prototxt", b"\x0a\x03abc\xff\xfe", "not a prototxt: not UTF-8 text"),
    "directory_as_caffemodel": ("caffemodel", "directory", "cannot read file (Is a directory)"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_rejects_unreadable_input(case, synthetic_model, run_converter, tmp_path):
    model = synthetic_model("pspnet50_ade20k")
    argument, content, fragment = BAD_FILES[case]
    bad = tmp_path / f"bad.{argument}"
    if content == "truncated":
        data = model.caffemodel.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif content == "directory":
        bad.mkdir()
    elif content is not None:
        bad.write_bytes(content)
    paths = {"prototxt": model.prototxt, "caffemodel": model.caffemodel, argument: bad}
    output = tmp_path / "out" / "model.h5"
    result = run_converter(paths["prototxt"], paths["caffemodel"], "-o", output)
    assert_fails_cleanly(result, bad, fragment, output)


def test_failed_conversion_keeps_existing_output(synthetic_model, run_converter, tmp_path):
    model = synthetic_model("pspnet50_ade20k")
    output = tmp_path / "model.h5"
    output.write_bytes(b"previous weights")
    result = run_converter(model.prototxt, tmp_path / "missing.caffemodel", "-o", output)
    assert result.returncode == 1
    assert output.read_bytes() == b"previous weights"
    assert os.listdir(tmp_path) == ["model.h5"]


def test_rejects_unwritable_output(synthetic_model, run_converter, tmp_path):
    model = synthetic_model("pspnet50_ade20k")
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    output = blocker / "model.h5"
    result = run_converter(model.prototxt, model.caffemodel, "-o", output)
    assert result.returncode == 1
    assert result.stderr == f"{ERROR_PREFIX}{output}: cannot create directory {blocker} (File exists)\n"
    result = run_converter(model.prototxt, model.caffemodel, "-o", tmp_path)
    assert result.stderr == f"{ERROR_PREFIX}{tmp_path}: output path is a directory\n"
    assert sorted(os.listdir(tmp_path)) == ["file"]
