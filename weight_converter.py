"""Converts the released Caffe PSPNet weights to a Keras-2 style HDF5 weights file, without Caffe.

    python weight_converter.py MODEL.caffemodel [-o OUT.h5]
    python weight_converter.py DEPLOY.prototxt MODEL.caffemodel [-o OUT.h5]
    python weight_converter.py --prototxt MODEL [-o FILE]

A .caffemodel of the Caffe release (hszhao/PSPNet) is recognised from its weights:
the classes from conv6's kernel, the ResNet depth from its residual blocks; the crop
size is the model's. Its net is the release's deploy net as caffe_net renders it from
this project's network, so no prototxt is needed; one given must be that deploy net
(fields only training reads aside).
Every weighted layer of the net is checked against the caffemodel (presence, type,
number of blobs, blob shapes, value counts, finite values) before anything is written.
`--prototxt MODEL` writes the rendered deploy prototxt instead.

The output has the layout of Keras-2 `save_weights`: one group per weighted layer,
named like the Caffe layer with '/' replaced by '_', holding HWIO convolution kernels
(plus conv6's bias) and the (C,) gamma, beta, moving_mean and moving_variance of each
BN layer. It is written atomically (utils.write_atomic): an error, Ctrl-C or SIGTERM
leaves no file behind.
"""

import pspnet_keras.startup  # noqa: F401 (first: Ctrl-C while the rest imports exits quietly)

import argparse
import os
import sys
from typing import NamedTuple

import numpy as np

import utils
from pspnet_keras import caffe_net
from pspnet_keras import cli
from pspnet_keras import keras2_weights
from pspnet_keras import models

PROG = "weight_converter.py"
DEFAULT_OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "keras")

CLASSIFIER = "conv6"
CONV_BLOB_ROLES = ("kernel", "bias")
BN_BLOB_ROLES = ("slope", "bias", "mean", "variance")
BN_WEIGHT_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")
# Layer names quoted when a caffemodel is not one of the released nets.
NAMES_SHOWN = 3


class ConversionError(Exception):
    """A problem with one input or output file; str() is '<file>: <problem>'."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class CaffeLayer(NamedTuple):
    """A layer of a caffemodel holding weights: its type ('' in V1 files) and its BlobProto messages."""

    type: str
    blobs: list


class Conversion(NamedTuple):
    """The result of `convert`."""

    model_name: str
    output_path: str
    layer_count: int


# --------------------------------------------------------------------------------------
# Inputs


def read_input(path):
    """The bytes of the input file at `path`, refused before opening unless it is a readable regular file."""
    problem = utils.file_problem(path)
    if problem:
        raise ConversionError(path, problem)
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ConversionError(path, f"cannot read ({error.strerror or error})") from None


def read_prototxt(path):
    """The NetParameter of the prototxt at `path`."""
    data = read_input(path)
    if not data.strip():
        raise ConversionError(path, "file is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConversionError(path, "not a prototxt: not UTF-8 text") from None
    try:
        return caffe_net.parse_prototxt(text)
    except caffe_net.CaffeFormatError as error:
        raise ConversionError(path, f"not a prototxt: {error}") from None


def read_caffemodel(path):
    """The layers holding weights in the .caffemodel at `path`, by name (see CaffeLayer)."""
    data = read_input(path)
    if not data:
        raise ConversionError(path, "file is empty")
    try:
        net = caffe_net.parse_caffemodel(data)
    except caffe_net.CaffeFormatError as error:
        raise ConversionError(path, f"not a caffemodel: {error}") from None
    layers = {}
    for name, layer_type, blobs in caffe_net.weight_layers(net):
        if name in layers:
            raise ConversionError(path, f"layer '{name}' holds weights more than once")
        layers[name] = CaffeLayer(layer_type, blobs)
    if not layers:
        raise ConversionError(path, "not a caffemodel: no layer with weights found")
    return layers


def blob_array(blob):
    """(shape, float32 values) of a BlobProto (see caffe_net.blob_shape and blob_values)."""
    return caffe_net.blob_shape(blob), np.array(caffe_net.blob_values(blob), dtype=np.float32)


# --------------------------------------------------------------------------------------
# Which released net


def quoted_names(names):
    """The first NAMES_SHOWN names quoted, '...' after them when there are more."""
    shown = [f"'{name}'" for name in names[:NAMES_SHOWN]]
    return ", ".join(shown + ["..."] * (len(names) > NAMES_SHOWN))


def prototxt_model(net, path):
    """The released model whose deploy net the prototxt NetParameter `net` is.

    Fields only training reads do not count (caffe_net.deployed). Otherwise
    ConversionError saying where it first differs from the closest net: the one with
    the most layers the same, then with the same input.
    """
    net = caffe_net.deployed(net)
    renderings = {name: caffe_net.deployed(caffe_net.deploy_net(name)) for name in models.RELEASED_MODEL_NAMES}
    for name, rendering in renderings.items():
        if net == rendering:
            return name

    def closeness(name):
        header_equal = caffe_net.message_difference(net, renderings[name], skipped=("layer",)) is None
        return caffe_net.shared_layers(net, renderings[name]), header_equal

    closest = max(renderings, key=closeness)
    difference = caffe_net.net_difference(net, renderings[closest], closest)
    raise ConversionError(path, f"not one of the released PSPNet nets: {difference}")


def residual_blocks(names, stage):
    """How many residual blocks of `stage` (convX_1, convX_2, ...) have their 1x1 increase among `names`."""
    blocks = 0
    while f"conv{stage}_{blocks + 1}_1x1_increase" in names:
        blocks += 1
    return blocks


def caffemodel_model(layers, path):
    """The released model whose weights `layers` (of read_caffemodel) are.

    The classes come from conv6's kernel, the depth from the residual blocks of each
    stage; otherwise ConversionError saying what the file holds.
    """
    stages = range(caffe_net.FIRST_STAGE, caffe_net.FIRST_STAGE + len(models.STAGE_WIDTHS))
    blocks = tuple(residual_blocks(layers, stage) for stage in stages)
    depths = {counts: depth for depth, counts in models.BLOCKS_PER_STAGE.items()}
    classifier = layers.get(CLASSIFIER)
    kernel_shape = caffe_net.blob_shape(classifier.blobs[0]) if classifier else ()
    if not kernel_shape:
        reason = f"no {CLASSIFIER} classifier"
    elif blocks not in depths:
        known = " or ".join(f"{counts} (ResNet-{depth})" for counts, depth in depths.items())
        reason = f"residual blocks per stage {blocks}, not {known}"
    else:
        depth, classes = depths[blocks], kernel_shape[0]
        for config in models.RELEASED_MODELS.values():
            if (config.depth, config.classes) == (depth, classes):
                return config.name
        released = ", ".join(f"{c.name} (ResNet-{c.depth}, {c.classes})" for c in models.RELEASED_MODELS.values())
        reason = f"ResNet-{depth} with {classes} classes; released: {released}"
    raise ConversionError(
        path,
        f"not one of the released PSPNet nets ({reason}); it holds {len(layers)} layers with weights: "
        f"{quoted_names(list(layers))}",
    )


# --------------------------------------------------------------------------------------
# Conversion


def keras_name(caffe_name):
    """The Keras layer name of a Caffe layer ('conv1_1_3x3_s2/bn' -> 'conv1_1_3x3_s2_bn')."""
    return caffe_name.replace("/", "_")


def padded_shape(shape):
    """A shape left-padded with 1s to 4 dims, as Caffe compares legacy blob shapes."""
    return (1,) * (4 - len(shape)) + tuple(shape)


def shape_text(shape):
    """A shape as '(64, 3, 3, 3)'."""
    return "(" + ", ".join(str(dim) for dim in shape) + ")"


def check_layer_names(definition, layers, path, source):
    """Every weighted layer of the net (caffe_net.weight_shapes) is in the caffemodel at `path`.

    `source` names where the net comes from (a prototxt or a released model).
    """
    names = {name for name, _, _ in definition}
    for name, layer_type, _ in definition:
        if name not in layers:
            others = [other for other in layers if other not in names]
            extra = f"; it has {len(others)} that {source} lacks: {quoted_names(others)}" if others else ""
            raise ConversionError(path, f"no layer '{name}', a {layer_type} layer of {source}{extra}")


def layer_arrays(name, layer_type, shapes, layer, path, source):
    """The float32 blobs of weighted layer `name` from the caffemodel's `layer`, in their Caffe `shapes`.

    BN blobs may be stored as (C,) as well as (1, C, 1, 1); legacy 4-D shapes
    match their shapes padded with 1s.
    """
    if layer.type and layer.type != layer_type:
        raise ConversionError(path, f"layer '{name}' is a {layer.type} layer here but a {layer_type} layer in {source}")
    if len(layer.blobs) != len(shapes):
        raise ConversionError(
            path, f"layer '{name}' has {len(layer.blobs)} blobs, the {layer_type} layer of {source} needs {len(shapes)}"
        )
    roles = BN_BLOB_ROLES if layer_type == "BN" else CONV_BLOB_ROLES
    arrays = []
    for index, (blob, expected, role) in enumerate(zip(layer.blobs, shapes, roles)):
        shape, values = blob_array(blob)
        accepted = [expected, (expected[1],)] if layer_type == "BN" else [expected]
        where = f"layer '{name}': blob {index} ({role})"
        if padded_shape(shape) not in [padded_shape(s) for s in accepted]:
            raise ConversionError(path, f"{where} has shape {shape_text(shape)}, expected {shape_text(expected)}")
        if values.size != np.prod(shape):
            raise ConversionError(
                path, f"{where} holds {values.size} values, its shape {shape_text(shape)} needs {int(np.prod(shape))}"
            )
        if not np.isfinite(values).all():
            raise ConversionError(path, f"{where} holds NaN or infinite values")
        arrays.append(values.reshape(expected))
    return arrays


def keras_weights(layer_type, arrays):
    """[(weight name, array)] of a layer in Keras order and layout.

    Convolution: kernel OIHW -> HWIO (+ bias); BN: gamma, beta, moving_mean,
    moving_variance = Caffe blobs slope, bias, mean, variance, each (C,).
    """
    if layer_type == "BN":
        return [(name, array.reshape(-1)) for name, array in zip(BN_WEIGHT_NAMES, arrays)]
    weights = [("kernel", np.ascontiguousarray(arrays[0].transpose(2, 3, 1, 0)))]
    if len(arrays) == 2:
        weights.append(("bias", arrays[1]))
    return weights


def check_output(path, inputs):
    """Refuses an output path that is one of `inputs`, or not a regular file when it exists (an earlier
    conversion's file is replaced)."""
    problem = cli.output_problem(path, cli.Inputs({input_path: "the input" for input_path in inputs}), overwrite=True)
    if problem:
        raise ConversionError(path, problem)


def check_inputs(paths):
    """Refuses, before any is read, an input that is not a readable regular file."""
    for path in paths:
        problem = utils.file_problem(path)
        if problem:
            raise ConversionError(path, problem)


def convert(caffemodel_path, prototxt_path=None, output_path=None):
    """Converts a released Caffe PSPNet's weights to a Keras-2 HDF5 weights file.

    The net is the released one the caffemodel's weights are, or the one
    `prototxt_path` defines. `output_path` defaults to weights/keras/<model>.h5
    beside this script, where pspnet.py looks for weights. Returns a Conversion;
    raises ConversionError naming the faulty file (utils.OutputError for a write
    that fails).
    """
    inputs = [path for path in (prototxt_path, caffemodel_path) if path is not None]
    if output_path is not None:
        check_output(output_path, inputs)
    check_inputs(inputs)
    if prototxt_path is not None:
        model_name = prototxt_model(read_prototxt(prototxt_path), prototxt_path)
    caffe_layers = read_caffemodel(caffemodel_path)
    if prototxt_path is None:
        model_name = caffemodel_model(caffe_layers, caffemodel_path)
    source = prototxt_path or model_name
    definition = caffe_net.weight_shapes(caffe_net.deploy_net(model_name))
    check_layer_names(definition, caffe_layers, caffemodel_path, source)
    layers = []
    for name, layer_type, shapes in definition:
        arrays = layer_arrays(name, layer_type, shapes, caffe_layers[name], caffemodel_path, source)
        layers.append((keras_name(name), keras_weights(layer_type, arrays)))
    del caffe_layers
    if output_path is None:
        output_path = os.path.join(DEFAULT_OUTPUT_DIR, f"{model_name}.h5")
        check_output(output_path, inputs)
    keras2_weights.write_weights(output_path, layers, show_progress=True)
    return Conversion(model_name, output_path, len(layers))


def text_writer(text):
    """A write(temporary path) callback saving `text` as UTF-8."""

    def save(temporary):
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)

    return save


def write_deploy_prototxt(model_name, output_path=None):
    """Writes the rendered deploy prototxt of a released model to `output_path` (atomically), or to stdout."""
    text = caffe_net.deploy_prototxt(model_name)
    if output_path is None:
        sys.stdout.write(text)
        return
    check_output(output_path, [])
    utils.write_atomic(output_path, text_writer(text))


# --------------------------------------------------------------------------------------
# Command line

USAGE = f"""{PROG} [-h] [-o OUT.h5] [PROTOTXT] CAFFEMODEL
       {PROG} [-h] [-o FILE] --prototxt MODEL"""
EPILOG = """examples:
  python weight_converter.py weights/caffe/pspnet50_ADE20K.caffemodel
      writes weights/keras/pspnet50_ade20k.h5 beside weight_converter.py
  python weight_converter.py pspnet101_cityscapes_713.prototxt pspnet101_cityscapes.caffemodel -o city.h5
  python weight_converter.py --prototxt pspnet101_voc2012 -o pspnet101_VOC2012_473.prototxt"""


def argument_parser():
    """The parser of the command line."""
    parser = cli.ArgumentParser(
        prog=PROG,
        usage=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
        description=(
            "Convert the weights of a released Caffe PSPNet (pspnet50_ADE20K, pspnet101_VOC2012 or\n"
            "pspnet101_cityscapes .caffemodel of hszhao/PSPNet) to a Keras HDF5 weights file, without Caffe.\n"
            "The net is recognised from the caffemodel's weights; its definition is the release's deploy\n"
            "prototxt as this project renders it, so no prototxt is needed (one given must be that net).\n"
            "Every weighted layer is checked against the caffemodel before anything is written."
        ),
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="[PROTOTXT] CAFFEMODEL",
        help="the Caffe weights, e.g. pspnet50_ADE20K.caffemodel, optionally after the release's deploy "
        "prototxt of the same net, e.g. pspnet50_ADE20K_473.prototxt",
    )
    parser.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="output file (default: weights/keras/<model>.h5 beside weight_converter.py, where pspnet.py "
        "looks for it, e.g. weights/keras/pspnet50_ade20k.h5; with --prototxt, standard output); "
        "missing directories are created",
    )
    parser.add_argument(
        "--prototxt",
        metavar="MODEL",
        choices=models.RELEASED_MODEL_NAMES,
        help=f"write the deploy prototxt of MODEL ({', '.join(models.RELEASED_MODEL_NAMES)}) as the release "
        "writes it, rendered from this project's network, instead of converting",
    )
    return parser


def parse_args(argv):
    """The command line arguments, checked: one or two input files, or --prototxt alone."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.prototxt is not None and args.inputs:
        parser.error("--prototxt takes no input files")
    if args.prototxt is None and len(args.inputs) not in (1, 2):
        parser.error("expected CAFFEMODEL, or PROTOTXT and CAFFEMODEL")
    return args


def conversion_report(args):
    """Does what the parsed command line asks; returns the line to print, or None."""
    if args.prototxt is not None:
        write_deploy_prototxt(args.prototxt, args.output)
        return None if args.output is None else f"wrote {args.output}"
    *prototxt, caffemodel = args.inputs
    conversion = convert(caffemodel, prototxt[0] if prototxt else None, args.output)
    return f"wrote {conversion.output_path} ({conversion.model_name}, {conversion.layer_count} layers)"


def run(args):
    """Converts as the parsed command line asks and prints what was written; returns the exit code."""
    try:
        report = conversion_report(args)
    except (ConversionError, utils.OutputError) as error:
        raise cli.CommandError(str(error)) from None
    if report:
        print(report)
    return cli.EXIT_OK


def main(argv=None):
    """Command line entry point; returns the exit code."""
    return cli.run_command(PROG, run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
