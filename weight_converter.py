"""Converts the released Caffe PSPNet weights to a Keras-2 style HDF5 weights file.

    python weight_converter.py <deploy.prototxt> <weights.caffemodel> [-o OUT.h5]

Neither Caffe nor the protobuf package is needed: the deploy prototxt is read by a
small strict parser of the protobuf text format, and the .caffemodel by a reader of
the protobuf wire format that knows the few caffe.proto fields holding the weights.
Every weighted layer of the prototxt is checked against the caffemodel (presence,
number of blobs, blob shapes) before anything is written.

The output has the layout of Keras-2 `save_weights`: one group per weighted layer,
named like the Caffe layer with '/' replaced by '_', holding HWIO convolution kernels
(plus conv6's bias) and the (C,) gamma, beta, moving_mean and moving_variance of each
BN layer. It is written to a temporary file next to the target and renamed into place.
"""

import argparse
import os
import re
import sys
import tempfile
from typing import NamedTuple

import h5py
import numpy as np
from tqdm import tqdm

PROG = "weight_converter"
DEFAULT_OUTPUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "keras")
KERAS_VERSION = np.bytes_(b"2.1.5")
KERAS_BACKEND = np.bytes_(b"tensorflow")

# Protobuf wire types.
WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LENGTH_DELIMITED = 2
WIRE_FIXED32 = 5
MAX_VARINT_BYTES = 10

# caffe.proto field numbers (spec K).
NET_LAYERS_V1 = 2
NET_LAYER = 100
LAYER_NAME = 1
LAYER_TYPE = 2
LAYER_BLOBS = 7
V1_LAYER_NAME = 4
V1_LAYER_BLOBS = 6
BLOB_LEGACY_DIMS = (1, 2, 3, 4)  # num, channels, height, width
BLOB_DATA = 5
BLOB_SHAPE = 7
BLOB_DOUBLE_DATA = 8
BLOB_SHAPE_DIM = 1

KNOWN_LAYER_TYPES = ("Input", "Convolution", "BN", "ReLU", "Pooling", "Eltwise", "Concat", "Interp", "Dropout")
BOTTOM_COUNTS = {"Input": (0, 0), "Eltwise": (2, None), "Concat": (1, None)}  # (fewest, most); others: (1, 1)
NET_FIELDS = ("name", "input", "input_dim", "input_shape", "layer")

CONV_BLOB_ROLES = ("kernel", "bias")
BN_BLOB_ROLES = ("slope", "bias", "mean", "variance")
BN_WEIGHT_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")


class PSPNetVariant(NamedTuple):
    """What identifies one released PSPNet: ResNet depth, classes, input side, weighted layers."""

    depth: int
    classes: int
    input_size: int
    weighted_layers: int


PSPNET_MODELS = {
    "pspnet50_ade20k": PSPNetVariant(50, 150, 473, 121),
    "pspnet101_voc2012": PSPNetVariant(101, 21, 473, 223),
    "pspnet101_cityscapes": PSPNetVariant(101, 19, 713, 223),
}


class ConversionError(Exception):
    """A problem with one input or output file; str() is '<file>: <problem>'."""

    def __init__(self, path, problem):
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class WireFormatError(ValueError):
    """Bytes that are not a well-formed protobuf message."""


class WeightedLayer(NamedTuple):
    """A Convolution or BN layer of the prototxt and the blob shapes Caffe stores for it.

    `blob_shapes[i]` lists the accepted shapes of blob i (BN blobs are (1, C, 1, 1)
    or (C,)); the first one is the canonical shape.
    """

    name: str
    type: str
    blob_shapes: tuple


class NetDefinition(NamedTuple):
    """The parts of a deploy prototxt that the conversion needs."""

    model_name: str
    weighted_layers: list


class Conversion(NamedTuple):
    """The result of `convert`."""

    model_name: str
    output_path: str
    layer_count: int


# --------------------------------------------------------------------------------------
# Protobuf wire format


def read_varint(buffer, pos):
    """The unsigned varint starting at `pos` and the position after it."""
    result = 0
    for index in range(MAX_VARINT_BYTES):
        if pos + index >= len(buffer):
            raise WireFormatError(f"varint at byte {pos} runs past the end of the data")
        byte = buffer[pos + index]
        result |= (byte & 0x7F) << (7 * index)
        if byte < 0x80:
            return result, pos + index + 1
    raise WireFormatError(f"varint at byte {pos} is longer than {MAX_VARINT_BYTES} bytes")


def iter_fields(buffer):
    """Yields (field number, wire type, value) for each field of a serialized message.

    The value is an int for varints and a memoryview of the payload otherwise
    (8 bytes, 4 bytes, or the length-delimited bytes).
    """
    pos = 0
    end = len(buffer)
    while pos < end:
        start = pos
        key, pos = read_varint(buffer, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise WireFormatError(f"field number 0 at byte {start}")
        if wire_type == WIRE_VARINT:
            value, pos = read_varint(buffer, pos)
            yield field, wire_type, value
            continue
        if wire_type == WIRE_FIXED64:
            size = 8
        elif wire_type == WIRE_FIXED32:
            size = 4
        elif wire_type == WIRE_LENGTH_DELIMITED:
            size, pos = read_varint(buffer, pos)
        else:
            raise WireFormatError(f"unsupported wire type {wire_type} at byte {start}")
        if pos + size > end:
            raise WireFormatError(f"field {field} at byte {start} runs past the end of the data")
        yield field, wire_type, buffer[pos : pos + size]
        pos += size


def decode_varints(buffer):
    """All varints of a packed repeated field."""
    values = []
    pos = 0
    while pos < len(buffer):
        value, pos = read_varint(buffer, pos)
        values.append(value)
    return values


def decode_signed(value):
    """A varint read as a signed integer (int32 and int64 both use 64-bit two's complement)."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def decode_string(field, wire_type, value):
    """A string field's text."""
    if wire_type != WIRE_LENGTH_DELIMITED:
        raise WireFormatError(f"string field {field} has wire type {wire_type}")
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise WireFormatError(f"string field {field} is not UTF-8") from None


def decode_reals(field, wire_type, value, dtype, scalar_wire_type):
    """The float32 or float64 values of one occurrence of a repeated float/double field."""
    if wire_type not in (WIRE_LENGTH_DELIMITED, scalar_wire_type):
        raise WireFormatError(f"float field {field} has wire type {wire_type}")
    if len(value) % np.dtype(dtype).itemsize:
        raise WireFormatError(f"packed float field {field} has {len(value)} bytes")
    return np.frombuffer(value, dtype=dtype)


def parse_blob_shape(buffer):
    """The dims of a BlobShape message."""
    dims = []
    for field, wire_type, value in iter_fields(buffer):
        if field != BLOB_SHAPE_DIM:
            continue
        if wire_type == WIRE_LENGTH_DELIMITED:
            dims.extend(decode_signed(dim) for dim in decode_varints(value))
        elif wire_type == WIRE_VARINT:
            dims.append(decode_signed(value))
        else:
            raise WireFormatError(f"BlobShape.dim has wire type {wire_type}")
    return tuple(dims)


def parse_blob(buffer):
    """(shape, float32 values) of a BlobProto.

    The shape comes from `shape`, else from the legacy num/channels/height/width;
    the values from `double_data` when present (as Caffe does), else from `data`.
    """
    shape = None
    legacy_dims = {}
    floats = []
    doubles = []
    for field, wire_type, value in iter_fields(buffer):
        if field == BLOB_SHAPE:
            if wire_type != WIRE_LENGTH_DELIMITED:
                raise WireFormatError(f"BlobProto.shape has wire type {wire_type}")
            shape = (shape or ()) + parse_blob_shape(value)
        elif field in BLOB_LEGACY_DIMS:
            if wire_type != WIRE_VARINT:
                raise WireFormatError(f"BlobProto field {field} has wire type {wire_type}")
            legacy_dims[field] = decode_signed(value)
        elif field == BLOB_DATA:
            floats.append(decode_reals(field, wire_type, value, "<f4", WIRE_FIXED32))
        elif field == BLOB_DOUBLE_DATA:
            doubles.append(decode_reals(field, wire_type, value, "<f8", WIRE_FIXED64))
    if shape is None:
        shape = tuple(legacy_dims.get(field, 0) for field in BLOB_LEGACY_DIMS)
    chunks = doubles or floats
    values = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    return shape, values


class CaffeLayer(NamedTuple):
    """A layer of a caffemodel: its type ('' in V1 files) and its serialized blobs."""

    type: str
    blob_buffers: list

    def blobs(self):
        """(shape, float32 values) of each blob."""
        return [parse_blob(buffer) for buffer in self.blob_buffers]


def parse_layer(buffer, name_field, type_field, blobs_field):
    """(name, CaffeLayer) of a LayerParameter or V1LayerParameter message."""
    name = ""
    layer_type = ""
    blob_buffers = []
    for field, wire_type, value in iter_fields(buffer):
        if field == name_field:
            name = decode_string(field, wire_type, value)
        elif field == type_field:
            layer_type = decode_string(field, wire_type, value)
        elif field == blobs_field:
            if wire_type != WIRE_LENGTH_DELIMITED:
                raise WireFormatError(f"layer blobs field has wire type {wire_type}")
            blob_buffers.append(value)
    return name, CaffeLayer(layer_type, blob_buffers)


def parse_net(buffer):
    """The layers holding blobs in a NetParameter message (`layer` and legacy V1 `layers`), by name.

    Also returns the names that hold blobs more than once.
    """
    layers = {}
    duplicates = []
    for field, wire_type, value in iter_fields(buffer):
        if field not in (NET_LAYER, NET_LAYERS_V1):
            continue
        if wire_type != WIRE_LENGTH_DELIMITED:
            raise WireFormatError(f"NetParameter field {field} has wire type {wire_type}")
        if field == NET_LAYER:
            name, layer = parse_layer(value, LAYER_NAME, LAYER_TYPE, LAYER_BLOBS)
        else:
            name, layer = parse_layer(value, V1_LAYER_NAME, None, V1_LAYER_BLOBS)
        if not layer.blob_buffers:
            continue
        if name in layers:
            duplicates.append(name)
        layers[name] = layer
    return layers, duplicates


def read_caffemodel(path):
    """The layers holding weights in the .caffemodel at `path`, by name (see CaffeLayer)."""
    data = read_file(path)
    if not data:
        raise ConversionError(path, "file is empty")
    try:
        layers, duplicates = parse_net(memoryview(data))
    except WireFormatError as error:
        raise ConversionError(path, f"not a caffemodel: truncated or corrupt protobuf data ({error})") from None
    if duplicates:
        raise ConversionError(path, f"layer '{duplicates[0]}' holds weights more than once")
    if not layers:
        raise ConversionError(path, "not a caffemodel: no layer with weights found")
    return layers


def read_file(path):
    """The bytes of the file at `path`."""
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ConversionError(path, f"cannot read file ({error.strerror})") from None


# --------------------------------------------------------------------------------------
# Prototxt (protobuf text format)

TOKEN_PATTERN = re.compile(
    r"""
      (?P<space>[ \t\r\f\v]+|\#[^\n]*)
    | (?P<newline>\n)
    | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
    | (?P<symbol>[{}:])
    | (?P<word>[A-Za-z0-9_.+\-]+)
    """,
    re.VERBOSE,
)
IDENTIFIER_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
INTEGER_PATTERN = re.compile(r"[+-]?[0-9]+\Z")
STRING_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "n": "\n", "t": "\t"}


class PrototxtError(ValueError):
    """A prototxt that is malformed or not a supported deploy net."""


class Token(NamedTuple):
    """A token of the text format: kind (string, symbol or word), text and line number."""

    kind: str
    text: str
    line: int


class Scalar(NamedTuple):
    """A scalar value of the text format: a quoted string or a bare word (number, enum, bool)."""

    text: str
    quoted: bool
    line: int


class Block(NamedTuple):
    """A `{ ... }` block of the text format (or the whole file): (key, value) fields in order."""

    fields: list
    line: int

    def values(self, key):
        """All values given for `key`."""
        return [value for name, value in self.fields if name == key]


def tokenize(text):
    """The tokens of a prototxt, comments and white space dropped."""
    tokens = []
    pos = 0
    line = 1
    while pos < len(text):
        match = TOKEN_PATTERN.match(text, pos)
        if match is None:
            raise PrototxtError(f"line {line}: unexpected character {text[pos]!r}")
        kind = match.lastgroup
        if kind == "newline":
            line += 1
        elif kind != "space":
            tokens.append(Token(kind, match.group(), line))
        pos = match.end()
    return tokens


def unquote(token):
    """The text of a quoted string token, escapes resolved."""
    body = token.text[1:-1]

    def replace(match):
        escaped = match.group(1)
        if escaped not in STRING_ESCAPES:
            raise PrototxtError(f"line {token.line}: unsupported escape '\\{escaped}' in string")
        return STRING_ESCAPES[escaped]

    return re.sub(r"\\(.)", replace, body)


def parse_block(tokens, pos, opening_line):
    """The block starting at tokens[pos] and the position after its closing brace.

    `opening_line` is None for the whole file, which ends at the end of the tokens.
    """
    fields = []
    while True:
        if pos == len(tokens):
            if opening_line is not None:
                raise PrototxtError(f"line {opening_line}: '{{' is never closed")
            return Block(fields, 1), pos
        token = tokens[pos]
        if token.text == "}" and token.kind == "symbol":
            if opening_line is None:
                raise PrototxtError(f"line {token.line}: unmatched '}}'")
            return Block(fields, opening_line), pos + 1
        if token.kind != "word" or not IDENTIFIER_PATTERN.match(token.text):
            raise PrototxtError(f"line {token.line}: expected a field name, found {token.text!r}")
        key = token.text
        pos += 1
        if pos < len(tokens) and tokens[pos].text == ":" and tokens[pos].kind == "symbol":
            pos += 1
            if pos < len(tokens) and tokens[pos].kind in ("string", "word"):
                value = tokens[pos]
                quoted = value.kind == "string"
                fields.append((key, Scalar(unquote(value) if quoted else value.text, quoted, value.line)))
                pos += 1
                continue
        if pos < len(tokens) and tokens[pos].text == "{" and tokens[pos].kind == "symbol":
            block, pos = parse_block(tokens, pos + 1, tokens[pos].line)
            fields.append((key, block))
            continue
        found = repr(tokens[pos].text) if pos < len(tokens) else "the end of the file"
        line = tokens[pos].line if pos < len(tokens) else token.line
        raise PrototxtError(f"line {line}: expected a value or '{{' after '{key}', found {found}")


def parse_prototxt(text):
    """The top-level Block of a prototxt text."""
    block, _ = parse_block(tokenize(text), 0, None)
    return block


def single(block, key, where, required=False):
    """The one value of `key` in `block` (None when absent and not required)."""
    values = block.values(key)
    if len(values) > 1:
        raise PrototxtError(f"line {block.line}: {where}: '{key}' is given {len(values)} times")
    if not values:
        if required:
            raise PrototxtError(f"line {block.line}: {where}: '{key}' is missing")
        return None
    return values[0]


def scalar_line(value, block):
    """The line of a value, for messages."""
    return value.line if isinstance(value, Scalar) else block.line


def string_value(block, key, where, required=False):
    """A quoted string field."""
    value = single(block, key, where, required)
    if value is None:
        return None
    if not isinstance(value, Scalar) or not value.quoted:
        raise PrototxtError(f"line {scalar_line(value, block)}: {where}: '{key}' must be a quoted string")
    return value.text


def strings_value(block, key, where):
    """A repeated quoted string field."""
    values = block.values(key)
    for value in values:
        if not isinstance(value, Scalar) or not value.quoted:
            raise PrototxtError(f"line {scalar_line(value, block)}: {where}: '{key}' must be a quoted string")
    return [value.text for value in values]


def int_values(block, key, where):
    """A repeated integer field."""
    values = block.values(key)
    for value in values:
        if not isinstance(value, Scalar) or value.quoted or not INTEGER_PATTERN.match(value.text):
            raise PrototxtError(f"line {scalar_line(value, block)}: {where}: '{key}' must be an integer")
    return [int(value.text) for value in values]


def int_value(block, key, where, default=None):
    """An optional integer field."""
    values = int_values(block, key, where)
    if len(values) > 1:
        raise PrototxtError(f"line {block.line}: {where}: '{key}' is given {len(values)} times")
    return values[0] if values else default


def bool_value(block, key, where, default):
    """An optional boolean field."""
    value = single(block, key, where)
    if value is None:
        return default
    if not isinstance(value, Scalar) or value.quoted or value.text not in ("true", "false"):
        raise PrototxtError(f"line {scalar_line(value, block)}: {where}: '{key}' must be true or false")
    return value.text == "true"


def enum_value(block, key, where, default):
    """An optional enum field (bare word)."""
    value = single(block, key, where)
    if value is None:
        return default
    if not isinstance(value, Scalar) or value.quoted:
        raise PrototxtError(f"line {scalar_line(value, block)}: {where}: '{key}' must be an enum name")
    return value.text


def sub_block(block, key, where):
    """An optional nested block (an empty one when absent)."""
    value = single(block, key, where)
    if value is None:
        return Block([], block.line)
    if not isinstance(value, Block):
        raise PrototxtError(f"line {value.line}: {where}: '{key}' must be a {{ ... }} block")
    return value


def conv_blob_shapes(layer, conv_param, where, in_channels):
    """The Caffe blob shapes of a Convolution layer: ((O, I, k, k),) plus ((O,),) with a bias."""
    out_channels = int_value(conv_param, "num_output", where)
    kernel_sizes = int_values(conv_param, "kernel_size", where)
    if out_channels is None or out_channels <= 0:
        raise PrototxtError(f"line {layer.line}: {where}: num_output must be a positive integer")
    if len(kernel_sizes) != 1 or kernel_sizes[0] <= 0:
        raise PrototxtError(f"line {layer.line}: {where}: needs one positive kernel_size")
    if int_value(conv_param, "group", where, default=1) != 1:
        raise PrototxtError(f"line {layer.line}: {where}: grouped convolution is not supported")
    kernel = kernel_sizes[0]
    shapes = (((out_channels, in_channels, kernel, kernel),),)
    if bool_value(conv_param, "bias_term", where, default=True):
        shapes += (((out_channels,),),)
    return out_channels, shapes


def net_inputs(net):
    """(input dims, {input blob: channels}) of the top-level `input` + `input_dim`/`input_shape` fields."""
    dims = int_values(net, "input_dim", "net")
    for shape in net.values("input_shape"):
        if not isinstance(shape, Block):
            raise PrototxtError(f"line {shape.line}: net: 'input_shape' must be a {{ ... }} block")
        dims += int_values(shape, "dim", "input_shape")
    inputs = strings_value(net, "input", "net")
    if not inputs and not dims:
        return [], {}
    if len(inputs) != 1 or len(dims) != 4:
        raise PrototxtError("net: expected one input with 4 input_dim values (N, C, H, W)")
    return dims, {inputs[0]: dims[1]}


def layer_header(layer, channels, seen_names):
    """(name, type, bottoms, top, where) of a layer block, checked against the blobs made so far."""
    if not isinstance(layer, Block):
        raise PrototxtError(f"line {layer.line}: 'layer' must be a {{ ... }} block")
    name = string_value(layer, "name", "layer", required=True)
    where = f"layer '{name}'"
    layer_type = string_value(layer, "type", where, required=True)
    if layer_type not in KNOWN_LAYER_TYPES:
        raise PrototxtError(
            f"line {single(layer, 'type', where).line}: {where}: unknown layer type '{layer_type}' "
            f"(known: {', '.join(KNOWN_LAYER_TYPES)})"
        )
    if name in seen_names:
        raise PrototxtError(f"line {layer.line}: {where}: layer name used twice")
    bottoms = strings_value(layer, "bottom", where)
    tops = strings_value(layer, "top", where)
    for bottom in bottoms:
        if bottom not in channels:
            raise PrototxtError(f"line {layer.line}: {where}: bottom '{bottom}' is not produced by an earlier layer")
    fewest, most = BOTTOM_COUNTS.get(layer_type, (1, 1))
    if not fewest <= len(bottoms) <= (most or len(bottoms)) or len(tops) != 1:
        raise PrototxtError(f"line {layer.line}: {where}: wrong number of bottoms or tops for a {layer_type} layer")
    return name, layer_type, bottoms, tops[0], where


def input_layer_dims(layer, where):
    """The (N, C, H, W) of an Input layer."""
    shape = sub_block(sub_block(layer, "input_param", where), "shape", where)
    dims = int_values(shape, "dim", where)
    if len(dims) != 4:
        raise PrototxtError(f"line {layer.line}: {where}: input shape must have 4 dims (N, C, H, W)")
    return dims


def layer_output(layer, name, layer_type, where, bottom_channels):
    """(output channels, WeightedLayer or None) of a non-Input layer."""
    if layer_type == "Convolution":
        conv_param = sub_block(layer, "convolution_param", where)
        out_channels, shapes = conv_blob_shapes(layer, conv_param, where, bottom_channels[0])
        return out_channels, WeightedLayer(name, layer_type, shapes)
    if layer_type == "BN":
        channels = bottom_channels[0]
        return channels, WeightedLayer(name, layer_type, (((1, channels, 1, 1), (channels,)),) * 4)
    if layer_type == "Eltwise":
        if len(set(bottom_channels)) != 1:
            raise PrototxtError(f"line {layer.line}: {where}: Eltwise bottoms have different channel counts")
        if enum_value(sub_block(layer, "eltwise_param", where), "operation", where, "SUM") != "SUM":
            raise PrototxtError(f"line {layer.line}: {where}: only Eltwise SUM is supported")
    if layer_type == "Concat":
        if int_value(sub_block(layer, "concat_param", where), "axis", where, default=1) != 1:
            raise PrototxtError(f"line {layer.line}: {where}: only channel concatenation is supported")
        return sum(bottom_channels), None
    return bottom_channels[0], None


def read_net_definition(text):
    """The weighted layers and the model name of a PSPNet deploy prototxt.

    Follows the channel count of every blob through the net to know each
    convolution's input channels, and identifies the model from the ResNet depth
    (3 convolutions per residual block + 2), the classes of the last convolution
    (conv6) and the input size.
    """
    net = parse_prototxt(text)
    for key, value in net.fields:
        if key not in NET_FIELDS:
            raise PrototxtError(f"line {value.line}: unsupported top-level field '{key}'")
    input_dims, channels = net_inputs(net)
    weighted = []
    seen_names = set()
    residual_sums = 0
    classes = None
    for layer in net.values("layer"):
        name, layer_type, bottoms, top, where = layer_header(layer, channels, seen_names)
        seen_names.add(name)
        if layer_type == "Input":
            if input_dims:
                raise PrototxtError(f"line {layer.line}: {where}: the net already has an input")
            input_dims = input_layer_dims(layer, where)
            channels[top] = input_dims[1]
            continue
        channels[top], weighted_layer = layer_output(layer, name, layer_type, where, [channels[b] for b in bottoms])
        if weighted_layer:
            weighted.append(weighted_layer)
        if layer_type == "Convolution":
            classes = channels[top]
        residual_sums += layer_type == "Eltwise"
    if not input_dims:
        raise PrototxtError("net: no input of shape (N, C, H, W)")
    return identify_model(input_dims, residual_sums, classes, weighted)


def identify_model(input_dims, residual_sums, classes, weighted):
    """The NetDefinition of the released PSPNet with this structure, or PrototxtError."""
    depth = 3 * residual_sums + 2
    height, width = input_dims[2], input_dims[3]
    for model_name, variant in PSPNET_MODELS.items():
        if (
            (variant.depth, variant.classes, variant.input_size, variant.weighted_layers)
            == (depth, classes, height, len(weighted))
            and height == width
            and input_dims[1] == 3
        ):
            return NetDefinition(model_name, weighted)
    known = "; ".join(
        f"{name}: depth {v.depth}, {v.classes} classes, input {v.input_size}x{v.input_size}, "
        f"{v.weighted_layers} weighted layers"
        for name, v in PSPNET_MODELS.items()
    )
    raise PrototxtError(
        f"not one of the released PSPNets: depth {depth}, {classes} classes, "
        f"input {input_dims[1]}x{height}x{width}, {len(weighted)} weighted layers (expected {known})"
    )


def read_prototxt(path):
    """The NetDefinition of the deploy prototxt at `path`."""
    data = read_file(path)
    if not data.strip():
        raise ConversionError(path, "file is empty")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConversionError(path, "not a prototxt: not UTF-8 text") from None
    try:
        return read_net_definition(text)
    except PrototxtError as error:
        raise ConversionError(path, str(error)) from None


# --------------------------------------------------------------------------------------
# Conversion


def keras_name(caffe_name):
    """The Keras layer name of a Caffe layer ('conv1_1_3x3_s2/bn' -> 'conv1_1_3x3_s2_bn')."""
    return caffe_name.replace("/", "_")


def check_layer(layer, caffe_layer, path):
    """The float32 blobs of `layer` from the caffemodel, reshaped to their canonical Caffe shapes."""
    if caffe_layer is None:
        raise ConversionError(path, f"layer '{layer.name}' ({layer.type}) is missing from the caffemodel")
    if caffe_layer.type and caffe_layer.type != layer.type:
        raise ConversionError(
            path, f"layer '{layer.name}' is a {caffe_layer.type} layer here but a {layer.type} layer in the prototxt"
        )
    if len(caffe_layer.blob_buffers) != len(layer.blob_shapes):
        raise ConversionError(
            path,
            f"layer '{layer.name}' has {len(caffe_layer.blob_buffers)} blobs, "
            f"the prototxt's {layer.type} layer needs {len(layer.blob_shapes)}",
        )
    try:
        blobs = caffe_layer.blobs()
    except WireFormatError as error:
        raise ConversionError(path, f"layer '{layer.name}': corrupt blob ({error})") from None
    roles = BN_BLOB_ROLES if layer.type == "BN" else CONV_BLOB_ROLES
    arrays = []
    for index, ((shape, values), accepted, role) in enumerate(zip(blobs, layer.blob_shapes, roles)):
        if padded_shape(shape) not in [padded_shape(s) for s in accepted]:
            raise ConversionError(
                path,
                f"layer '{layer.name}': blob {index} ({role}) has shape {shape_text(shape)}, "
                f"expected {shape_text(accepted[0])}",
            )
        if values.size != np.prod(shape):
            raise ConversionError(
                path,
                f"layer '{layer.name}': blob {index} ({role}) holds {values.size} values, "
                f"its shape {shape_text(shape)} needs {int(np.prod(shape))}",
            )
        arrays.append(values.reshape(accepted[0]))
    return arrays


def padded_shape(shape):
    """A shape left-padded with 1s to 4 dims, as Caffe compares legacy blob shapes."""
    return (1,) * (4 - len(shape)) + tuple(shape)


def shape_text(shape):
    """A shape as '(64, 3, 3, 3)'."""
    return "(" + ", ".join(str(dim) for dim in shape) + ")"


def keras_weights(layer, arrays):
    """[(weight name, array)] of a layer in Keras order and layout.

    Convolution: kernel OIHW -> HWIO (+ bias); BN: gamma, beta, moving_mean,
    moving_variance = Caffe blobs slope, bias, mean, variance, each (C,).
    """
    if layer.type == "BN":
        return [(name, array.reshape(-1)) for name, array in zip(BN_WEIGHT_NAMES, arrays)]
    weights = [("kernel", np.ascontiguousarray(arrays[0].transpose(2, 3, 1, 0)))]
    if len(arrays) == 2:
        weights.append(("bias", arrays[1]))
    return weights


def write_weights_file(path, layers):
    """Writes [(keras layer name, [(weight name, array)])] in the Keras-2 save_weights HDF5 layout."""
    with h5py.File(path, "w") as handle:
        handle.attrs["layer_names"] = np.array([name.encode("utf-8") for name, _ in layers])
        handle.attrs["backend"] = KERAS_BACKEND
        handle.attrs["keras_version"] = KERAS_VERSION
        for name, weights in tqdm(layers, desc="writing", unit="layer", leave=False, disable=None):
            group = handle.create_group(name)
            weight_names = [f"{name}/{weight_name}:0" for weight_name, _ in weights]
            group.attrs["weight_names"] = np.array([weight_name.encode("utf-8") for weight_name in weight_names])
            for weight_name, (_, array) in zip(weight_names, weights):
                group.create_dataset(weight_name, data=array)


def write_atomically(path, write):
    """Calls write(temporary path) for a file next to `path`, then renames it to `path`.

    No partial file is left behind when `write` fails.
    """
    directory = os.path.dirname(path) or os.curdir
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise ConversionError(path, f"cannot create directory {directory} ({error.strerror})") from None
    try:
        descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    except OSError as error:
        raise ConversionError(path, f"cannot create output file ({error.strerror})") from None
    os.close(descriptor)
    try:
        write(temporary)
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except OSError as error:
        raise ConversionError(path, f"cannot write output file ({error})") from None
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def current_umask():
    """The process umask (for giving the output file the usual permissions)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def convert(prototxt_path, caffemodel_path, output_path=None):
    """Converts a Caffe PSPNet (deploy prototxt + caffemodel) to a Keras-2 HDF5 weights file.

    `output_path` defaults to weights/keras/<model name>.h5 beside this script, where
    pspnet.py looks for weights. Returns a Conversion; raises ConversionError naming the faulty file.
    """
    definition = read_prototxt(prototxt_path)
    caffe_layers = read_caffemodel(caffemodel_path)
    layers = []
    for layer in definition.weighted_layers:
        arrays = check_layer(layer, caffe_layers.get(layer.name), caffemodel_path)
        layers.append((keras_name(layer.name), keras_weights(layer, arrays)))
    del caffe_layers
    if output_path is None:
        output_path = os.path.join(DEFAULT_OUTPUT_DIR, f"{definition.model_name}.h5")
    if os.path.isdir(output_path):
        raise ConversionError(output_path, "output path is a directory")
    write_atomically(output_path, lambda temporary: write_weights_file(temporary, layers))
    return Conversion(definition.model_name, output_path, len(layers))


def parse_args(argv):
    """The command line arguments."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Convert the released Caffe PSPNet weights (pspnet50_ADE20K, pspnet101_VOC2012, "
            "pspnet101_cityscapes) to a Keras HDF5 weights file, without Caffe. The model is "
            "recognised from the prototxt; every weighted layer is checked against the caffemodel."
        ),
    )
    parser.add_argument("prototxt", help="the Caffe deploy net, e.g. pspnet50_ADE20K_473.prototxt")
    parser.add_argument("caffemodel", help="the matching Caffe weights, e.g. pspnet50_ADE20K.caffemodel")
    parser.add_argument(
        "-o",
        "--output",
        metavar="OUT.h5",
        help="output file (default: weights/keras/<model>.h5 beside weight_converter.py, where "
        "pspnet.py looks for it, e.g. weights/keras/pspnet50_ade20k.h5); missing directories are created",
    )
    return parser.parse_args(argv)


def main(argv=None):
    """Command line entry point; returns the exit code."""
    args = parse_args(argv)
    try:
        conversion = convert(args.prototxt, args.caffemodel, args.output)
    except ConversionError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    print(f"wrote {conversion.output_path} ({conversion.layer_count} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
